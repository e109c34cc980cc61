"""zero-learning-rate: a param group with trainable parameters whose learning rate is 0 at every step (--steps)."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_linear_schedule_with_warmup

from tests.helpers.builders import assert_fires, assert_silent, batch, lora, probe, tiny_batch, tiny_lm

SLUG = "zero-learning-rate"


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# --- fires --------------------------------------------------------------------------------------------------------
def test_lr_zero():
    model = lora()
    optimizer = torch.optim.AdamW(_trainable(model), lr=0.0)
    report = probe(model, batch(model), optimizer=optimizer, steps=2)
    finding = assert_fires(report, SLUG, location=None)
    assert len(finding.params) == len(_trainable(model))
    assert_silent(report, "param-not-updated")  # one cause, one finding


def test_lambda_scheduler_returning_zero():
    model = tiny_lm(freeze=False)
    optimizer = torch.optim.SGD(_trainable(model), lr=0.1)
    report = probe(model, tiny_batch(), optimizer=optimizer, lr_scheduler=LambdaLR(optimizer, lambda step: 0.0),
                   steps=3)
    finding = assert_fires(report, SLUG)
    assert "LambdaLR" in finding.message
    assert optimizer.param_groups[0]["lr"] == 0.0  # as the scheduler left it before the check


def test_linear_schedule_with_zero_training_steps():
    """num_training_steps computed as 0 (len(loader) // accum with a short loader): 0 from the first step on."""
    model = lora()
    optimizer = torch.optim.AdamW(_trainable(model), lr=2e-4)
    sched = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=0)
    assert_fires(probe(model, batch(model), optimizer=optimizer, lr_scheduler=sched, steps=2), SLUG)


def test_one_group_of_two_at_zero():
    model = tiny_lm(freeze=False)
    optimizer = torch.optim.AdamW([{"params": list(model.blocks.parameters()), "lr": 1e-3},
                                   {"params": list(model.head.parameters()) + list(model.embed.parameters()),
                                    "lr": 0.0}])
    report = probe(model, tiny_batch(), optimizer=optimizer, steps=1)
    finding = assert_fires(report, SLUG)
    assert "param group 1" in finding.message and sorted(finding.params) == ["embed.weight", "head.weight"]


# --- stays silent -------------------------------------------------------------------------------------------------
def test_silent_on_warmup_from_zero_even_for_one_step():
    """A warmup gives lr 0 at step 0 legitimately: the next step's lr is not 0."""
    model = lora()
    optimizer = torch.optim.AdamW(_trainable(model), lr=2e-4)
    sched = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=10, num_training_steps=100)
    report = probe(model, batch(model), optimizer=optimizer, lr_scheduler=sched, steps=1)
    assert_silent(report, SLUG)
    assert report.snapshot.steps.lrs == [[0.0]]
    assert sched.last_epoch == 0 and optimizer.param_groups[0]["lr"] == 0.0  # put back


def test_silent_on_a_frozen_group_at_zero():
    """A group of frozen parameters at lr 0 trains nothing anyway."""
    model = tiny_lm(freeze=True)
    model.head.requires_grad_(True)
    optimizer = torch.optim.AdamW([{"params": [model.head.weight], "lr": 1e-3},
                                   {"params": [model.embed.weight], "lr": 0.0}])
    assert_silent(probe(model, tiny_batch(), optimizer=optimizer, steps=1), SLUG)


def test_silent_on_healthy_default():
    model = lora()
    assert_silent(probe(model, batch(model), steps=1), SLUG)
