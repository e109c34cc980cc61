"""use-cache-in-training (info): use_cache on with checkpointing, or a legacy tuple cache in a training batch."""

from __future__ import annotations

import torch
from peft import get_peft_model

from tests.helpers.builders import assert_fires, assert_silent, base, batch, enable_gc, lora, lora_config, probe

SLUG = "use-cache-in-training"


def _assert_info(report):
    finding = assert_fires(report, SLUG, severity="info", location=None)
    assert not report.fails("warning")
    return finding


def test_checkpointing_with_the_config_default_cache():
    model = get_peft_model(enable_gc(base(), reentrant=False), lora_config())
    assert model.config.use_cache is True
    finding = _assert_info(probe(model, batch(model)))
    assert "gradient checkpointing" in finding.message
    assert finding.fix.title.startswith("Set model.config.use_cache = False")


def test_reentrant_checkpointing_before_peft():
    model = get_peft_model(enable_gc(base("tiny-phi3"), reentrant=True), lora_config())
    _assert_info(probe(model, batch(model)))


def test_legacy_tuple_past_key_values_in_the_batch():
    """A prefix cache kept as legacy (key, value) tuples and fed to a training forward."""
    model = lora()
    data = batch(model)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    past = tuple((torch.zeros(2, cfg.num_key_value_heads, 4, head_dim),) * 2 for _ in range(cfg.num_hidden_layers))
    data["past_key_values"] = past
    data["attention_mask"] = torch.ones(2, data["input_ids"].shape[1] + 4, dtype=torch.long)
    report = probe(model, data)
    finding = assert_fires(report, SLUG, severity="info", location=None)
    assert "legacy tuple past_key_values" in finding.message
    # the forward raising on it is recorded as data, not a crash, and fails the step (step-raised);
    # no gradient rule is blamed for what the exception left unrun
    assert report.loss["error_phase"] == "forward"
    assert [f.severity for f in report.findings if f.slug == "step-raised"] == ["error"]
    assert_silent(report, "trainable-param-unused", "graph-break")


# --- stays silent -------------------------------------------------------------------------------------------------
def test_silent_with_use_cache_off():
    model = get_peft_model(enable_gc(base(), reentrant=False), lora_config())
    model.config.use_cache = False
    assert_silent(probe(model, batch(model)), SLUG)


def test_silent_without_checkpointing():
    model = lora()
    assert model.config.use_cache is True
    assert_silent(probe(model, batch(model)), SLUG)


def test_cache_inside_a_users_reentrant_wrapper_zeroes_key_value_gradients():
    """The recomputation reads keys/values the no-grad forward cached: k/v adapters get exactly zero, without
    gradflow too (issue 18's coverage found it)."""
    from tests.helpers.builders import Checkpointed, wrap_layers

    def build():
        model = wrap_layers(lora(base("tiny-llama")), Checkpointed)
        model.get_base_model().enable_input_require_grads()
        return model

    report = probe(build(), batch())
    finding = assert_fires(report, SLUG, location="base_model.model.model.layers.0.inner")  # the region's layer
    assert finding.params and all(("k_proj" in p or "v_proj" in p) for p in finding.params)
    plain = build()
    plain(**batch()).loss.backward()
    zero = {n for n, p in plain.named_parameters() if p.grad is not None and not p.grad.any()}
    assert set(finding.params) <= zero
