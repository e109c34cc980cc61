"""The Python API: inspect, probe and patch. Each returns a Report whose to_dict() is the CLI's JSON."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

from gradflow.errors import GradflowError
from gradflow.finding import with_hints
from gradflow.fixes import findings_for
from gradflow.fixes.engine import run_patch, verify
from gradflow.forward import batch_or_synthetic
from gradflow.models import is_trainer
from gradflow.probing.backward import probe as run_probe
from gradflow.probing.gc_check import compare
from gradflow.probing.leak import to_dict
from gradflow.probing.steps import check_steps, run_steps
from gradflow.report import Report, build_report
from gradflow.setup.sources import compile_regex
from gradflow.setup.trainer_source import prepared


def check_trainable_regex(model, trainable: str | None) -> None:
    """A --trainable regex must be valid and name at least one parameter."""
    if trainable is None:
        return

    pattern = compile_regex(trainable)
    names = [n for n, _ in model.named_parameters()]
    if not any(pattern.search(n) for n in names):
        example = names[len(names) // 2] if names else "(none)"
        raise GradflowError(f"--trainable {trainable!r} matches no parameter of {type(model).__name__}",
                            f"Fix the pattern; parameter names look like {example!r}")


@contextlib.contextmanager
def _target(model, batch, loss_fn, optimizer):
    """What to probe: the model as given, or, for a Trainer, the setup its `train()` would start with."""
    if not is_trainer(model):
        yield model, batch, loss_fn, optimizer, None
        return
    with prepared(model) as setup:
        yield (setup.model, batch if batch is not None else setup.batch, loss_fn or setup.loss_fn,
               optimizer if optimizer is not None else setup.optimizer, setup)


def snapshot(model, batch=None, *, loss_fn=None, optimizer=None, trainable=None, backward=True, static=False,
             setup=None):
    """Trace (and probe) `model` once; the Snapshot that rules read."""
    check_trainable_regex(model, trainable)
    snap = run_probe(model, batch, loss_fn=loss_fn, optimizer=optimizer, trainable=trainable,
                     backward=backward, static=static)
    if setup is not None:
        snap.trainer = setup.source
        snap.ddp_find_unused = setup.find_unused_parameters
        snap.ddp_static_graph = setup.static_graph
        if setup.fsdp_plan and not snap.wrappers:  # the FSDP1 units its train() will build under torchrun
            snap.wrappers = list(setup.fsdp_plan)
    return snap


def inspect(model, batch: Any = None, *, static: bool = False, loss_fn: Callable | None = None,
            trainable: str | None = None) -> Report:
    """Describe `model` module by module; unless `static`, trace one train-mode forward (no backward).

    Args:
        model: the nn.Module to look at (a PeftModel, a transformers model, or your own module), or a
            `transformers.Trainer` (TRL's SFTTrainer included): its model as `train()` would prepare it.
        batch: inputs for the forward; None synthesises token ids and labels (a Trainer's first batch for one).
        static: describe parameters, hooks and checkpointing only, without running the model.
        loss_fn: `loss_fn(model, batch) -> loss`, when the model does not compute its own loss.
        trainable: regex naming the parameters you intend to train.

    Returns:
        A Report with per-module rows and the findings a forward can show (the first cut among them).
    """
    with _target(model, batch, loss_fn, None) as (model, batch, loss_fn, _, setup):
        snap = snapshot(model, batch, loss_fn=loss_fn, trainable=trainable, backward=False, static=static,
                        setup=setup)
    return build_report(snap, with_hints(findings_for(snap), getattr(setup, "hints", None)), "inspect")


def probe(model, batch: Any = None, *, loss_fn: Callable | None = None, optimizer=None,
          trainable: str | None = None, check_gc: bool = False, steps: int = 0, lr_scheduler=None) -> Report:
    """Run one forward and backward in train mode and classify every trainable parameter's gradient.

    The model is left as found: requires_grad flags, gradients, train/eval mode, hooks and RNG state.

    Args:
        model: the nn.Module to probe, or a `transformers.Trainer` (TRL's SFTTrainer included). A Trainer is
            judged as `train()` will run it: gradflow drives its `train()` up to `on_train_begin` (checkpointing
            from its args, PEFT wrapping, its optimizer) and probes the first batch of its train dataloader with
            its `compute_loss`, then puts the trainer back; no step is taken and nothing is written.
        batch: inputs; None synthesises token ids inside the vocab, with labels (a Trainer's first batch).
        loss_fn: `loss_fn(model, batch) -> loss`; by default the model's own `.loss` (a Trainer's compute_loss).
        optimizer: the optimizer you will train with, to check it holds every trainable parameter (a Trainer's
            own by default).
        trainable: regex naming the parameters you intend to train.
        check_gc: also run the batch with gradient checkpointing on and off and compare every trainable
            gradient (`checkpoint-changes-gradients`); see gradflow.probing.gc_check for how on/off are obtained.
        steps: also take this many real optimizer steps (then put parameters and optimizer state back) and report
            intended parameters that did not move (`param-not-updated`) and a zero learning rate
            (`zero-learning-rate`). The optimizer is `optimizer`, a Trainer's own, else AdamW(lr=1e-3).
        lr_scheduler: the scheduler stepped after each of those steps (a Trainer's own by default).

    Returns:
        A Report: loss state, per-parameter gradient classes (ok / none / zero / nonfinite), findings.
    """
    if steps:
        steps = check_steps(steps)
    with _target(model, batch, loss_fn, optimizer) as (model, batch, loss_fn, optimizer, setup):
        snap = snapshot(model, batch, loss_fn=loss_fn, optimizer=optimizer, trainable=trainable, setup=setup)
        _measure(snap, model, batch, loss_fn, optimizer, setup, check_gc=check_gc, steps=steps,
                 lr_scheduler=lr_scheduler)
    report = build_report(snap, with_hints(findings_for(snap), getattr(setup, "hints", None)), "probe-backward")
    if snap.packed_leak is not None:  # the batch was packed: what the leak check measured, as JSON
        report.packed_check = to_dict(snap.packed_leak)
    return report



def _measure(snap, model, batch, loss_fn, optimizer, setup, *, check_gc: bool, steps: int, lr_scheduler) -> None:
    """The opt-in extra runs (--check-gc, --steps): each fills its own part of the snapshot."""
    if not (check_gc or steps):
        return
    batch = batch_or_synthetic(model, batch, loss_fn)  # the batch the probe synthesised: same seed, same ids
    if check_gc:
        snap.gc_equivalence = compare(model, batch, loss_fn=loss_fn, snap=snap)
    if steps:
        if lr_scheduler is None and setup is not None:
            lr_scheduler = getattr(setup, "lr_scheduler", None)
        source = "trainer" if setup is not None and optimizer is not None and optimizer is setup.optimizer else None
        snap.steps = run_steps(model, batch, steps=steps, loss_fn=loss_fn, optimizer=optimizer,
                               lr_scheduler=lr_scheduler, snap=snap, optimizer_source=source)


def patch(model, batch: Any = None, *, loss_fn: Callable | None = None, optimizer=None,
          trainable: str | None = None, unsafe: bool = False, dry_run: bool = False) -> Report:
    """Probe, apply the fixes that answer the findings, and probe again.

    Args:
        model: the nn.Module to fix in place, or a `transformers.Trainer`: its model is fixed in place, and the
            proof is a fresh probe of the trainer as `train()` will start it (its checkpointing set up again).
        batch, loss_fn, optimizer, trainable: as for `probe`.
        unsafe: also apply fixes that change what the model learns.
        dry_run: plan only; the model is left bit-identical.

    Returns:
        A Report carrying `.before`, `.after` and `.fixes_applied`.
    """
    trainer = model
    with _target(model, batch, loss_fn, optimizer) as (model, batch_, loss_fn_, optimizer_, setup):
        batch_ = batch_or_synthetic(model, batch_, loss_fn_)  # one batch for the probes before and after

        def reprobe() -> Report:
            report = probe(model, batch_, loss_fn=loss_fn_, optimizer=optimizer_, trainable=trainable)
            if setup is not None:  # the fixes see that a Trainer's train() will set the model up again
                report.snapshot.trainer = setup.source
            return report

        report = run_patch(model, batch_, reprobe, loss_fn=loss_fn_, optimizer=optimizer_, trainable=trainable,
                           unsafe=unsafe, dry_run=dry_run)
    if setup is None or dry_run or not report.fixes_applied:
        return report
    _keep_for_train(trainer, report.fixes_applied)
    # the fixes were made on the model as the trainer had prepared it; train() prepares it again, so the proof
    # is a probe of the trainer itself
    return _reproved(report, probe(trainer, batch, loss_fn=loss_fn, optimizer=optimizer, trainable=trainable))


def _keep_for_train(trainer, applied: list[dict]) -> None:
    """A fix that train() would undo goes into the trainer's arguments too: train() turns checkpointing on again
    from TrainingArguments, reentrant unless its kwargs say otherwise."""
    args = trainer.args
    if any(rec["id"] == "non-reentrant-checkpointing" for rec in applied) and args.gradient_checkpointing:
        args.gradient_checkpointing_kwargs = {**(args.gradient_checkpointing_kwargs or {}), "use_reentrant": False}


def _reproved(report: Report, after: Report) -> Report:
    verification = verify(after)
    records = [{**rec, "verified": verification["ok"] and not any(s in after.slugs() for s in rec.get("answers", ()))}
               for rec in report.fixes_applied]
    return dataclasses.replace(report, model=after.model, loss=after.loss, params=after.params,
                               modules=after.modules, findings=after.findings, snapshot=after.snapshot,
                               after=after, fixes_applied=records,
                               patch=dataclasses.replace(report.patch, verification=verification))
