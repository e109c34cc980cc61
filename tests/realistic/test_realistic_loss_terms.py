"""A distillation term computed without a gradient (distill_no_grad.py) and its fix (distill.py): without gradflow
the term changes the logged loss and not one weight; gradflow's API and CLI name it, and stay silent on the fix.

GradFlowCallback probes the model with its own loss, not a Trainer subclass's compute_loss: it cannot see the term,
and says nothing (no false positive either way)."""

from __future__ import annotations

import pytest
import torch

import gradflow as gf
from gradflow import GradFlowCallback
from realistic_cases import HERE, load, train_and_watch
from tests.helpers.cli import invoke
from tests.helpers.coverage import assert_coverage

SLUG = "loss-term-no-grad"
pytestmark = pytest.mark.slow  # real Trainers


def _weights(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_without_gradflow_the_term_trains_nothing(tmp_path):
    """alpha=0.5 and alpha=0: different logged losses, bit-identical weights after three steps."""
    with_term = load("distill_no_grad").build(str(tmp_path / "a"), alpha=0.5)
    a = train_and_watch(with_term)
    without = load("distill_no_grad").build(str(tmp_path / "b"), alpha=0.0)  # built after: the same RNG for dropout
    b = train_and_watch(without)
    assert a.error is None and b.error is None
    assert a.moved == a.watched  # the run looks healthy: every weight moves
    assert a.losses != b.losses and all(x > y for x, y in zip(a.losses, b.losses))
    wa, wb = _weights(with_term), _weights(without)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    # the fixed script: the same term now changes what the student learns
    fixed = load("distill").build(str(tmp_path / "c"), alpha=0.5)
    train_and_watch(fixed)
    assert not all(torch.equal(wa[n], w) for n, w in _weights(fixed).items())


@pytest.mark.parametrize("script", ["distill_no_grad", "distill"])
def test_api_and_cli(script, tmp_path, monkeypatch):
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "cli"))
    api = gf.probe(load(script).build(str(tmp_path / "api")))
    assert_coverage(api)
    run = invoke("probe-backward", f"{HERE / script}.py:build", "--format", "json")
    assert run.code == 0, run.stderr[-2000:]
    cli = run.json()["findings"]
    assert [(f.slug, f.message) for f in api.findings] == [(f["slug"], f["message"]) for f in cli]
    if script == "distill":
        assert not cli, cli
        return
    (finding,) = cli
    assert finding["slug"] == SLUG and finding["severity"] == "warning" and finding["location"] is None
    # the addition and the line where the KL lost its gradient, in the user's script
    source = (HERE / f"{script}.py").read_text().splitlines()
    added = 1 + next(i for i, line in enumerate(source) if "loss = outputs.loss + self.alpha * kd" in line)
    computed = 1 + next(i for i, line in enumerate(source) if "kd = F.kl_div(" in line)
    assert f"distill_no_grad.py:{added} has no gradient" in finding["message"], finding["message"]
    assert "under torch.no_grad() from the model output (at " \
        in finding["message"] and f"distill_no_grad.py:{computed})" in finding["message"], finding["message"]


def test_trainer_label_smoothing_and_callback_stay_silent(tmp_path):
    """Label smoothing from TrainingArguments (the Trainer's LabelSmoother) is no term without a gradient."""
    from transformers import Trainer

    base = load("distill").build(str(tmp_path / "base"))
    base.args.label_smoothing_factor = 0.1
    trainer = Trainer(model=base.model, args=base.args, train_dataset=base.train_dataset,
                      data_collator=base.data_collator)
    assert trainer.label_smoother is not None
    smoothed = gf.probe(trainer)
    assert_coverage(smoothed)
    assert SLUG not in smoothed.slugs()
    callback = GradFlowCallback(raise_on_error=True)
    broken = load("distill_no_grad").build(str(tmp_path / "cb"))
    broken.add_callback(callback)
    assert train_and_watch(broken).error is None
    assert not [f for f in callback.findings if f.severity in ("error", "warning")]
    assert_coverage(callback.preflight_report)
