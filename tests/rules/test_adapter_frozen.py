"""adapter-frozen: PEFT adapter weights of the active adapter exist but do not require grad."""

from __future__ import annotations

from tests.helpers.builders import STACK, assert_fires, assert_silent, batch, lora, probe, save_adapter_and_reload
from tests.helpers.peft_methods import adapted

SLUG = "adapter-frozen"
FIRST = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"


def _adapter_params(model):
    return [n for n, _ in model.named_parameters() if ".lora_" in n]


def test_reloaded_without_is_trainable(tmp_path):
    """PeftModel.from_pretrained(base, path) loads for inference: every adapter weight frozen."""
    model = save_adapter_and_reload(lora(), tmp_path, is_trainable=False)
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location=FIRST)
    assert finding.message.startswith("all adapter weights of default are frozen")
    assert sorted(finding.params) == sorted(_adapter_params(model))
    assert_silent(report, "no-trainable-parameters")  # superseded by the specific cause
    assert finding.fix.applicability == "safe"


def test_requires_grad_false_after_get_peft_model():
    """model.requires_grad_(False) meant for the base, called on the PeftModel."""
    model = lora("tiny-phi3")
    model.requires_grad_(False)
    report = probe(model, batch(model))
    # Phi-3 declares o_proj before the fused qkv_proj
    finding = assert_fires(report, SLUG, location="base_model.model.model.layers.0.self_attn.o_proj.lora_A.default")
    assert len(finding.params) == len(_adapter_params(model))


def test_lower_layers_frozen_after_get_peft_model():
    """'Freeze the first two layers' after adding LoRA freezes their adapters too; the rest still train."""
    model = lora()
    for layer in model.get_base_model().model.layers[:2]:
        layer.requires_grad_(False)
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location=FIRST)
    total = len(_adapter_params(model))
    assert finding.message.startswith(f"{total // 2} of {total} adapter weights")
    assert all(".layers.0." in p or ".layers.1." in p for p in finding.params)


# --- stays silent -------------------------------------------------------------------------------------------------
def test_silent_when_reloaded_trainable(tmp_path):
    model = save_adapter_and_reload(lora(), tmp_path, is_trainable=True)
    report = probe(model, batch(model))
    assert_silent(report, SLUG)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)


def test_second_adapter_loaded_for_reference(tmp_path):
    """load_adapter(..., adapter_name="ref") beside the adapter being trained. PEFT 0.18 freezes the trained
    adapter too (0.21 leaves it trainable); the inactive "ref" adapter is frozen on purpose on both."""
    lora().save_pretrained(str(tmp_path / "ref"))
    model = lora()
    model.load_adapter(str(tmp_path / "ref"), adapter_name="ref")
    report = probe(model, batch(model))
    assert any(not p.requires_grad for n, p in model.named_parameters() if ".ref." in n)
    if STACK == "old":
        finding = assert_fires(report, SLUG, location=FIRST)
        assert "of default are frozen" in finding.message and not any(".ref." in p for p in finding.params)
    else:
        assert_silent(report, SLUG)
        assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n and ".default." in n)


def test_silent_for_a_fresh_lora():
    model = lora()
    assert_silent(probe(model, batch(model)), SLUG)


# --- AdaLoRA: ranknum is PEFT's, frozen on purpose (other_param_names), not an adapter weight ---------------------------
def test_silent_for_adalora_ranknum():
    model = adapted("adalora")
    assert any(".ranknum." in n and not p.requires_grad for n, p in model.named_parameters())
    report = probe(model, batch(model))
    assert_silent(report, SLUG)
    assert not any(p.adapter for p in report.snapshot.params if ".ranknum." in p.name)


def test_adalora_reloaded_without_is_trainable_names_its_weights_not_ranknum(tmp_path):
    """Frozen by from_pretrained: lora_A / lora_E / lora_B are named, and patch unfreezes them but not ranknum."""
    import gradflow

    model = save_adapter_and_reload(adapted("adalora"), tmp_path, is_trainable=False)
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location="base_model.model.model.layers.0.self_attn.q_proj")
    weights = {n for n, _ in model.named_parameters() if any(f".lora_{x}." in n for x in "AEB")}
    assert set(finding.params) == weights
    patched = gradflow.patch(model, batch(model))
    assert [f["id"] for f in patched.fixes_applied] == ["unfreeze-adapter"]
    assert all(p.requires_grad == (n in weights) for n, p in model.named_parameters() if ".default" in n)
    assert_silent(patched.after, SLUG, "grad-missing-unexplained")
