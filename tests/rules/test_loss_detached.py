"""loss-detached: the loss does not depend on the model output (a hand-set leaf, or only an auxiliary term)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.helpers.builders import assert_fires, assert_silent, batch, lora, probe, tiny_batch, tiny_lm

SLUG = "loss-detached"


def _lm_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def _assert_detached(report, phrase: str):
    finding = assert_fires(report, SLUG, location=None)
    assert phrase in finding.message
    # the model itself is fine: no module is blamed for the missing gradients
    assert_silent(report, "graph-break", "reentrant-checkpoint-no-input-grad", "trainable-param-unused")
    assert all(p.grad in ("none", "zero") for p in report.snapshot.params if p.requires_grad)
    return finding


def test_requires_grad_set_by_hand_on_the_loss():
    """The classic 'fix' for 'element 0 of tensors does not require grad': a detached leaf."""
    model = lora()

    def loss_fn(m, data):
        return m(**data).loss.detach().requires_grad_(True)

    report = probe(model, batch(model), loss_fn=loss_fn)
    _assert_detached(report, "leaf tensor whose requires_grad was set by hand")
    assert report.loss["requires_grad"] is True and report.loss["grad_fn"] is None


def test_recomputed_from_detached_logits_plus_a_zero_term():
    """The loss recomputed from detached logits, with `0 * sum(params)` added so backward stops raising."""
    model = lora()

    def loss_fn(m, data):
        logits = m(input_ids=data["input_ids"]).logits.detach()
        zero = sum(p.sum() for p in m.parameters() if p.requires_grad) * 0.0
        return _lm_loss(logits, data["labels"]) + zero

    report = probe(model, batch(model), loss_fn=loss_fn)
    _assert_detached(report, "only an auxiliary term connects it")
    assert all(p.grad == "zero" for p in report.snapshot.params if p.requires_grad)


def test_custom_model_loss_from_a_detached_copy():
    """A custom module's loss_fn takes its logits from a .detach()ed copy (e.g. kept for logging)."""
    model = tiny_lm(freeze=False)

    def loss_fn(m, data):
        out = m(input_ids=data["input_ids"])
        return _lm_loss(out["logits"].detach().clone(), data["labels"])

    report = probe(model, tiny_batch(), loss_fn=loss_fn)
    _assert_detached(report, "computed from a detached copy of the model output")
    assert report.loss["requires_grad"] is False


def test_loss_computed_without_running_the_model():
    model = lora()

    def loss_fn(m, data):
        return torch.tensor(2.5, requires_grad=True) * 1.0

    report = probe(model, batch(model), loss_fn=loss_fn)
    _assert_detached(report, "without running the model")


# --- stays silent -------------------------------------------------------------------------------------------------
def test_silent_with_an_auxiliary_term_beside_the_real_loss():
    """A real loss plus an L2 penalty on the adapters: both connect."""
    model = lora()

    def loss_fn(m, data):
        logits = m(input_ids=data["input_ids"]).logits
        l2 = sum((p ** 2).sum() for n, p in m.named_parameters() if p.requires_grad)
        return _lm_loss(logits, data["labels"]) + 1e-4 * l2

    report = probe(model, batch(model), loss_fn=loss_fn)
    assert_silent(report, SLUG)
    assert report.loss["reaches_output"] is True


def test_silent_for_a_custom_model_loss_from_its_logits():
    model = tiny_lm(freeze=False)
    report = probe(model, tiny_batch(), loss_fn=lambda m, d: _lm_loss(m(input_ids=d["input_ids"])["logits"], d["labels"]))
    assert_silent(report, SLUG)
    assert all(p.grad == "ok" for p in report.snapshot.params if p.requires_grad)


def test_silent_for_the_models_own_loss():
    model = lora()
    report = probe(model, batch(model))
    assert_silent(report, SLUG)
    assert report.loss["reaches_output"] is True


def test_silent_when_checkpointing_leaves_the_loss_without_grad_fn():
    """A loss without grad_fn because of a reentrant cut is another finding's business."""
    from gradflow.demos import seed_bug

    setup = seed_bug()
    report = probe(setup["model"], setup["batch"])
    assert_silent(report, SLUG)
    assert_fires(report, "reentrant-checkpoint-no-input-grad")
