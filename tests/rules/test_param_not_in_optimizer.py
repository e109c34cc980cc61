"""param-not-in-optimizer: trainable parameters missing from the optimizer given."""

from __future__ import annotations

import torch
from peft import get_peft_model

from tests.helpers.builders import (RotatedBlock, assert_fires, assert_silent, base, batch, custom_lora, lora,
                                    lora_config, probe, save_adapter_and_reload, tiny_batch, tiny_lm)

SLUG = "param-not-in-optimizer"
FIRST = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_optimizer_built_before_get_peft_model():
    model = base()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model = get_peft_model(model, lora_config())
    report = probe(model, batch(model), optimizer=optimizer)
    finding = assert_fires(report, SLUG, location=FIRST)
    assert len(finding.params) == len(_trainable(model))


def test_optimizer_kept_across_a_reloaded_adapter(tmp_path):
    """Resuming: the adapter is reloaded (new parameter objects) but the old optimizer is kept."""
    model = lora()
    optimizer = torch.optim.AdamW(_trainable(model), lr=1e-4)
    model = save_adapter_and_reload(model, tmp_path, is_trainable=True)
    report = probe(model, batch(model), optimizer=optimizer)
    finding = assert_fires(report, SLUG, location=FIRST)
    assert len(finding.params) == len(_trainable(model))


def test_optimizer_filtered_by_name_misses_modules_to_save():
    """AdamW over parameters named 'lora_' misses the modules_to_save copies."""
    model = custom_lora(tiny_lm(block=RotatedBlock), modules_to_save=["rot"])
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_" in n], lr=1e-4)
    report = probe(model, tiny_batch(), optimizer=optimizer)
    finding = assert_fires(report, SLUG, location="base_model.model.blocks.0.rot.modules_to_save.default")
    assert sorted(finding.params) == [f"base_model.model.blocks.{i}.rot.modules_to_save.default.theta"
                                      for i in range(3)]


def test_head_unfrozen_after_the_optimizer_was_built():
    model = tiny_lm(freeze=True)
    for block in model.blocks:
        block.requires_grad_(True)
    optimizer = torch.optim.SGD(_trainable(model), lr=0.1)
    model.head.requires_grad_(True)
    report = probe(model, tiny_batch(), optimizer=optimizer)
    finding = assert_fires(report, SLUG, location="head")
    assert finding.params == ["head.weight"]


# --- stays silent -------------------------------------------------------------------------------------------------
def test_silent_when_built_last():
    model = lora()
    optimizer = torch.optim.AdamW(_trainable(model), lr=1e-4)
    assert_silent(probe(model, batch(model), optimizer=optimizer), SLUG)


def test_silent_when_the_optimizer_also_holds_frozen_params():
    """Frozen params in the optimizer are harmless (they get no grad, so no update)."""
    model = lora()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    assert_silent(probe(model, batch(model), optimizer=optimizer), SLUG)


def test_silent_with_param_groups():
    model = custom_lora(tiny_lm(block=RotatedBlock), modules_to_save=["rot"])
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in named if "lora_" in n], "lr": 1e-4},
        {"params": [p for n, p in named if "modules_to_save" in n], "lr": 1e-3},
    ])
    assert_silent(probe(model, tiny_batch(), optimizer=optimizer), SLUG)


def test_silent_without_an_optimizer():
    model = base()
    model = get_peft_model(model, lora_config())
    report = probe(model, batch(model))
    assert_silent(report, SLUG)
    assert all(p.in_optimizer is None for p in report.snapshot.params)
