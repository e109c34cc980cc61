"""Healthy setups give no error and no warning, on both stacks, and every trainable parameter gets a gradient."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model, prepare_model_for_kbit_training

from tests.helpers.builders import (STACK, RotatedBlock, assert_healthy, base, batch, custom_lora, enable_gc, lora,
                                    lora_config, probe, quantized, tiny_batch, tiny_lm)


def _all_flow(report, *, allow_idle: tuple[str, ...] = ()):
    """Every trainable parameter got a gradient (a zero one counts for fresh lora_A), except those allowed idle."""
    states = [p for p in report.snapshot.params if p.requires_grad]
    assert states
    for p in states:
        if any(tag in p.name for tag in allow_idle) and p.used is False:
            continue
        assert p.grad in ("ok", "zero"), f"{p.name}: {p.grad}"
        if p.grad == "zero":
            assert ".lora_A." in p.name, f"{p.name}: zero gradient"
    assert report.loss["requires_grad"] and report.loss["error"] is None


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-phi3", "tiny-gpt2", "tiny-mixtral"])
def test_fresh_lora(preset):
    model = lora(preset)
    report = probe(model, batch(model))
    assert_healthy(report)
    _all_flow(report, allow_idle=(".experts.",))
    assert report.slugs() == ["lora-zero-init"]  # the one expected note


def test_gpt2_conv1d_lora():
    model = lora("tiny-gpt2", target_modules=["c_attn", "c_proj", "c_fc"])
    wrapped = model.get_base_model().transformer.h[0].attn.c_attn
    assert type(wrapped.base_layer).__name__ == "Conv1D"
    report = probe(model, batch(model))
    assert_healthy(report)
    _all_flow(report)


@pytest.mark.parametrize("order", ["gc-then-peft", "peft-then-gc"])
def test_non_reentrant_checkpointing_with_peft(order):
    if order == "gc-then-peft":
        model = get_peft_model(enable_gc(base(), reentrant=False), lora_config())
    else:
        model = enable_gc(lora(), reentrant=False)
    model.config.use_cache = False
    report = probe(model, batch(model))
    assert_healthy(report)
    _all_flow(report)
    assert report.snapshot.gc_mode == "non-reentrant"
    assert report.snapshot.checkpoints and not any(c.reentrant for c in report.snapshot.checkpoints)


def test_reentrant_checkpointing_before_peft():
    model = get_peft_model(enable_gc(base("tiny-phi3"), reentrant=True), lora_config())
    report = probe(model, batch(model))
    assert_healthy(report)
    _all_flow(report)
    assert report.snapshot.input_grad_hook


def test_custom_module_kept_trainable_through_modules_to_save():
    model = custom_lora(tiny_lm(block=RotatedBlock), modules_to_save=["rot"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    report = probe(model, tiny_batch(), optimizer=optimizer, trainable=r"lora_|\.rot\.")
    assert_healthy(report)
    _all_flow(report)
    assert any(".rot.modules_to_save." in p.name and p.grad == "ok" for p in report.snapshot.params)


def test_mixture_of_experts_with_unrouted_experts():
    """One repeated token routes every position of layer 0 to the same two experts; the others stay idle."""
    model = lora("tiny-mixtral")
    ids = torch.full((2, 8), 7)
    report = probe(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    assert_healthy(report)
    _all_flow(report, allow_idle=(".experts.",))
    if STACK == "old":  # one module per expert on 4.57 (fused into one module on 5.x)
        idle = [p for p in report.snapshot.params if p.requires_grad and p.used is False]
        assert idle and all(".experts." in p.name for p in idle)


@pytest.fixture(scope="module")
def llama_dir(preset_dir):
    return preset_dir("tiny-llama")


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_after_prepare_model_for_kbit_training(llama_dir, bits):
    model = quantized(llama_dir, bits=bits, dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(model)  # default: checkpointing on, the input-grad hook in place
    model.config.use_cache = False
    model = get_peft_model(model, lora_config())
    report = probe(model, batch(model, seq_len=8))
    assert_healthy(report)
    _all_flow(report)
    assert report.snapshot.quantized == f"{bits}bit"


@pytest.mark.parametrize("preset,options", [
    ("tiny-phi3", {}),
    ("tiny-llama", {"gc": "reentrant"}),
    ("tiny-gpt2", {"gc": "non-reentrant", "lora_r": 4}),
    ("tiny-mixtral", {"gc": "non-reentrant"}),
    ("tiny-llama", {"quant": "4bit", "gc": "reentrant", "dtype": "bfloat16"}),
])
def test_recipes_built_from_presets(preset, options):
    """The setups gradflow's own recipe builds (the CLI's --lora-r/--gc/--quant) are healthy."""
    from gradflow.forward import synthetic_batch
    from gradflow.setup.build import SetupOptions, build
    from gradflow.setup.sources import resolve

    setup = build(resolve(preset), SetupOptions(device="cpu", **options))
    model = setup.model
    report = probe(model, synthetic_batch(model, batch_size=2, seq_len=8 if "quant" in options else 16))
    assert_healthy(report)
    _all_flow(report, allow_idle=(".experts.",))


@pytest.mark.parametrize("method", ["ia3", "vera", "adalora"])
def test_fresh_peft_methods_with_parameter_dict_weights(method):
    """IA3, VeRA and AdaLoRA keep their weights in nn.ParameterDict: no adapter-frozen for AdaLoRA's ranknum (frozen
    by PEFT on purpose), no unexplained zero for VeRA's vera_lambda_d (vera_lambda_b starts at zero)."""
    from tests.helpers.peft_methods import adapted

    model = adapted(method)
    report = probe(model, batch(model))
    assert_healthy(report)
    assert all(p.grad in ("ok", "zero") for p in report.snapshot.params if p.requires_grad)
