"""The recipe file: the applied fixes as data, written by --save, loaded and applied to a fresh model by train."""

from __future__ import annotations

import json

import pytest

import gradflow
from gradflow.errors import GradflowError
from gradflow.fixes.recipe_file import RECIPE_FILE, apply_recipe, load_recipe, recipe_from_report, save_patched
from tests.helpers.builders import batch, lora, rotated_base, seed_order
from tests.helpers.patching import assert_grads_flow, assert_same, fingerprint

REGEX = r"lora_|theta"


def _broken():
    model = seed_order()
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(False)  # frozen adapters behind cut checkpoints
    return model


def test_saved_recipe_fixes_a_fresh_broken_model(tmp_path):
    model = _broken()
    report = gradflow.patch(model, batch())
    assert {"unfreeze-adapter", "input-grad-hook", "cache-off"} <= {f["id"] for f in report.fixes_applied}
    saved = save_patched(model, report, str(tmp_path / "out"), source="test")
    assert {"adapter_config.json", "adapter_model.safetensors", RECIPE_FILE} <= set(saved["files"])

    recipe = load_recipe(str(tmp_path / "out"))  # the directory or the file
    assert recipe.verified is True and recipe.source == "test"
    assert [f["id"] for f in recipe.fixes] == [f["id"] for f in report.fixes_applied]
    fresh = _broken()
    changed = apply_recipe(fresh, recipe)
    assert changed
    assert_grads_flow(fresh, batch())
    assert fresh.config.use_cache is False
    again = fingerprint(fresh)
    assert apply_recipe(fresh, load_recipe(str(tmp_path / "out" / RECIPE_FILE))) == []  # already in effect
    assert_same(again, fingerprint(fresh))


def test_recipe_moves_rotations_into_modules_to_save_on_a_fresh_model(tmp_path):
    model = lora(rotated_base(), target_modules=["qkv_proj"])
    report = gradflow.patch(model, batch(), trainable=REGEX)
    recipe = recipe_from_report(report)
    fresh = lora(rotated_base(), target_modules=["qkv_proj"])
    apply_recipe(fresh, recipe)
    assert fresh.peft_config["default"].modules_to_save == model.peft_config["default"].modules_to_save
    assert_grads_flow(fresh, batch(), regex=REGEX)


@pytest.mark.parametrize("content, needle", [
    ("not json", "not valid JSON"),
    (json.dumps({"fixes": []}), "not a gradflow recipe"),
    (json.dumps({"kind": "gradflow-recipe", "schema_version": 99, "fixes": []}), "schema"),
    (json.dumps({"kind": "gradflow-recipe", "schema_version": 1, "fixes": [{"id": "no-such-fix", "data": {}}]}),
     "unknown fix"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, content, needle):
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(GradflowError, match=needle) as info:
        load_recipe(str(path))
    assert "\n" not in info.value.line()


def test_missing_recipe_says_how_to_make_one(tmp_path):
    with pytest.raises(GradflowError, match="gradflow patch"):
        load_recipe(str(tmp_path))
