"""step-raised: a forward, loss or backward that raises is an error finding (a CI gate must fail on it)."""

from __future__ import annotations

import torch
from torch import nn

import gradflow
from gradflow.forward import synthetic_batch
from tests.helpers.builders import lora


class Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        h = self.proj(x)
        raise RuntimeError("shape mismatch in my custom block")


def _only(report, slug):
    got = [f for f in report.findings if f.slug == slug]
    assert len(got) == 1, report.findings
    return got[0]


def test_forward_that_raises_is_an_error():
    report = gradflow.probe(Exploding(), torch.randn(2, 4))
    f = _only(report, "step-raised")
    assert f.severity == "error" and f.code == "GF150"
    assert "the forward raised RuntimeError: shape mismatch in my custom block" in f.message
    assert report.fails("error")
    assert report.loss["error_phase"] == "forward"
    assert not [x for x in report.findings if x.slug == "trainable-param-unused"]  # no follow-on noise


def test_loss_fn_returning_a_non_scalar_is_an_error():
    model = lora("tiny-llama")
    report = gradflow.probe(model, synthetic_batch(model), loss_fn=lambda m, b: m(**b).logits)
    f = _only(report, "step-raised")
    assert "reading the loss raised" in f.message and "not a scalar" in f.message
    assert report.fails("error")


def test_silent_on_a_healthy_lora():
    model = lora("tiny-llama")
    report = gradflow.probe(model, synthetic_batch(model))
    assert "step-raised" not in report.slugs()
    assert report.loss["error"] is None
