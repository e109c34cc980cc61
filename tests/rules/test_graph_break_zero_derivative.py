"""graph-break for an op whose derivative is zero (round, floor, sign ...): fake quantization or binarisation
without a straight-through estimator. The gradient is not None but exactly zero, so nothing raises and the loss
has a grad_fn; the probe's replay stops its autograd walk at such an op, as at a .detach()."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradflow
from tests.helpers.builders import assert_fires, assert_silent, batch, lora, probe

SLUG = "graph-break"
LAYER0 = "base_model.model.model.layers.0"


class FakeQuant(nn.Module):
    """Simulated int8 activations after a decoder layer: `op(h * 16) / 16`, with or without the estimator."""

    def __init__(self, block, op: str, ste: bool):
        super().__init__()
        self.block, self.op, self.ste = block, getattr(torch, op), ste

    def forward(self, hidden_states, *args, **kwargs):
        out = self.block(hidden_states, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        q = self.op(h * 16) / 16
        if self.ste:  # the straight-through estimator: the value quantized, the gradient the identity's
            q = h + (q - h).detach()
        return (q, *out[1:]) if isinstance(out, tuple) else q


def _quantized(op: str = "round", ste: bool = False):
    model = lora()
    layers = model.get_base_model().model.layers
    layers[0] = FakeQuant(layers[0], op, ste)
    return model


@pytest.mark.parametrize("op", ["round", "floor", "sign"])
def test_fires_at_the_module_whose_op_zeroes_the_gradient(op):
    model = _quantized(op)
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location=LAYER0)
    # layer 0's adapters, A and B on its 7 projections (the other layers' lora_A zeros are lora-zero-init's)
    zero = {p.name for p in report.snapshot.params
            if p.requires_grad and p.grad == "zero" and p.name.startswith(LAYER0)}
    assert set(finding.params) == zero and len(zero) == 14
    assert f"only through {op}(), whose derivative is zero (no straight-through estimator)" in finding.message
    assert "; 14 trainable parameters get an exactly-zero gradient" in finding.message
    assert {f.slug for f in report.findings} == {SLUG, "lora-zero-init"}
    assert finding.fix.title.startswith("Give the op a straight-through estimator")
    assert report.loss["grad_fn"] is not None  # silent without gradflow: the loss still trains layer 1


def test_silent_with_a_straight_through_estimator():
    model = _quantized(ste=True)
    assert_silent(probe(model, batch(model)), SLUG)


def test_patch_shows_the_estimator_to_write():
    model = _quantized("round")
    report = gradflow.patch(model, batch(model))
    (advice,) = [a for a in report.extra["advice"] if "graph-break" in a["answers"]]
    assert "give round() a straight-through estimator, e.g. y = x + (torch.round(x) - x).detach()" \
        in advice["changes"][0]
