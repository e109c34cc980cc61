"""lora-zero-init (info): lora_A's first gradient is exactly zero because lora_B starts at zero."""

from __future__ import annotations

import torch
from peft import get_peft_model

from tests.helpers.builders import (assert_fires, assert_silent, base, batch, lora, lora_config, probe,
                                    save_adapter_and_reload)

SLUG = "lora-zero-init"


def _assert_expected_zero(report, location: str):
    finding = assert_fires(report, SLUG, severity="info", location=location)
    assert not report.fails("error") and not report.fails("warning")
    assert finding.fix is None  # nothing to fix
    zero_a = {p.name for p in report.snapshot.params if p.requires_grad and ".lora_A." in p.name and p.grad == "zero"}
    assert set(finding.params) == zero_a and zero_a
    assert all(p.grad == "ok" for p in report.snapshot.params if p.requires_grad and ".lora_B." in p.name)
    return finding


def test_fresh_lora():
    model = lora()
    _assert_expected_zero(probe(model, batch(model)), "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default")


def test_fresh_lora_on_gpt2_conv1d():
    model = lora("tiny-gpt2")
    _assert_expected_zero(probe(model, batch(model)), "base_model.model.transformer.h.0.attn.c_attn.lora_A.default")


def test_untrained_adapter_reloaded_trainable(tmp_path):
    model = save_adapter_and_reload(lora(), tmp_path, is_trainable=True)
    _assert_expected_zero(probe(model, batch(model)), "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default")


# --- stays silent -------------------------------------------------------------------------------------------------
def test_silent_after_one_optimizer_step():
    model = lora()
    data = batch(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**data).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    report = probe(model, data, optimizer=optimizer)
    assert_silent(report, SLUG)
    assert all(p.grad == "ok" for p in report.snapshot.params if p.requires_grad)


def test_silent_without_zero_init():
    model = get_peft_model(base(), lora_config(init_lora_weights=False))
    report = probe(model, batch(model))
    assert_silent(report, SLUG)


def test_silent_for_a_frozen_adapter(tmp_path):
    """No gradient at all is adapter-frozen's business, not an expected zero."""
    model = save_adapter_and_reload(lora(), tmp_path, is_trainable=False)
    report = probe(model, batch(model))
    assert_silent(report, SLUG)
    assert_fires(report, "adapter-frozen")


def test_an_embedding_adapter_names_its_own_zero_weight():
    """On an embedding PEFT starts lora_embedding_A at zero, so lora_embedding_B's first gradient is the zero one:
    the message names the weights as they are, beside the Linear adapters' lora_A."""
    model = lora(target_modules=["q_proj", "embed_tokens"])
    finding = assert_fires(probe(model, batch(model)), SLUG, severity="info")
    zero_b = [n for n in finding.params if ".lora_embedding_B." in n]
    assert zero_b == ["base_model.model.model.embed_tokens.lora_embedding_B.default"]
    assert finding.message == (
        "4 lora_A weights (first at base_model.model.model.layers.0.self_attn.q_proj.lora_A.default) and 1 "
        "lora_embedding_B weight (first at base_model.model.model.embed_tokens.lora_embedding_B) got an exactly-zero "
        "first gradient because lora_B and lora_embedding_A start at zero (expected; they move from the second step)")
