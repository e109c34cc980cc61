"""nonfinite-grad: NaN/Inf in gradients; `location` names the first module where they appear."""

from __future__ import annotations

import math

import torch

from tests.helpers.builders import SqrtGatedBlock, assert_fires, assert_silent, batch, lora, probe, tiny_batch, tiny_lm

SLUG = "nonfinite-grad"


def _gated(eps: float = 0.0):
    model = tiny_lm(freeze=False)
    model.blocks[1] = SqrtGatedBlock(16, eps=eps)
    return model


def test_sqrt_of_zero_in_a_custom_module():
    model = _gated()
    report = probe(model, tiny_batch())
    finding = assert_fires(report, SLUG, location="blocks.1")
    assert finding.params == ["blocks.1.gate"]
    assert report.loss["value"] is not None  # the forward is finite: only the backward blows up
    assert "blocks.1" in finding.message


def test_log_of_an_underflowed_softmax_in_a_custom_loss_fn():
    """log(softmax(x / T)) with a tiny temperature: probabilities underflow to 0, the loss is inf."""
    model = lora()

    def loss_fn(m, data):
        logits = m(input_ids=data["input_ids"]).logits / 1e-4
        probs = torch.softmax(logits[:, :-1], dim=-1)
        picked = probs.gather(-1, data["labels"][:, 1:, None])
        return -torch.log(picked).mean()

    report = probe(model, batch(model), loss_fn=loss_fn)
    finding = assert_fires(report, SLUG)
    # no module output is non-finite: the first module backward reaches with NaN is the last adapter in forward order
    assert finding.location == "base_model.model.model.layers.3.mlp.down_proj.lora_B.default"
    assert "the loss computation itself" in finding.message
    assert not math.isfinite(report.snapshot.loss.value)


def test_nan_weight_from_a_corrupted_checkpoint():
    """A NaN that slipped into a frozen weight: the forward itself is non-finite from that module on."""
    model = lora()
    with torch.no_grad():
        model.get_base_model().model.layers[1].mlp.up_proj.base_layer.weight[0, 0] = float("nan")
    report = probe(model, batch(model))
    finding = assert_fires(report, SLUG, location="base_model.model.model.layers.1.mlp.up_proj.base_layer")
    # the module's arithmetic is not the fault: its weight already holds the NaN
    assert ("is already non-finite: its weights hold NaN/Inf (base_model.model.model.layers.1.mlp.up_proj.base_layer"
            ".weight), from before this step") in finding.message


def test_half_precision_overflow():
    """A full fine-tune in fp16 whose activations overflow: inf in the forward of the scaled module."""
    model = tiny_lm(freeze=False).half()
    with torch.no_grad():
        model.blocks[0].proj.weight.mul_(1e5)
    report = probe(model, tiny_batch())
    finding = assert_fires(report, SLUG, location="blocks.0.proj")
    assert "already non-finite" in finding.message
    assert_fires(report, "half-precision-trainable-params")  # the root cause of the overflow


# --- stays silent -------------------------------------------------------------------------------------------------
def test_silent_with_an_eps_under_the_sqrt():
    report = probe(_gated(eps=1e-6), tiny_batch())
    assert_silent(report, SLUG)
    assert all(p.grad in ("ok", "zero") for p in report.snapshot.params if p.requires_grad)


def test_silent_with_log_softmax_in_the_loss_fn():
    model = lora()

    def loss_fn(m, data):
        logits = m(input_ids=data["input_ids"]).logits / 1e-4
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        return -logp.gather(-1, data["labels"][:, 1:, None]).mean()

    assert_silent(probe(model, batch(model), loss_fn=loss_fn), SLUG)


def test_silent_for_a_nan_in_a_frozen_weight_the_forward_never_reads():
    """NaN in a row of the embedding no token of the batch uses."""
    model = lora()
    with torch.no_grad():
        model.get_input_embeddings().weight[0] = float("nan")  # id 0: padding, never sampled
    assert_silent(probe(model, batch(model)), SLUG)
