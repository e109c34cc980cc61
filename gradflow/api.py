"""The Python API: inspect, probe and patch. Each returns a Report whose to_dict() is the CLI's JSON."""

from __future__ import annotations

from typing import Any, Callable

from gradflow.errors import GradflowError
from gradflow.report import Report, build_report


def check_trainable_regex(model, trainable: str | None) -> None:
    """A --trainable regex must be valid and name at least one parameter."""
    if trainable is None:
        return
    from gradflow.sources import compile_regex

    pattern = compile_regex(trainable)
    names = [n for n, _ in model.named_parameters()]
    if not any(pattern.search(n) for n in names):
        example = names[len(names) // 2] if names else "(none)"
        raise GradflowError(f"--trainable {trainable!r} matches no parameter of {type(model).__name__}",
                            f"Fix the pattern; parameter names look like {example!r}")


def snapshot(model, batch=None, *, loss_fn=None, optimizer=None, trainable=None, backward=True, static=False):
    """Trace (and probe) `model` once; the Snapshot that rules read."""
    from gradflow.probing import probe as run_probe

    check_trainable_regex(model, trainable)
    return run_probe(model, batch, loss_fn=loss_fn, optimizer=optimizer, trainable=trainable,
                     backward=backward, static=static)


def inspect(model, batch: Any = None, *, static: bool = False, loss_fn: Callable | None = None,
            trainable: str | None = None) -> Report:
    """Describe `model` module by module; unless `static`, trace one train-mode forward (no backward).

    Args:
        model: the nn.Module to look at (a PeftModel, a transformers model, or your own module).
        batch: inputs for the forward; None synthesises token ids and labels.
        static: describe parameters, hooks and checkpointing only, without running the model.
        loss_fn: `loss_fn(model, batch) -> loss`, when the model does not compute its own loss.
        trainable: regex naming the parameters you intend to train.

    Returns:
        A Report with per-module rows and the findings a forward can show (the first cut among them).
    """
    from gradflow.rules import run_rules

    snap = snapshot(model, batch, loss_fn=loss_fn, trainable=trainable, backward=False, static=static)
    return build_report(snap, run_rules(snap), "inspect")


def probe(model, batch: Any = None, *, loss_fn: Callable | None = None, optimizer=None,
          trainable: str | None = None) -> Report:
    """Run one forward and backward in train mode and classify every trainable parameter's gradient.

    The model is left as found: requires_grad flags, gradients, train/eval mode, hooks and RNG state.

    Args:
        model: the nn.Module to probe.
        batch: inputs; None synthesises token ids inside the vocab, with labels.
        loss_fn: `loss_fn(model, batch) -> loss`; by default the model's own `.loss`.
        optimizer: the optimizer you will train with, to check it holds every trainable parameter.
        trainable: regex naming the parameters you intend to train.

    Returns:
        A Report: loss state, per-parameter gradient classes (ok / none / zero / nonfinite), findings.
    """
    from gradflow.rules import run_rules

    snap = snapshot(model, batch, loss_fn=loss_fn, optimizer=optimizer, trainable=trainable)
    return build_report(snap, run_rules(snap), "probe-backward")


def patch(model, batch: Any = None, *, loss_fn: Callable | None = None, optimizer=None,
          trainable: str | None = None, unsafe: bool = False, dry_run: bool = False) -> Report:
    """Probe, apply the fixes that answer the findings, and probe again.

    Args:
        model: the nn.Module to fix in place.
        batch, loss_fn, optimizer, trainable: as for `probe`.
        unsafe: also apply fixes that change what the model learns.
        dry_run: plan only; the model is left bit-identical.

    Returns:
        A Report carrying `.before`, `.after` and `.fixes_applied`.
    """
    from gradflow.fixes.engine import run_patch

    return run_patch(model, batch, loss_fn=loss_fn, optimizer=optimizer, trainable=trainable,
                     unsafe=unsafe, dry_run=dry_run)
