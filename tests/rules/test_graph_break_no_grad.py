"""graph-break where autograd was off: a forward decorated with @torch.no_grad(), a module called under
torch.no_grad() by a caller's forward, a loss function or a Trainer's compute_loss."""

from __future__ import annotations

import pytest
import torch

import gradflow

from tests.helpers.builders import (TinyLM, assert_fires, assert_silent, base, batch, custom_lora, lora, probe,
                                    tiny_batch, tiny_lm)
from tests.helpers.vlm import VISION_LORA, tiny_llava, vlm_batch

SLUG = "graph-break"


def _lora_ids(report, *layers):
    return {p.name for p in report.snapshot.params
            if p.requires_grad and any(f".layers.{i}." in p.name for i in layers)}


# --- torch.no_grad: the module that ran without autograd is the location ----------------------------------------------
class Smoother(torch.nn.Module):
    """A frozen normalisation whose forward is decorated with @torch.no_grad() ('it is frozen anyway')."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)

    @torch.no_grad()
    def forward(self, x):
        return self.norm(x)


class Rescale(torch.nn.Module):
    """A frozen per-channel scale with no children, its forward decorated with @torch.no_grad()."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(dim))

    @torch.no_grad()
    def forward(self, x):
        return x * self.scale


class ThenPost(torch.nn.Module):
    """Runs `inner` (a block or a LoRA'd decoder layer), then passes its hidden states through `post`."""

    def __init__(self, inner, post):
        super().__init__()
        self.inner = inner
        self.post = post

    def forward(self, hidden_states, *args, **kwargs):
        out = self.inner(hidden_states, *args, **kwargs)
        if isinstance(out, tuple):
            return (self.post(out[0]),) + tuple(out[1:])
        return self.post(out)


@pytest.mark.parametrize("post", [Smoother, Rescale])
def test_fires_at_a_custom_module_whose_forward_is_decorated_with_no_grad(post):
    model = tiny_lm()
    model.blocks[1] = ThenPost(model.blocks[1], post(16))
    model.requires_grad_(False)
    model = custom_lora(model)
    report = probe(model, tiny_batch())
    assert report.loss["requires_grad"] is True  # block 2's adapters still train: a silent break
    finding = assert_fires(report, SLUG, location="base_model.model.blocks.1.post")
    assert "@torch.no_grad()" in finding.message and post.__name__ in finding.message
    # block 0 upstream and block 1 before the decorated module: all lost at it
    assert {n.split(".proj.")[0] for n in finding.params} == {"base_model.model.blocks.0",
                                                               "base_model.model.blocks.1.inner"}
    assert_silent(report, "loss-detached", "trainable-param-unused")


@pytest.mark.parametrize("post", [Smoother, Rescale])
def test_fires_at_a_no_grad_adapter_after_a_lora_decoder_layer(post):
    model = lora()
    layers = model.get_base_model().model.layers
    layers[1] = ThenPost(layers[1], post(64).requires_grad_(False))
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location="base_model.model.model.layers.1.post")
    assert "no_grad" in finding.message
    assert set(finding.params) == _lora_ids(report, 0, 1)
    grads = {p.name: p.grad for p in report.snapshot.params if p.requires_grad}
    assert all(grads[n] in ("ok", "zero") for n in _lora_ids(report, 2, 3))


class NoGradLayerLM(TinyLM):
    """A user's forward that runs block 1 under `with torch.no_grad():` ('it is frozen anyway')."""

    def hidden(self, input_ids=None, inputs_embeds=None):
        h = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            if i == 1:
                with torch.no_grad():
                    h = block(h)
            else:
                h = block(h)
        return h


@pytest.mark.parametrize("targets", [("proj",), ("blocks.0.proj", "blocks.2.proj")], ids=["lora-inside", "frozen"])
def test_fires_at_a_block_the_users_forward_runs_under_no_grad(targets):
    model = NoGradLayerLM()
    model.requires_grad_(False)
    model = custom_lora(model, targets=targets)
    report = probe(model, tiny_batch())
    finding = assert_fires(report, SLUG, location="base_model.model.blocks.1")
    assert "torch.no_grad" in finding.message and "inside base_model.model (NoGradLayerLM)" in finding.message
    # the parameters before the no_grad call are lost there too, not only those inside it
    assert {n.split(".proj.")[0] for n in finding.params} == (
        {"base_model.model.blocks.0", "base_model.model.blocks.1"} if len(targets) == 1 else {"base_model.model.blocks.0"})


