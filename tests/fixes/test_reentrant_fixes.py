"""reentrant-checkpoint-no-input-grad and nested-checkpoint: the hook where inputs enter, non-reentrant, inner off."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradflow
from tests.helpers.builders import (STACK, Checkpointed, CustomLM, KeywordCheckpointed, base, batch, custom_lora,
                                    enable_gc, lora, remove_input_grad_hooks, seed_order, tiny_batch, wrap_layers)
from tests.helpers.patching import ids, patched

SLUG = "reentrant-checkpoint-no-input-grad"


def test_seed_order_gets_the_hook_on_the_transformers_embedding():
    model = seed_order()
    report = patched(model, batch(), fixes=["input-grad-hook"], answers=[SLUG])
    fix = report.fixes_applied[0]
    assert fix["data"]["via"] == "enable_input_require_grads"
    assert fix["location"] == "base_model.model.model.embed_tokens"
    assert "cheap" in fix["why"] and "memory" in fix["why"]
    # the hook went on the embedding of the transformers model inside the PeftModel; checkpointing stays reentrant
    assert report.after.model["gradient_checkpointing"] == "reentrant"
    assert report.after.model["input_grad_hook"] is True


def test_removed_hook_after_correct_order():
    model = lora(enable_gc(base("tiny-llama")))  # checkpointing first, then PEFT: the hook was there
    remove_input_grad_hooks(model)
    patched(model, batch(), fixes=["input-grad-hook"], answers=[SLUG])


def test_inputs_embeds_gets_a_pre_hook_on_the_decoder():
    model = enable_gc(lora("tiny-phi3"))
    model.get_base_model().enable_input_require_grads()  # the embedding hook exists, but inputs_embeds skips it
    ids_ = batch()["input_ids"]
    data = {"inputs_embeds": model.get_input_embeddings()(ids_).detach(), "labels": ids_.clone()}
    user_tensor = data["inputs_embeds"]
    report = patched(model, data, fixes=["input-grad-hook"], answers=[SLUG])
    fix = report.fixes_applied[0]
    assert fix["data"] == {"where": "region-inputs", "module": "base_model.model.model"}
    assert "inputs_embeds" in fix["why"]
    assert user_tensor.requires_grad is False  # the hook marks a view, not the caller's tensor


def test_user_checkpoint_wrapper_around_transformers_layers():
    model = wrap_layers(lora(base("tiny-llama")), Checkpointed)
    report = patched(model, batch(), fixes=["input-grad-hook"], answers=[SLUG])
    assert report.fixes_applied[0]["data"]["via"] == "enable_input_require_grads"


def test_custom_model_gets_a_forward_hook_on_its_embedding():
    model = custom_lora(CustomLM())
    report = patched(model, tiny_batch(), fixes=["input-grad-hook"], answers=[SLUG])
    fix = report.fixes_applied[0]
    assert fix["data"] == {"where": "embedding", "via": "forward-hook", "module": "base_model.model.embed",
                           "peft": True}
    assert "register_forward_hook(make_inputs_require_grads)" in "\n".join(fix["code"])


def test_custom_model_fed_floats_gets_a_pre_hook():
    model = custom_lora(CustomLM(embeds=False))
    data = {"features": torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(0)),
            "labels": tiny_batch()["labels"]}
    report = patched(model, data, fixes=["input-grad-hook"], answers=[SLUG])
    assert report.fixes_applied[0]["data"]["where"] == "region-inputs"


class _OpaqueEmbedding(nn.Module):
    """An embedding that is not an nn.Embedding (functional lookup): nothing to hook from outside."""

    def __init__(self, embedding):
        super().__init__()
        self.table = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)

    def forward(self, input_ids):
        return nn.functional.embedding(input_ids, self.table)


def _hidden():
    raise NotImplementedError


def test_hidden_embeddings_switch_transformers_checkpointing_to_non_reentrant():
    model = remove_input_grad_hooks(enable_gc(_hidden_embeddings_lora()))
    report = patched(model, batch(), fixes=["non-reentrant-checkpointing"], answers=[SLUG])
    assert "input-grad-hook" not in ids(report)
    assert report.after.model["gradient_checkpointing"] == "non-reentrant"
    assert "memory" in report.fixes_applied[0]["why"]


def _hidden_embeddings_lora():
    model = base("tiny-phi3")
    model.model.embed_tokens = _OpaqueEmbedding(model.model.embed_tokens)
    model.get_input_embeddings = _hidden
    model.model.get_input_embeddings = _hidden
    return lora(model)


@pytest.mark.slow  # a real Trainer: train() sets checkpointing up again from its arguments
def test_a_trainer_keeps_non_reentrant_checkpointing_through_train(tmp_path):
    """Patching a Trainer's model alone is undone by train(), which turns checkpointing on from TrainingArguments
    (reentrant on 4.57): the fix goes into the trainer's arguments too, the proof is a probe of the trainer, and
    the printed code sets the arguments."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids_ = torch.randint(3, 100, (4, 12), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, report_to=[],
                             gradient_checkpointing=True, save_strategy="no", use_cpu=True)
    trainer = Trainer(model=_hidden_embeddings_lora(), args=args,
                      train_dataset=Dataset.from_dict({"input_ids": ids_, "labels": ids_}))
    report = gradflow.patch(trainer)
    if SLUG not in report.before.slugs():  # transformers 5 checkpoints non-reentrant by default
        assert STACK == "new" and report.after is None or SLUG not in report.after.slugs()
        return
    assert "non-reentrant-checkpointing" in ids(report) and SLUG not in report.after.slugs()
    assert report.extra["verification"]["ok"]
    assert trainer.args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert 'trainer.args.gradient_checkpointing_kwargs = {"use_reentrant": False}' in report.extra["snippet"]
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(start[n], p)]
    assert len(moved) == len(start)


