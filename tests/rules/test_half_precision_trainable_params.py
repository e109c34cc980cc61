"""half-precision-trainable-params: trainable params stored in fp16/bf16."""

from __future__ import annotations

import torch
from peft import get_peft_model

from tests.helpers.builders import (assert_fires, assert_silent, base, batch, lora, lora_config, probe, tiny_batch,
                                    tiny_lm)

SLUG = "half-precision-trainable-params"
FIRST = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"


def _lora_count(model):
    return sum(1 for n, p in model.named_parameters() if p.requires_grad)


def test_half_after_get_peft_model():
    """model.half() after adding adapters casts them too."""
    model = lora().half()
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location=FIRST)
    assert "float16" in finding.message
    assert len(finding.params) == _lora_count(model)


def test_bf16_base_without_adapter_autocast():
    """A bf16 base with get_peft_model(autocast_adapter_dtype=False): adapters stay bf16."""
    model = get_peft_model(base(dtype=torch.bfloat16), lora_config(), autocast_adapter_dtype=False)
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location=FIRST)
    assert "bfloat16" in finding.message


def test_full_fine_tune_loaded_in_bf16():
    model = base(dtype=torch.bfloat16)
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location="model.embed_tokens")
    assert len(finding.params) == sum(1 for _ in model.parameters())


def test_custom_module_cast_to_bf16():
    model = tiny_lm(freeze=False).to(torch.bfloat16)
    report = probe(model, tiny_batch())
    assert_fires(report, SLUG, location="embed")


# --- stays silent -------------------------------------------------------------------------------------------------
def test_silent_for_a_bf16_base_with_default_autocast():
    """PEFT casts adapters of a half-precision base to fp32 by default: the base stays bf16, that is fine."""
    model = get_peft_model(base(dtype=torch.bfloat16), lora_config())
    report = probe(model, batch(model))
    assert_silent(report, SLUG)
    assert {p.dtype for p in report.snapshot.params if p.requires_grad} == {"float32"}
    assert "bfloat16" in {p.dtype for p in report.snapshot.params if not p.requires_grad}


def test_silent_for_half_before_get_peft_model():
    model = get_peft_model(base().half(), lora_config())
    assert_silent(probe(model, batch(model)), SLUG)


def test_silent_for_fp32():
    model = lora()
    assert_silent(probe(model, batch(model)), SLUG)
