"""grad-missing-unexplained: the coverage fallback names trainable parameters without a gradient that no other
finding explains. Its faults are built from custom autograd functions gradflow has no rule for."""

from __future__ import annotations

import torch

from tests.helpers.builders import (Block, DetachedBranch, assert_fires, assert_healthy, assert_silent, custom_lora,
                                    custom_with, probe, tiny_batch, tiny_lm)

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
