"""freeze-unused: an unsafe fix that freezes modules whose outputs never reach the loss, proven by a re-probe."""

from __future__ import annotations

import gradflow
from tests.helpers.builders import lora, tiny_batch, value_head_lm
from tests.helpers.coverage import assert_coverage
from tests.helpers.vlm import tiny_llava, vlm_batch

SLUG = "trainable-param-unused"


def test_unsafe_fixes_freeze_the_unused_head_and_the_reprobe_proves_it():
    model = value_head_lm()
    report = gradflow.patch(model, tiny_batch(), unsafe=True)
    assert SLUG in report.before.slugs() and SLUG not in report.after.slugs()
    (record,) = report.fixes_applied
    assert record["id"] == "freeze-unused" and record["verified"] is True
    assert not any(p.requires_grad for p in model.value_head.parameters())
    assert all(p.requires_grad for p in model.blocks.parameters())  # what does learn is untouched
    assert_coverage(report)


def test_without_unsafe_fixes_it_is_offered_not_applied():
    model = value_head_lm()
    report = gradflow.patch(model, tiny_batch())
    assert [p["id"] for p in report.extra["skipped_unsafe"]] == ["freeze-unused"]
    assert "model.get_submodule('value_head').requires_grad_(False)" in report.extra["snippet"]
    assert all(p.requires_grad for p in model.value_head.parameters())


def test_adapter_weights_of_an_unused_layer_get_advice_not_a_freeze():
    """Freezing part of an adapter is adapter-frozen's fault: the advice names target_modules instead."""
    model = lora(tiny_llava(), target_modules="all-linear")
    report = gradflow.patch(model, vlm_batch(), unsafe=True)
    assert not report.fixes_applied
    (advice,) = [a for a in report.extra["advice"] if a["answers"] == [SLUG]]
    assert "none of its outputs reaches the loss" in advice["changes"][0] and "target_modules" in advice["changes"][0]
