"""grad-all-zero: every trainable parameter's gradient is exactly zero."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.helpers.builders import (assert_fires, assert_healthy, assert_silent, base, batch, lora, probe, tiny_batch,
                                    tiny_lm)

SLUG = "grad-all-zero"


def _weighted_loss(weights_of):
    """A Trainer-style compute_loss weighting each token's loss by weights a collator built."""

    def loss_fn(model, data):
        logits = model(input_ids=data["input_ids"])["logits"][:, :-1]
        labels = data["labels"][:, 1:]
        per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        weights = weights_of(labels).flatten()
        return (per_token * weights).sum() / weights.sum().clamp(min=1)

    return loss_fn


def _zeros_like_ids(labels):
    weights = torch.zeros_like(labels)  # int64, like the ids: 0.5 is truncated to 0
    weights[:] = 0.5
    return weights


def test_fires_on_token_weights_truncated_to_zero():
    model = lora()
    report = probe(model, batch(model), loss_fn=_weighted_loss(_zeros_like_ids))
    finding = assert_fires(report, SLUG)
    assert "exactly 0.0" in finding.message
    assert len(finding.params) == sum(p.requires_grad for p in report.snapshot.params)
    assert finding.fix.applicability == "display-only"
    assert_silent(report, "grad-missing-unexplained", "lora-zero-init")


def test_fires_on_a_loss_scaled_by_a_zero_coefficient():
    """An auxiliary-loss coefficient meant for another term multiplies the whole loss: 0.0 * loss."""
    model = tiny_lm(freeze=False)
    coefficient = 0.0

    def loss_fn(m, data):
        return coefficient * m(**data)["loss"]

    report = probe(model, tiny_batch(), loss_fn=loss_fn)
    finding = assert_fires(report, SLUG)
    assert report.loss["value"] == 0.0 and report.loss["requires_grad"] is True
    assert set(finding.params) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_fires_on_a_full_finetune_with_a_zero_mask():
    model = base()
    mask_all_zero = lambda labels: (labels < 0).float()  # noqa: E731  (no label is negative: every weight 0)
    report = probe(model, batch(model), loss_fn=_weighted_loss(mask_all_zero))
    assert_fires(report, SLUG)


# --- stays silent ------------------------------------------------------------------------------------------------
def test_silent_on_float_token_weights():
    model = lora()
    report = probe(model, batch(model), loss_fn=_weighted_loss(lambda labels: torch.full_like(labels, 0.5,
                                                                                                dtype=torch.float)))
    assert_silent(report, SLUG)
    assert_healthy(report)


def test_silent_when_every_label_is_masked():
    """no-supervised-tokens names that cause; grad-all-zero would only repeat it."""
    model = lora()
    data = batch(model)
    data["labels"][:] = -100
    report = probe(model, data)
    assert_silent(report, SLUG)
    assert_fires(report, "no-supervised-tokens")


def test_silent_on_a_fresh_lora():
    model = lora()
    report = probe(model, batch(model))
    assert_silent(report, SLUG)
    assert_healthy(report)