def _loop_with_layer_under_no_grad(index):
    """A user's loss function that runs the decoder layers itself and wraps one call (or a set) in torch.no_grad()."""
    scope = index if isinstance(index, set) else {index}

    def loss_fn(model, data):
        inner = model.get_base_model()
        h = inner.model.embed_tokens(data["input_ids"])
        positions = torch.arange(h.shape[1]).unsqueeze(0)
        rope = inner.model.rotary_emb(h, positions)
        for i, layer in enumerate(inner.model.layers):
            with torch.no_grad() if i in scope else torch.enable_grad():
                out = layer(h, position_embeddings=rope, position_ids=positions)
            h = out[0] if isinstance(out, tuple) else out
        logits = inner.lm_head(inner.model.norm(h))
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), data["labels"][:, 1:].flatten())

    return loss_fn


@pytest.mark.parametrize("targets", ["all-linear", r".*layers\.[023]\..*(q_proj|v_proj)"], ids=["lora-inside", "frozen"])
def test_fires_at_a_decoder_layer_a_user_loop_runs_under_no_grad(targets):
    model = lora(target_modules=targets)
    report = probe(model, batch(model), loss_fn=_loop_with_layer_under_no_grad(1))
    finding = assert_fires(report, SLUG, location="base_model.model.model.layers.1")
    # the loop is the loss function's, not LlamaModel's forward
    assert "torch.no_grad / inference mode was on when the loss function called it, outside the model's forward" \
        in finding.message and "inside" not in finding.message, finding.message
    assert set(finding.params) == _lora_ids(report, 0, 1)
    assert report.loss["requires_grad"] is True


def test_silent_on_a_no_grad_module_with_nothing_trainable_before_it():
    """@torch.no_grad() on a frozen module in front of everything that trains cuts nothing that learns."""
    model = tiny_lm()
    model.blocks[0] = ThenPost(model.blocks[0], Smoother(16))
    model.requires_grad_(False)
    model = custom_lora(model, targets=("blocks.1.proj", "blocks.2.proj"))
    report = probe(model, tiny_batch())
    assert_silent(report, SLUG)
    assert not report.fails("warning")


def test_silent_on_a_user_loop_that_runs_a_frozen_first_layer_under_no_grad():
    model = lora(target_modules=r".*layers\.[123]\..*(q_proj|v_proj)")
    report = probe(model, batch(model), loss_fn=_loop_with_layer_under_no_grad(0))
    assert_silent(report, SLUG)
    assert not report.fails("warning")


def test_patch_advice_says_which_no_grad_to_remove():
    """Display-only advice: the decorator on the module's own forward, or the caller's no_grad block."""
    model = tiny_lm()
    model.blocks[1] = ThenPost(model.blocks[1], Rescale(16))
    model.requires_grad_(False)
    report = gradflow.patch(custom_lora(model), tiny_batch())
    (advice,) = [a for a in report.extra["advice"] if a["answers"] == [SLUG]]
    assert advice["changes"][0].startswith("in base_model.model.blocks.1.post (Rescale, forward at ")
    assert advice["changes"][0].endswith("remove the @torch.no_grad() decorator from forward")

    model = NoGradLayerLM()
    model.requires_grad_(False)
    report = gradflow.patch(custom_lora(model), tiny_batch())
    (advice,) = [a for a in report.extra["advice"] if a["answers"] == [SLUG]]
    assert advice["changes"][0].startswith("in base_model.model (NoGradLayerLM")
    assert advice["changes"][0].endswith("call base_model.model.blocks.1 outside torch.no_grad() / inference_mode")


