"""--resume compares options by their resolved values: a default typed out equals it omitted (issue 21)."""

from __future__ import annotations

import pytest

from gradflow.training.resume import differences

OMITTED = {"model": "tiny-llama", "lora_r": None, "lora_alpha": None, "lora_targets": None, "adapter": None,
           "dtype": None, "seed": 0}


@pytest.mark.parametrize("typed", [{"lora_r": 8}, {"lora_r": 8, "lora_alpha": 16, "lora_targets": "all-linear"},
                                   {"lora_alpha": 16}, {"dtype": "fp32"}, {"dtype": "float32"}],
                         ids=["r", "r-alpha-targets", "alpha", "dtype-alias", "dtype"])
def test_a_typed_default_is_no_difference(typed):
    assert differences(OMITTED, {**OMITTED, **typed}) == []


def test_real_changes_are_named_by_their_resolved_values():
    assert differences(OMITTED, {**OMITTED, "lora_r": 4}) == ["--lora-r 8 → 4"]
    assert differences(OMITTED, {**OMITTED, "lora_alpha": 32}) == ["--lora-alpha 16 → 32"]
    assert differences({**OMITTED, "dtype": "fp32"}, {**OMITTED, "dtype": "float32"}) == []  # an alias
    assert differences({**OMITTED, "dtype": "bf16"}, {**OMITTED, "dtype": "float32"}) == ["--dtype bfloat16 → float32"]
    directory = {**OMITTED, "model": "/models/llama"}  # loaded as its stack loads it: no --dtype is not float32
    assert differences(directory, {**directory, "dtype": "fp32"}) == ["--dtype (default) → float32"]


def test_a_factory_s_default_is_no_lora():
    factory = {**OMITTED, "model": "/work/make.py:build"}
    assert differences(factory, {**factory, "lora_r": 0}) == []
    assert differences(factory, {**factory, "lora_r": 8}) == ["--lora-r 0 → 8"]
