"""no-trainable-parameters: nothing requires grad."""

from __future__ import annotations

from tests.helpers.builders import (assert_fires, assert_silent, base, batch, lora, probe, save_adapter_and_reload,
                                    tiny_batch, tiny_lm)

SLUG = "no-trainable-parameters"


def _assert_nothing_trains(report):
    finding = assert_fires(report, SLUG, location=None)
    assert finding.location is None  # a whole-model finding
    assert report.params["trainable"] == 0
    total = report.model["params_total"]
    assert f"{total:,} parameters" in finding.message
    assert report.fails("error")
    return finding


def test_base_frozen_and_adapters_never_added():
    """The base is frozen for fine-tuning, but get_peft_model was never called."""
    model = base()
    model.requires_grad_(False)
    _assert_nothing_trains(probe(model, batch(model)))


def test_custom_module_frozen_by_hand():
    model = tiny_lm(freeze=True)
    report = probe(model, tiny_batch())
    _assert_nothing_trains(report)
    assert report.loss["requires_grad"] is False  # the loud failure users see


def test_merged_and_unloaded_adapter_trained_further():
    """merge_and_unload returns the base with LoRA folded in, still frozen as get_peft_model left it."""
    merged = lora().merge_and_unload()
    _assert_nothing_trains(probe(merged, batch(merged)))


# --- stays silent -------------------------------------------------------------------------------------------------
def test_silent_when_a_frozen_adapter_explains_it(tmp_path):
    """A reloaded frozen adapter: adapter-frozen names the cause, this generic finding stands back."""
    model = save_adapter_and_reload(lora(), tmp_path, is_trainable=False)
    report = probe(model, batch(model))
    assert_silent(report, SLUG)
    assert_fires(report, "adapter-frozen")


def test_silent_when_intended_params_explain_it():
    model = tiny_lm(freeze=True)
    report = probe(model, tiny_batch(), trainable=r"^head\.")
    assert_silent(report, SLUG)
    assert_fires(report, "intended-param-frozen", location="head")


def test_silent_with_one_trainable_parameter():
    model = tiny_lm(freeze=True)
    model.head.weight.requires_grad_(True)
    assert_silent(probe(model, tiny_batch()), SLUG)


def test_silent_for_a_fresh_lora():
    model = lora()
    assert_silent(probe(model, batch(model)), SLUG)
