"""The chunked causal-LM loss equals `model(**batch).loss`, loss and every trainable gradient, or returns None.

Tiny real models (fp32, random init, seed 0), real PEFT LoRA; batches padded (attention_mask) and packed
(position_ids restarting per sample, no attention_mask). Tolerance: rtol 1e-5 / atol 1e-6 on the loss and
rtol 1e-4 / atol 1e-6 on gradients — the same fp32 arithmetic, summed in another order. Under accelerate's bf16
autocast (what Trainer(bf16=True) runs): rtol 1e-3 on the loss and 2e-2 on gradients, and several times closer to
the autocast forward than the forward without autocast is. A real bitsandbytes nf4 base (QLoRA) is checked at the
fp32 tolerances. CPU cost: ~15 s per stack.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from gradflow.setup.presets import build_preset
from gradflow.setup.build import apply_lora
from gradflow.training.loss import chunked_causal_lm_loss, unsupported_reason
from tests.helpers.dist import process_group  # noqa: F401  (fixture)

LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
LENGTHS = (11, 7, 14)  # three samples of unequal length; the packed row is 32 tokens


def _samples(vocab: int):
    gen = torch.Generator().manual_seed(1)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, vocab, (n,), generator=gen)
        labels = ids.clone()
        labels[: n // 3] = -100  # a prompt: not supervised
        out.append((ids, labels))
    return out


def _padded(vocab: int, pad_id: int):
    samples = _samples(vocab)
    width = max(LENGTHS)
    ids = torch.full((len(samples), width), pad_id)
    labels = torch.full((len(samples), width), -100)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, (s, lab) in enumerate(samples):  # right padding, as gradflow's collator pads
        ids[i, : len(s)], labels[i, : len(s)], mask[i, : len(s)] = s, lab, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _packed(vocab: int):
    samples = _samples(vocab)
    ids = torch.cat([s for s, _ in samples])[None]
    # each sample's first label is -100, as DataCollatorWithFlattening writes: no prediction across a boundary
    labels = torch.cat([torch.cat([torch.tensor([-100]), lab[1:]]) for _, lab in samples])[None]
    positions = torch.cat([torch.arange(len(s)) for s, _ in samples])[None]
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def _model(preset: str, head: str):
    model = build_preset(preset, seed=0)
    model.config.use_cache = False
    peft = apply_lora(model, 4, 8, "all-linear", modules_to_save=["lm_head"] if head == "modules_to_save" else None)
    with torch.no_grad():  # LoRA B starts at zero: move it, so that the adapters' gradients are not trivial
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return peft


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("preset", ["tiny-phi3", "tiny-llama"])
@pytest.mark.parametrize("head", ["lora", "modules_to_save"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_chunked_loss_equals_standard(preset, head, layout):
    model = _model(preset, head)
    vocab, pad = model.config.vocab_size, model.config.pad_token_id
    batch = _padded(vocab, pad) if layout == "padded" else _packed(vocab)
    assert unsupported_reason(model, batch) is None
    for items in (None, torch.tensor(40)):  # the batch's own mean, and the Trainer's accumulated count
        extra = {} if items is None else {"num_items_in_batch": items}
        want, want_grads = _loss_and_grads(model, lambda: model(**batch, **extra).loss)
        # chunk_tokens 5: several chunks, the last one partial
        got, got_grads = _loss_and_grads(model, lambda: chunked_causal_lm_loss(model, batch, items, chunk_tokens=5))
        assert_close(got, want, **LOSS_TOL)
        assert want_grads.keys() == got_grads.keys() and len(got_grads) > 0
        if head == "modules_to_save":
            assert any("modules_to_save" in n and "lm_head" in n for n in got_grads)
        for name in want_grads:
            assert_close(got_grads[name], want_grads[name], **GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_plain_model_with_checkpointing_equals_standard():
    """No PEFT: every parameter trains, through non-reentrant gradient checkpointing in the decoder."""
    model = build_preset("tiny-llama", seed=0)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = _padded(model.config.vocab_size, model.config.pad_token_id)
    want, want_grads = _loss_and_grads(model, lambda: model(**batch).loss)
    got, got_grads = _loss_and_grads(model, lambda: chunked_causal_lm_loss(model, batch, chunk_tokens=8))
    assert_close(got, want, **LOSS_TOL)
    assert "lm_head.weight" in got_grads and "model.embed_tokens.weight" in got_grads
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], **GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_nothing_supervised_is_nan_like_standard():
    model = build_preset("tiny-llama", seed=0)
    batch = _padded(model.config.vocab_size, model.config.pad_token_id)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    assert torch.isnan(model(**batch).loss)
    assert torch.isnan(chunked_causal_lm_loss(model, batch))


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                          final_logit_softcapping=30.0))


def _custom_loss():
    model = build_preset("tiny-llama", seed=0)
    model._loss_function = lambda logits, labels, vocab_size, **kw: logits.float().mean()
    return model


def _router_loss():
    model = build_preset("tiny-mixtral", seed=0)
    model.config.output_router_logits = True
    return model


def _prompt_tuning():
    from peft import PromptTuningConfig, get_peft_model

    return get_peft_model(build_preset("tiny-llama", seed=0),
                          PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))


@pytest.mark.parametrize("build, why", [
    (_gemma2, "final_logit_softcapping"),
    (lambda: build_preset("tiny-gpt2", seed=0), "model type 'gpt2'"),
    (_custom_loss, "custom loss_function"),
    (_router_loss, "auxiliary loss"),
    (_prompt_tuning, "prompt learning"),
    (lambda: torch.nn.Linear(4, 4), "not a transformers causal LM"),
])
def test_unsupported_returns_none(build, why):
    model = build()
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "labels": torch.tensor([[5, 6, 7, 8]])}
    assert why in unsupported_reason(model, batch)
    assert chunked_causal_lm_loss(model, batch) is None


def test_unsupported_without_labels_or_with_adapter_names():
    model = _model("tiny-llama", "lora")
    assert "no labels" in unsupported_reason(model, {"input_ids": torch.tensor([[5, 6]])})
    routed = {"input_ids": torch.tensor([[5, 6]]), "labels": torch.tensor([[5, 6]]), "adapter_names": ["default"]}
    assert chunked_causal_lm_loss(model, routed) is None


def test_logits_are_not_kept_for_backward():
    """What autograd saves: the standard path keeps [tokens, vocab] logits; the chunked one keeps no logits at all."""
    model = _model("tiny-phi3", "lora")
    vocab = model.config.vocab_size
    batch = _padded(vocab, model.config.pad_token_id)

    def saved_logit_rows(loss_fn):
        rows = []

        def pack(t):
            if t.dim() >= 1 and t.shape[-1] == vocab and t.dtype.is_floating_point:
                rows.append(t.numel() // vocab)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn()
        return rows

    assert max(saved_logit_rows(lambda: model(**batch).loss)) >= batch["input_ids"].numel()
    assert saved_logit_rows(lambda: chunked_causal_lm_loss(model, batch, chunk_tokens=5)) == []


@pytest.fixture
def bf16_accelerator():
    """Accelerate's bf16 mixed precision on CPU, as Trainer(bf16=True) prepares the model; its global state reset."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier Trainer in this process set fp32
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    yield accelerator
    AcceleratorState._reset_state(reset_partial_state=True)


