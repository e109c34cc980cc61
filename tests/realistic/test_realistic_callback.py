"""GradFlowCallback in the scripts' own trainers: with raise_on_error, a broken script's `train()` raises
GradflowError naming the cause (before its first step when the pre-flight sees it; at the first step's check when
only a Trainer subclass's compute_loss shows it); a warning is reported and the run goes on; a healthy script
trains with no finding. The pre-flight's Report keeps the coverage invariant."""

from __future__ import annotations

import pytest

from gradflow import GradFlowCallback
from gradflow.errors import GradflowError
from realistic_cases import CASES, params, train_and_watch
from tests.helpers.coverage import assert_coverage

pytestmark = pytest.mark.slow  # every test runs the script's own Trainer.train()


@pytest.mark.parametrize("case", params(CASES, only=lambda c: c.slug is not None and c.severity == "error", bugs={}),
                         ids=str)
def test_broken_script_raises_before_its_first_step(case, tmp_path):
    trainer = case.build(tmp_path)
    callback = GradFlowCallback(raise_on_error=True)
    trainer.add_callback(callback)
    outcome = train_and_watch(trainer)
    assert isinstance(outcome.error, GradflowError), repr(outcome.error)
    slugs = [f.slug for f in outcome.error.findings]
    assert case.callback_slug in slugs, slugs
    assert {f.slug for f in callback.findings} >= set(slugs)
    if callback.preflight_report is not None:
        assert_coverage(callback.preflight_report)
    # raised before the first optimizer step: not one weight moved
    assert not outcome.moved and not outcome.other_moved
    if case.callback is None:  # the pre-flight saw it, where the probe sees it: no step was taken
        assert not outcome.losses and callback.stopped_at == 0
        (found,) = [f for f in outcome.error.findings if f.slug == case.slug]
        assert found.location == case.location, found
    else:  # only the real step shows it (a Trainer subclass's compute_loss): named at the first step's check
        assert callback.stopped_at == 1, callback.stopped_at


@pytest.mark.parametrize("case", params(CASES, only=lambda c: c.slug is not None and c.severity == "warning"),
                         ids=str)
def test_a_warning_is_said_before_the_first_step_and_the_run_goes_on(case, tmp_path):
    """The parameters the warning names get no gradient and never move: the step checks do not say so again as
    errors (grad-missing-in-training, adapter-not-updated at moved_at_step) and the run trains to the end."""
    trainer = case.build(tmp_path)
    callback = GradFlowCallback(raise_on_error=True, check_every=1, moved_at_step=3)
    trainer.add_callback(callback)
    outcome = train_and_watch(trainer)
    assert outcome.error is None, repr(outcome.error)
    assert len(outcome.losses) == 3  # a warning does not stop the run
    (found,) = [f for f in callback.findings if f.slug == case.slug]
    assert found.severity == "warning" and found.location == case.location, found
    assert case.fix_word in found.fix.title
    assert not [f.slug for f in callback.findings if f.severity == "error"]
    assert callback.moved_checked and [h["missing"] for h in callback.history] == [0, 0, 0]
    assert_coverage(callback.preflight_report)


@pytest.mark.parametrize("case", params(CASES, only=lambda c: c.slug is None, bugs={}), ids=str)
def test_healthy_script_trains_with_the_callback(case, tmp_path):
    trainer = case.build(tmp_path)
    callback = GradFlowCallback(raise_on_error=True)
    trainer.add_callback(callback)
    outcome = train_and_watch(trainer)
    assert outcome.error is None, repr(outcome.error)
    assert not [f.slug for f in callback.findings if f.severity in ("error", "warning")]
    assert callback.preflight_report is not None  # the pre-flight did run
    assert_coverage(callback.preflight_report)
    assert outcome.moved == outcome.watched