def _tiny_bart():
    from peft import LoraConfig, get_peft_model
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, use_cache=False)
    model = BartForConditionalGeneration(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


def test_bart_gets_the_hook_on_the_embeddings_that_run():
    """transformers 4.57's BART ties `shared` to the encoder's and decoder's own embed_tokens, which are the ones
    called: PEFT's input-grad hook on `shared` never fires. The hook goes on the copies that run."""
    ids_ = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids_, "labels": ids_.clone()}
    before = gradflow.probe(_tiny_bart(), data)
    if STACK == "new":  # transformers 5's BART: one embedding module, hooked when checkpointing is turned on
        assert SLUG not in before.slugs()
        return
    finding = next(f for f in before.findings if f.slug == SLUG)
    assert "the input-grad hook sits on base_model.model.model.shared, which the forward never calls" in finding.message
    # both stacks of layers are named, not the encoder's alone
    assert finding.message.startswith("2 reentrant checkpointed regions (base_model.model.model.encoder.layers.0, "
                                      "base_model.model.model.decoder.layers.0) ")
    model = _tiny_bart()
    report = patched(model, data, fixes=["input-grad-hook"], answers=[SLUG])
    assert report.fixes_applied[0]["data"]["modules"] == ["base_model.model.model.encoder.embed_tokens",
                                                          "base_model.model.model.decoder.embed_tokens"]
    fresh = _tiny_bart()  # the printed code alone, on a fresh copy
    exec(compile(report.extra["snippet"], "<snippet>", "exec"), {"model": fresh, "torch": torch})
    from tests.helpers.patching import assert_grads_flow

    assert_grads_flow(fresh, data)


def test_custom_checkpoint_without_an_entry_point_is_display_only():
    class Opaque(CustomLM):
        def forward(self, input_ids=None, labels=None, features=None):
            h = nn.functional.embedding(input_ids, self.table)
            for block in self.blocks:
                h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=True)
            logits = self.head(h)
            return {"loss": nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1))}

    inner = Opaque()
    inner.table = nn.Parameter(torch.randn(64, 16), requires_grad=False)
    model = custom_lora(inner)
    report = gradflow.patch(model, tiny_batch())
    assert report.fixes_applied == []
    assert SLUG in report.after.slugs() and report.fails("error")
    advice = [a for a in report.extra["advice"] if SLUG in a["answers"]]
    assert advice and "use_reentrant=False" in advice[0]["changes"][0]
    assert "builders.py" not in advice[0]["changes"][0] and "test_reentrant_fixes.py:" in advice[0]["changes"][0]
    assert report.extra["verification"]["ok"] is False


def test_nested_checkpoint_turns_the_inner_transformers_checkpointing_off():
    model = enable_gc(base("tiny-phi3"))
    model.enable_input_require_grads()
    model = wrap_layers(lora(model), KeywordCheckpointed)
    report = patched(model, batch(), fixes=["inner-checkpoint-off"], answers=["nested-checkpoint"])
    fix = next(f for f in report.fixes_applied if f["id"] == "inner-checkpoint-off")
    inner = [f"base_model.model.model.layers.{i}.inner" for i in range(4)]
    assert fix["data"]["modules"] == inner  # every layer at once, on both stacks
    for name in inner:
        assert model.get_submodule(name).gradient_checkpointing is False
    # the outer (user) checkpoint stays: the layers still run under a reentrant checkpoint
    assert any(c.reentrant and c.depth == 0 for c in report.after.snapshot.checkpoints)


def test_nested_user_checkpoints_are_display_only_with_the_place():
    class Inner(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(lambda: self.block(x), use_reentrant=True)

    class Outer(CustomLM):
        def forward(self, input_ids=None, labels=None, features=None):
            h = self.embed(input_ids)
            h = torch.utils.checkpoint.checkpoint(lambda t: self.inner(t), h, use_reentrant=True)
            logits = self.head(h)
            return {"loss": nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1))}

    inner = Outer()
    inner.inner = Inner(inner.blocks[0])
    inner.embed.weight.requires_grad_(True)
    report = gradflow.patch(custom_lora(inner), tiny_batch())
    assert "nested-checkpoint" in report.before.slugs()
    assert "inner-checkpoint-off" not in ids(report)
    advice = [a for a in report.extra["advice"] if "nested-checkpoint" in a["answers"]]
    assert advice and "checkpoint only once" in advice[0]["changes"][0]
    assert advice[0]["location"] is not None and "test_reentrant_fixes.py:" in advice[0]["changes"][0]


@pytest.mark.parametrize("how", ["seed-order", "inputs-embeds"])
def test_snippet_code_alone_fixes_a_fresh_copy(how):
    """The code a patch prints, executed on a fresh broken model, makes gradients flow (no gradflow involved)."""
    def build():
        model = seed_order() if how == "seed-order" else enable_gc(lora("tiny-phi3"))
        data = batch()
        if how == "inputs-embeds":
            model.get_base_model().enable_input_require_grads()
            data = {"inputs_embeds": model.get_input_embeddings()(data["input_ids"]).detach(), "labels": data["labels"]}
        return model, data

    model, data = build()
    report = gradflow.patch(model, data)
    fresh, fresh_data = build()
    exec(compile(report.extra["snippet"], "<snippet>", "exec"), {"model": fresh, "batch": fresh_data, "torch": torch})
    from tests.helpers.patching import assert_grads_flow

    assert_grads_flow(fresh, fresh_data)
