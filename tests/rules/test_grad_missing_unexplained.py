"""grad-missing-unexplained: the coverage fallback names trainable parameters without a gradient that no other
finding explains. Its faults are built from custom autograd functions gradflow has no rule for."""

from __future__ import annotations

import torch

from tests.helpers.builders import (Block, DetachedBranch, assert_fires, assert_healthy, assert_silent, base, batch,
                                    custom_lora, custom_with, probe, tiny_batch, tiny_lm)
from tests.helpers.gates import SideGated, gated_llama

SLUG = "grad-missing-unexplained"


class _NoInputGrad(torch.autograd.Function):
    """A hand-written op whose backward forgets its input's gradient (returns None)."""

    @staticmethod
    def forward(ctx, x):
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad):
        return None


class _ZeroInputGrad(torch.autograd.Function):
    """A straight-through estimator written wrong: the backward returns zeros."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


class ForgetfulBlock(Block):
    def forward(self, x):
        return _NoInputGrad.apply(x + self.act(self.proj(x)))


class ZeroSTEBlock(Block):
    def forward(self, x):
        return _ZeroInputGrad.apply(x + self.act(self.proj(x)))


def test_fires_on_a_custom_backward_that_returns_none():
    report = probe(custom_with(ForgetfulBlock, 1), tiny_batch())
    finding = assert_fires(report, SLUG)
    # everything before the op loses its gradient: blocks 0 and 1
    assert {n.split(".proj.")[0] for n in finding.params} == {"base_model.model.blocks.0", "base_model.model.blocks.1"}
    assert "no gradient" in finding.message and finding.fix.applicability == "display-only"
    assert_silent(report, "graph-break", "trainable-param-unused")


def test_fires_on_a_straight_through_estimator_that_returns_zeros():
    report = probe(custom_with(ZeroSTEBlock, 1), tiny_batch())
    finding = assert_fires(report, SLUG)
    assert "exactly-zero gradient" in finding.message
    assert {n.split(".proj.")[0] for n in finding.params} == {"base_model.model.blocks.0", "base_model.model.blocks.1"}
    assert_silent(report, "grad-all-zero")  # block 2's adapter still learns


# --- stays silent ------------------------------------------------------------------------------------------------
def test_silent_on_a_healthy_custom_lora():
    assert_healthy(probe(custom_lora(tiny_lm()), tiny_batch()))


def test_silent_when_another_finding_explains_the_missing_gradient():
    """A detached branch: graph-break names the parameters, so the fallback has nothing left to say."""

    report = probe(custom_with(DetachedBranch, 1), tiny_batch())
    assert_silent(report, SLUG)
    assert_fires(report, "graph-break")


# --- zeros that a zero gate explains, and those it does not ----------------------------------------------------------
def test_fires_on_a_frozen_zero_gate():
    """Layer 0's gate left at zero and frozen holds its adapter at zero for good: not the expected start (the other
    layers' trainable gates are)."""
    model = gated_llama()
    model.model.layers[0].mlp.gate.requires_grad_(False)
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location="model.layers.0.mlp")
    assert len(finding.params) == 4 and "exactly-zero gradient" in finding.message
    assert not any(".layers.0." in n for n in assert_fires(report, "lora-zero-init").params)


def test_fires_on_a_zero_gate_beside_the_adapter_without_steps():
    report = probe(gated_llama(SideGated), batch(base()))
    finding = assert_fires(report, SLUG)
    assert all(".mlp.down." in n or ".mlp.up." in n for n in finding.params)


def test_silent_when_the_steps_give_the_zeros_a_gradient():
    """--steps 2: the gate moves at step 1, so down and up get a gradient at step 2: they start at zero and learn."""
    model = gated_llama(SideGated)
    report = probe(model, batch(model), steps=2)
    assert_silent(report, SLUG)
    assert sum(p.grad == "zero" for p in report.snapshot.params) == 16
    assert all(s.grad == "ok" and s.changed for s in report.snapshot.steps.params)
