"""kbit-not-prepared: a bitsandbytes 4-bit/8-bit base trained without prepare_model_for_kbit_training."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model, prepare_model_for_kbit_training

from tests.helpers.builders import (STACK, Checkpointed, assert_fires, assert_silent, base, batch,
                                    disable_input_grad_hook, enable_gc, lora_config, probe, quantized, wrap_layers)

SLUG = "kbit-not-prepared"
NORM = "base_model.model.model.layers.0.input_layernorm"


@pytest.fixture(scope="module")
def llama_dir(preset_dir):
    return preset_dir("tiny-llama")


def test_4bit_loaded_in_bf16_without_preparation(llama_dir):
    model = quantized(llama_dir, bits=4, dtype=torch.bfloat16)
    model = get_peft_model(model, lora_config())
    report = probe(model, batch(model, seq_len=8))
    finding = assert_fires(report, SLUG, location=NORM)
    assert finding.message.startswith("4bit quantized base not prepared")
    assert "bfloat16" in finding.message
    assert all("norm" in p for p in finding.params)
    assert report.snapshot.quantized == "4bit"


def test_8bit_loaded_in_fp16_without_preparation(llama_dir):
    model = quantized(llama_dir, bits=8, dtype=torch.float16)
    model = get_peft_model(model, lora_config())
    report = probe(model, batch(model, seq_len=8))
    finding = assert_fires(report, SLUG, location=NORM)
    assert finding.message.startswith("8bit quantized base not prepared") and "float16" in finding.message


def test_4bit_with_reentrant_checkpointing_and_no_hook(llama_dir):
    """fp32 norms, but reentrant checkpointing without the hook PEFT does not add on quantized models."""
    model = quantized(llama_dir, bits=4, dtype=torch.float32)
    model = get_peft_model(enable_gc(model, reentrant=True), lora_config())
    report = probe(model, batch(model, seq_len=8))
    if STACK == "old":
        finding = assert_fires(report, SLUG, location="base_model.model.model.embed_tokens")
        assert "without the input-grad hook on base_model.model.model.embed_tokens" in finding.message
        assert_fires(report, "reentrant-checkpoint-no-input-grad")  # and what it leads to
    else:  # transformers 5 hooks the embedding inside gradient_checkpointing_enable
        assert_silent(report, SLUG)
        assert report.snapshot.input_grad_hook


def test_prepared_without_checkpointing_then_reentrant_checkpointing(llama_dir):
    """prepare_model_for_kbit_training(use_gradient_checkpointing=False), then reentrant checkpointing turned on
    (as TrainingArguments(gradient_checkpointing=True) does on 4.57): the fix names the missing hook, and does not
    tell the user to call the preparation they already called."""
    model = quantized(llama_dir, bits=4, dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = disable_input_grad_hook(get_peft_model(enable_gc(model, reentrant=True), lora_config()))
    report = probe(model, batch(model, seq_len=8))
    finding = assert_fires(report, SLUG, location="base_model.model.model.embed_tokens")
    assert "already in fp32" in finding.message and "use_gradient_checkpointing=True" in finding.message
    assert finding.fix.title.startswith("Install the input-grad hook: model.enable_input_require_grads()")
    assert "Call peft.prepare_model_for_kbit_training(model)" not in finding.fix.title


@pytest.mark.parametrize("bits", [4, 8])
def test_reentrant_checkpointing_with_the_hook_removed(llama_dir, bits):
    """The same fault on both stacks: on 5.x the hook transformers added is taken off again (4.57 never had one)."""
    model = quantized(llama_dir, bits=bits, dtype=torch.float32)
    model = disable_input_grad_hook(get_peft_model(enable_gc(model, reentrant=True), lora_config()))
    report = probe(model, batch(model, seq_len=8))
    finding = assert_fires(report, SLUG, location="base_model.model.model.embed_tokens")
    assert "reentrant checkpointing is on without the input-grad hook" in finding.message
    assert not report.snapshot.input_grad_hook
    assert_fires(report, "reentrant-checkpoint-no-input-grad")


@pytest.mark.parametrize("bits", [4, 8])
def test_custom_reentrant_checkpoint_loop_without_the_hook(llama_dir, bits):
    """A user's own torch.utils.checkpoint(use_reentrant=True) around each decoder layer: transformers' checkpointing
    flag stays off, so nothing (on either stack) adds the hook."""
    model = get_peft_model(quantized(llama_dir, bits=bits, dtype=torch.float32), lora_config())
    wrap_layers(model, Checkpointed, reentrant=True)
    report = probe(model, batch(model, seq_len=8))
    assert report.snapshot.gc_mode == "off"
    finding = assert_fires(report, SLUG, location="base_model.model.model.embed_tokens")
    assert "torch.utils.checkpoint(use_reentrant=True) without the input-grad hook" in finding.message


# --- stays silent -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_silent_after_prepare_model_for_kbit_training(llama_dir, bits):
    model = quantized(llama_dir, bits=bits, dtype=torch.bfloat16 if bits == 4 else torch.float16)
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, lora_config())
    report = probe(model, batch(model, seq_len=8))
    assert_silent(report, SLUG)
    grads = [p.grad for p in report.snapshot.params if p.requires_grad]
    assert grads and all(g in ("ok", "zero") for g in grads)


@pytest.mark.parametrize("how", ["gradient_checkpointing_enable", "custom-loop"])
def test_silent_for_non_reentrant_checkpointing_without_the_hook(llama_dir, how):
    """Non-reentrant regions keep the graph without an input that requires grad: no hook is needed, and
    prepare_model_for_kbit_training adds none for them."""
    model = quantized(llama_dir, bits=4, dtype=torch.float32)
    # transformers' own checkpointing turns the cache off; a custom loop must (on 4.57 the cache grows again in the
    # recomputation and the backward raises CheckpointError)
    model.config.use_cache = False
    if how == "custom-loop":
        model = wrap_layers(get_peft_model(model, lora_config()), Checkpointed, reentrant=False)
    else:
        model = get_peft_model(enable_gc(model, reentrant=False), lora_config())
    model = disable_input_grad_hook(model)
    report = probe(model, batch(model, seq_len=8))
    assert not report.snapshot.input_grad_hook and report.snapshot.checkpoints
    assert_silent(report, SLUG)
    grads = [p.grad for p in report.snapshot.params if p.requires_grad]
    assert grads and all(g in ("ok", "zero") for g in grads)


def test_silent_for_a_bf16_base_that_is_not_quantized():
    model = get_peft_model(base(dtype=torch.bfloat16), lora_config())
    report = probe(model, batch(model, seq_len=8))
    assert_silent(report, SLUG)
    assert report.snapshot.quantized == "none"


def test_silent_when_nothing_trains(llama_dir):
    """An inference-only quantized model is not being trained."""
    model = quantized(llama_dir, bits=4, dtype=torch.bfloat16)
    assert_silent(probe(model, batch(model, seq_len=8)), SLUG)