# --- the scope and the sub-model are named (issue 18) -------------------------------------------------------------
def test_fires_on_a_no_grad_block_around_two_layers_with_every_lost_tensor():
    """`with torch.no_grad():` around layers 0-1 in a user's loop: all their adapters are lost, named as one scope."""
    model = lora(target_modules=["q_proj", "k_proj", "v_proj"])
    report = probe(model, batch(model), loss_fn=_loop_with_layer_under_no_grad({0, 1}))
    finding = assert_fires(report, SLUG, location="base_model.model.model.layers.0")
    assert set(finding.params) == _lora_ids(report, 0, 1) and len(finding.params) == 12
    assert "base_model.model.model.layers.0–1" in finding.message


def test_fires_at_the_vision_tower_a_vlm_runs_under_no_grad():
    """get_image_features wrapped in torch.no_grad() (as for a frozen tower) while LoRA on the tower should train."""
    model = lora(tiny_llava(feature_layer=-1), target_modules=VISION_LORA)
    inner = model.get_base_model()
    inner.model.get_image_features = torch.no_grad()(inner.model.get_image_features)
    report = probe(model, vlm_batch())
    finding = assert_fires(report, SLUG, location="base_model.model.model.vision_tower")
    assert finding.params and all(".vision_tower." in p for p in finding.params)
    assert_silent(report, "grad-missing-unexplained", "trainable-param-unused")


# --- autograd off in the loss computation, outside the model's forward (trial 18) --------------------------------
_OFF_IN_LOSS = "torch.no_grad / inference mode was on when {site} called it, outside the model's forward"


def _noisy_embeddings_loss(model, data):
    """Embeddings built under no_grad to add noise to them, then fed to the model: embed_tokens never learns."""
    with torch.no_grad():
        emb = model.get_input_embeddings()(data["input_ids"])
        emb = emb + 0.01 * torch.randn_like(emb)
    return model(inputs_embeds=emb, labels=data["labels"]).loss


def test_names_the_loss_function_that_ran_the_embeddings_under_no_grad():
    model = base()  # a full fine-tune: embed_tokens is trainable
    report = probe(model, batch(model), loss_fn=_noisy_embeddings_loss)
    finding = assert_fires(report, SLUG, location="model.embed_tokens")
    assert _OFF_IN_LOSS.format(site="the loss function") in finding.message, finding.message
    assert "inside model (LlamaModel)" not in finding.message
    assert "; 1 trainable parameter gets no gradient: model.embed_tokens.weight" in finding.message
    # patch's advice names the same place: the loss function, not the model whose forward it never was
    fresh = base()
    advice = gradflow.patch(fresh, batch(fresh), loss_fn=_noisy_embeddings_loss).extra["advice"]
    changes = [c for a in advice if "graph-break" in a["answers"] for c in a["changes"]]
    assert changes == ["in your loss function: call model.embed_tokens outside torch.no_grad() / inference_mode"]


def _bart_lora():
    from peft import LoraConfig, get_peft_model
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
    return get_peft_model(BartForConditionalGeneration(config),
                          LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="SEQ_2_SEQ_LM"))


@pytest.mark.slow  # a real Trainer
def test_names_the_compute_loss_that_cached_the_encoder_under_no_grad(tmp_path):
    """A Trainer subclass runs the encoder under no_grad ('it is frozen') and feeds encoder_outputs to the model."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    class CachedEncoderTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with torch.no_grad():
                enc = model.get_encoder()(input_ids=inputs["input_ids"])
            out = model(encoder_outputs=enc, labels=inputs["labels"])
            return (out.loss, out) if return_outputs else out.loss

    ids = torch.randint(3, 64, (4, 8), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = CachedEncoderTrainer(model=_bart_lora(), args=args,
                                   train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    finding = assert_fires(gradflow.probe(trainer), SLUG, location="base_model.model.model.encoder")
    assert _OFF_IN_LOSS.format(site="CachedEncoderTrainer.compute_loss") in finding.message, finding.message
    assert "inside base_model.model.model (BartModel)" not in finding.message
    assert all(".encoder." in p for p in finding.params) and "trainable parameters get no" in finding.message
