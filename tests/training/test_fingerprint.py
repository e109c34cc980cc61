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


def test_a_model_directory_is_fingerprinted_by_its_files(tmp_path):
    """Weights replaced in a MODEL directory between a kill and --resume are a difference, named by file; a file
    written again with the same content is not."""
    from gradflow.setup.presets import build_preset, build_tokenizer
    from gradflow.training.resume import model_files

    directory = tmp_path / "base"
    build_preset("tiny-llama", seed=0).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    before = {**OMITTED, "model": str(directory), "model_files": model_files(str(directory))}
    assert "config.json" in before["model_files"] and any(n.endswith(".safetensors") for n in before["model_files"])
    (directory / "tokenizer_config.json").write_text((directory / "tokenizer_config.json").read_text())
    assert differences(before, {**before, "model_files": model_files(str(directory))}) == []
    build_preset("tiny-llama", seed=1).save_pretrained(directory)  # same shapes, other weights
    after = {**before, "model_files": model_files(str(directory))}
    assert differences(before, after) == ["MODEL's files changed (model.safetensors)"]
    assert model_files("tiny-llama") is None and differences({**OMITTED, "model_files": None}, OMITTED) == []
