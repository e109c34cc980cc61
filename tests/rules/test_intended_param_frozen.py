"""intended-param-frozen: parameters matching the `trainable` regex are frozen."""

from __future__ import annotations

import pytest

from tests.helpers.builders import (RotatedBlock, assert_fires, assert_silent, batch, custom_lora, lora, probe,
                                    tiny_batch, tiny_lm)

SLUG = "intended-param-frozen"


def _rotated():
    return tiny_lm(block=RotatedBlock)


def test_custom_rotation_frozen_by_get_peft_model():
    """SPEC §1: get_peft_model freezes custom parameters outside the LoRA targets."""
    model = custom_lora(_rotated())
    report = probe(model, tiny_batch(), trainable=r"\.rot\.")
    finding = assert_fires(report, SLUG, location="base_model.model.blocks.0.rot")
    assert sorted(finding.params) == [f"base_model.model.blocks.{i}.rot.theta" for i in range(3)]
    assert "'\\\\.rot\\\\.'" in finding.message or r"\.rot\." in finding.message
    assert_silent(report, "no-trainable-parameters")


def test_head_meant_to_train_left_out_of_modules_to_save():
    model = lora("tiny-llama")
    report = probe(model, batch(model), trainable=r"lora_|lm_head")
    finding = assert_fires(report, SLUG, location="base_model.model.lm_head")
    assert finding.params == ["base_model.model.lm_head.weight"]


def test_everything_frozen_by_hand():
    """requires_grad_(False) on the whole custom model, intent given: the specific finding, not the generic one."""
    model = _rotated()
    model.requires_grad_(False)
    report = probe(model, tiny_batch(), trainable=r"rot|head")
    finding = assert_fires(report, SLUG, location="blocks.0.rot")
    assert "head.weight" in finding.params
    assert_silent(report, "no-trainable-parameters")


# --- stays silent -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("regex", [r"\.rot\.", r"rot", r"theta"])
def test_silent_with_modules_to_save(regex):
    """modules_to_save keeps a trainable copy; PEFT's frozen original_module copy is not what the user trains."""
    model = custom_lora(_rotated(), modules_to_save=["rot"])
    report = probe(model, tiny_batch(), trainable=regex)
    assert_silent(report, SLUG)
    assert any(p.requires_grad and p.intended for p in report.snapshot.params)


def test_silent_when_the_regex_names_trainable_adapters():
    model = lora()
    assert_silent(probe(model, batch(model), trainable=r"lora_"), SLUG)


def test_silent_without_a_regex():
    model = custom_lora(_rotated())
    assert_silent(probe(model, tiny_batch()), SLUG)
