"""param-not-updated: intended-trainable parameters that K real optimizer steps did not move (--steps)."""

from __future__ import annotations

import torch

from tests.helpers.builders import (RotatedBlock, assert_fires, assert_silent, batch, custom_lora, lora, probe,
                                    tiny_batch, tiny_lm)

SLUG = "param-not-updated"


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# --- fires --------------------------------------------------------------------------------------------------------
def test_intended_rotation_frozen_by_get_peft_model():
    """The SO(8) theta sits outside LoRA's targets: get_peft_model froze it, and --trainable says it should train."""
    model = custom_lora(tiny_lm(block=RotatedBlock))
    report = probe(model, tiny_batch(), trainable=r"lora_|theta", steps=2)
    finding = assert_fires(report, SLUG, location="base_model.model.blocks.0.rot")
    assert sorted(finding.params) == [f"base_model.model.blocks.{i}.rot.theta" for i in range(3)]
    assert "frozen" in finding.message


def test_intended_head_frozen_by_hand():
    model = tiny_lm(freeze=True)
    for block in model.blocks:
        block.requires_grad_(True)
    report = probe(model, tiny_batch(), trainable=r"blocks|head", steps=1)
    finding = assert_fires(report, SLUG, location="head")
    assert finding.params == ["head.weight"]


def test_update_lost_in_a_bf16_weight():
    """A tiny learning rate on bf16 weights: the gradient is there, the optimizer holds them, nothing moves."""
    model = tiny_lm(freeze=False).to(torch.bfloat16)
    optimizer = torch.optim.SGD(_trainable(model), lr=1e-9)
    report = probe(model, tiny_batch(), optimizer=optimizer, steps=1)
    finding = assert_fires(report, SLUG)
    assert "update lost" in finding.message


def test_silent_on_steps_that_raise():
    """An optimizer that cannot step these parameters (a sparse-only optimizer on dense gradients): step-raised
    names the error; no parameter is called frozen or stale, and no unfreeze fix is offered."""
    model = lora()
    optimizer = torch.optim.SparseAdam(_trainable(model), lr=1e-3)
    report = probe(model, batch(model), optimizer=optimizer, steps=1)
    assert_silent(report, SLUG)
    (finding,) = [f for f in report.findings if f.slug == "step-raised"]
    assert finding.severity == "error" and finding.location is None
    assert "the optimizer step of step 1 of 1 (--steps, SparseAdam) raised" in finding.message, finding.message


# --- stays silent -------------------------------------------------------------------------------------------------
def test_silent_on_healthy_lora_default_optimizer():
    model = lora("tiny-phi3")
    report = probe(model, batch(model), steps=2)
    assert_silent(report, SLUG)
    run = report.snapshot.steps
    assert run.optimizer_source == "default" and all(p.changed for p in run.params)


def test_silent_on_lora_zero_init_with_one_plain_sgd_step():
    """lora_A's first gradient is exactly zero (lora_B starts at zero): unchanged after one step, as expected."""
    model = lora("tiny-phi3")
    report = probe(model, batch(model), optimizer=torch.optim.SGD(_trainable(model), lr=0.1), steps=1)
    assert_silent(report, SLUG)
    assert any(not p.changed and p.grad == "zero" for p in report.snapshot.steps.params)


def test_silent_when_the_optimizer_misses_params_given_statically():
    """Parameters the given optimizer does not hold are param-not-in-optimizer's, not reported twice."""
    model = lora()
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_B" in n], lr=1e-3)
    report = probe(model, batch(model), optimizer=optimizer, steps=2)
    assert "param-not-in-optimizer" in report.slugs()
    assert_silent(report, SLUG)


def test_silent_without_steps():
    model = custom_lora(tiny_lm(block=RotatedBlock))
    report = probe(model, tiny_batch(), trainable=r"lora_|theta")
    assert_silent(report, SLUG)
    assert report.snapshot.steps is None
