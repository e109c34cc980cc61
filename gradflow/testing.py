"""A test helper: fail a test when gradients do not reach what you mean to train.

    from gradflow.testing import assert_gradient_flow

    def test_lora_setup_trains():
        model = build_my_model()                 # or the Trainer / SFTTrainer you train with
        assert_gradient_flow(model, trainable="lora_")

It runs gradflow's probe (one forward and backward, the model left as found) and raises AssertionError listing
each finding at or above `fail_on` (code, slug, module, message, fix), so the test log says what broke and how to
fix it. Plain text, no colour: it reads the same in a terminal and in a CI log.
"""

from __future__ import annotations

from typing import Any, Callable

import gradflow
from gradflow.choices import FailOn
from gradflow.finding import fails_on
from gradflow.setup.sources import setup_from_factory_result

__all__ = ["assert_gradient_flow", "format_findings"]


def assert_gradient_flow(model_or_trainer: Any, batch: Any = None, trainable: str | None = None, *,
                         fail_on: str = "error", loss_fn: Callable | None = None, optimizer: Any = None):
    """Probe a training setup and fail when it has findings at or above `fail_on`.

    Args:
        model_or_trainer: an nn.Module (a transformers model, a PeftModel, your own module); a
            `transformers.Trainer` or TRL `SFTTrainer` (judged as its `train()` would run it: its checkpointing,
            PEFT wrapping, first batch and optimizer); or a factory-style dict: `{"model": ..., "batch": ...,
            "loss_fn": ..., "optimizer": ..., "trainable": ...}` or `{"trainer": ..., "trainable": ...}`.
        batch: inputs for the probe; None uses the dict's or Trainer's batch, else synthesises token ids and labels.
        trainable: regex naming the parameters you intend to train (a frozen match is an error).
        fail_on: "error" (default), "warning", or "never" (only report). Info findings never fail.
        loss_fn: `loss_fn(model, batch) -> loss`, when the model does not compute its own loss.
        optimizer: the optimizer you train with, to check that it holds every trainable parameter.

    Returns:
        The probe's Report, when no finding is at or above `fail_on`.

    Raises:
        AssertionError: findings at or above `fail_on`, rendered one block each.
        ValueError: `fail_on` is not one of "error", "warning", "never".
        gradflow.errors.GradflowError: unusable input (an invalid `trainable` regex, a dict without a model).
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not this helper's

    if fail_on not in FailOn.values():  # raised here, at the call: the test log shows the caller's line alone
        raise ValueError(f"assert_gradient_flow(fail_on={fail_on!r}): fail_on must be one of "
                         f"{', '.join(map(repr, FailOn.values()))}")
    threshold = str(fail_on)
    target, batch, trainable, loss_fn, optimizer = _unpack(model_or_trainer, batch, trainable, loss_fn, optimizer)
    report = gradflow.probe(target, batch, loss_fn=loss_fn, optimizer=optimizer, trainable=trainable)
    if report.fails(threshold):
        raise AssertionError(format_findings(report, threshold))
    return report


def _unpack(obj, batch, trainable, loss_fn, optimizer):
    """A factory-style dict spreads into its parts; what the caller passes explicitly wins."""
    if not isinstance(obj, dict):
        return obj, batch, trainable, loss_fn, optimizer

    setup = setup_from_factory_result(obj, "the dict passed to assert_gradient_flow")
    return (setup.model, batch if batch is not None else setup.batch, trainable or setup.trainable,
            loss_fn or setup.loss_fn, optimizer if optimizer is not None else setup.optimizer)


def format_findings(report, fail_on: str = "error") -> str:
    """The failure message: what was probed, then one block per finding at or above `fail_on`."""
    failing = [f for f in report.findings if fails_on(f.severity, fail_on)]
    below = sorted({f.slug for f in report.findings if f not in failing})
    lines = [f"gradflow: {len(failing)} finding{'s' if len(failing) != 1 else ''} at or above {fail_on!r} in "
             f"{report.model.get('class', 'the model')} ({_summary(report)})"]
    for f in failing:
        lines.append(f"  {f.severity} {f.code} {f.slug}" + (f" at {f.location}" if f.location else ""))
        lines.append(f"      {f.message}")
        if f.fix:
            lines.append(f"      fix ({f.fix.applicability}): {f.fix.title}")
    if below:
        lines.append(f"  below {fail_on!r}: {', '.join(below)}")
    for code in dict.fromkeys(f.code for f in failing):
        lines.append(f"  more: gradflow explain {code}")
    return "\n".join(lines)


def _summary(report) -> str:
    """loss grad_fn and the trainable tensors by gradient class, as the CLI's summary says them."""
    parts = []
    loss = report.loss or {}
    if loss.get("error"):
        parts.append(f"the {loss.get('error_phase') or 'forward'} raised: {loss['error']}")
    elif report.loss is not None:
        parts.append(f"loss grad_fn {loss.get('grad_fn') or 'none'}")
    p = report.params
    if p.get("with_grad") is not None:
        ok = p["with_grad"] - p["zero_grad"] - p["nonfinite_grad"]
        parts.append(f"trainable tensors {p['trainable']}: {ok} ok, {p['none_grad']} none, {p['zero_grad']} zero, "
                     f"{p['nonfinite_grad']} non-finite")
    return "; ".join(parts) or "not probed"