def test_trainer_mixed_precision_is_reproduced(bf16_accelerator):
    """Trainer's bf16 autocast lives in accelerate's wrapper of model.forward: the chunked loss runs under it too."""
    model = bf16_accelerator.prepare(_model("tiny-llama", "modules_to_save"))
    assert "_original_forward" in vars(model)  # accelerate wrapped the forward in autocast
    batch = _packed(model.config.vocab_size)
    fp32, fp32_grads = _loss_and_grads(model, lambda: model._original_forward(**batch).loss)  # without autocast
    want, want_grads = _loss_and_grads(model, lambda: model(**batch).loss)
    got, got_grads = _loss_and_grads(model, lambda: chunked_causal_lm_loss(model, batch, chunk_tokens=5))
    assert not torch.equal(want, fp32)  # autocast matters here: the test can tell the two apart
    # the same bf16 operations row for row; the head's GEMM over fewer rows may block differently
    assert_close(got, want, rtol=1e-3, atol=1e-4)
    assert abs(got - want) < abs(fp32 - want) / 4
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], rtol=2e-2, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")

    def worst(grads):  # the largest gradient error relative to each tensor's largest entry
        return max(float((grads[n] - want_grads[n]).abs().max() / want_grads[n].abs().max()) for n in want_grads)

    assert worst(got_grads) < worst(fp32_grads) / 3  # measured: 0.3% against 1.8% without autocast


def test_qlora_equals_standard(tmp_path):
    """A real bitsandbytes nf4 base (CPU), prepared for k-bit training, with LoRA: the same loss and gradients."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    build_preset("tiny-llama", seed=0).save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path, device_map={"": "cpu"}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    model = apply_lora(prepare_model_for_kbit_training(base, use_gradient_checkpointing=False), 4, 8, "all-linear")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    batch = _padded(model.config.vocab_size, model.config.pad_token_id)
    assert unsupported_reason(model, batch) is None
    want, want_grads = _loss_and_grads(model, lambda: model(**batch).loss)
    got, got_grads = _loss_and_grads(model, lambda: chunked_causal_lm_loss(model, batch, chunk_tokens=7))
    assert_close(got, want, **LOSS_TOL)
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], **GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_a_model_sharded_at_its_root_by_fsdp_takes_the_standard_loss(process_group):
    """FSDP2 gathers the root unit's weights (embeddings, final norm, head) only in the model's own forward: the
    chunked loss, which calls the decoder and the head itself, would meet sharded DTensors ("mixed torch.Tensor and
    DTensor", seen on an H200). Units on the decoder layers alone gather themselves, so they keep the chunked loss.
    One gloo process, in this process (the group is destroyed at the end)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1,))
    batch = _packed(build_preset("tiny-llama").config.vocab_size)
    layers_only = _model("tiny-llama", "lora")
    for layer in layers_only.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh)
    assert unsupported_reason(layers_only, batch) is None
    assert_close(chunked_causal_lm_loss(layers_only, batch), layers_only(**batch).loss, **LOSS_TOL)
    root = _model("tiny-llama", "lora")
    fully_shard(root, mesh=mesh)
    assert "FSDP" in unsupported_reason(root, batch)
    assert chunked_causal_lm_loss(root, batch) is None
