"""A patched model really trains: 20 AdamW steps on a fixed batch lower the loss and move every intended parameter."""

from __future__ import annotations

import pytest
import torch

import gradflow
from tests.helpers.builders import batch, lora, remove_input_grad_hooks, rotated_base
from tests.helpers.patching import train


def _assert_trains(model, data, *, regex=None, lr=1e-2):
    losses, unchanged = train(model, data, steps=20, lr=lr, regex=regex)
    assert losses[-1] < 0.95 * losses[0], losses
    assert not unchanged, unchanged[:5]
    return losses


def test_patched_seed_bug_trains():
    from gradflow.demos import seed_bug

    setup = seed_bug()
    model, data = setup["model"], setup["batch"]
    with pytest.raises(RuntimeError, match="does not require grad"):
        model(**data).loss.backward()  # the seed's error, before the patch
    report = gradflow.patch(model, data)
    assert report.extra["verification"]["ok"]
    _assert_trains(model, data)


def test_patched_rotations_train_with_the_adapter():
    regex = r"lora_|theta"
    model = lora(rotated_base(), target_modules=["qkv_proj"])
    report = gradflow.patch(model, batch(), trainable=regex)
    assert report.extra["verification"]["ok"]
    _assert_trains(model, batch(), regex=regex)


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_patched_qlora_preset_trains(quant):
    from gradflow.setup.build import SetupOptions, build
    from gradflow.setup.sources import resolve

    model = build(resolve("tiny-phi3"), SetupOptions(quant=quant, gc="reentrant")).model
    remove_input_grad_hooks(model)  # a removed hook: the adapters inside the 4/8-bit layers get no gradient
    data = batch()
    report = gradflow.patch(model, data)
    assert "reentrant-checkpoint-no-input-grad" in report.before.slugs()
    assert report.before.params["none_grad"] == report.before.params["trainable"] > 0
    assert report.extra["verification"]["ok"] and "input-grad-hook" in [f["id"] for f in report.fixes_applied]
    assert any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())
    _assert_trains(model, data)
    quantized = [p for p in model.parameters() if p.dtype in (torch.uint8, torch.int8)]
    assert quantized and not any(p.requires_grad for p in quantized)
