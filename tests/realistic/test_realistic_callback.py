"""GradFlowCallback in the scripts' own trainers: with raise_on_error, a broken script's `train()` raises
GradflowError before its first step, naming the cause; a healthy one trains with no finding."""

from __future__ import annotations

import pytest

from gradflow import GradFlowCallback
from gradflow.errors import GradflowError
from realistic_cases import CASES, params, train_and_watch

pytestmark = pytest.mark.slow  # every test runs the script's own Trainer.train()


@pytest.mark.parametrize("case", params(CASES, only=lambda c: c.slug is not None, bugs={}), ids=str)
def test_broken_script_raises_before_its_first_step(case, tmp_path):
    trainer = case.build(tmp_path)
    callback = GradFlowCallback(raise_on_error=True)
    trainer.add_callback(callback)
    outcome = train_and_watch(trainer)
    assert isinstance(outcome.error, GradflowError), repr(outcome.error)
    slugs = [f.slug for f in outcome.error.findings]
    assert case.callback_slug in slugs, slugs
    assert {f.slug for f in callback.findings} >= set(slugs)
    if case.callback_slug == case.slug:  # the pre-flight saw it: no step was taken
        assert not outcome.moved and not outcome.other_moved and not outcome.losses


@pytest.mark.parametrize("case", params(CASES, only=lambda c: c.slug is None, bugs={}), ids=str)
def test_healthy_script_trains_with_the_callback(case, tmp_path):
    trainer = case.build(tmp_path)
    callback = GradFlowCallback(raise_on_error=True)
    trainer.add_callback(callback)
    outcome = train_and_watch(trainer)
    assert outcome.error is None, repr(outcome.error)
    assert not [f.slug for f in callback.findings if f.severity in ("error", "warning")]
    assert callback.preflight_report is not None  # the pre-flight did run
    assert outcome.moved == outcome.watched
