"""The library entries each command calls: `inspect`, `probe` and `patch` of a MODEL spec or of a module.

A module (or a Trainer) goes straight to gradflow.api. A MODEL spec (a preset, a directory, a config.json, a hub id,
`file.py:func`) is loaded the way every command loads it (gradflow.setup.load), batched, and then probed; with
`dry_run` it is judged on a toy-width twin without weights (gradflow.dryrun); with `wrapper` ("ddp" or "fsdp",
under torchrun) it is probed through that wrapper on every rank (gradflow.distributed). These are what
`gradflow.inspect`, `gradflow.probe` and `gradflow.patch` are, so a Python user reaches every CLI option by keyword.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ContextManager

from gradflow import api, distributed, world
from gradflow.dryrun import dry_run as judge_twin, refuse_flags
from gradflow.errors import GradflowError
from gradflow.probing.steps import check_steps
from gradflow.report import Report
from gradflow.report.ranks import speak_for_ranks
from gradflow.report.render.source_lines import source_lines, trainer_settings
from gradflow.setup.options import SetupOptions
from gradflow.setup.load import load_batch
from gradflow.setup.sources import Kind, Setup

Status = Callable[[str], ContextManager]


def _no_status(_text: str) -> ContextManager:
    return contextlib.nullcontext()


def inspect(model: Any, batch: Any = None, *, static: bool = False, loss_fn: Callable | None = None,
            trainable: str | None = None, setup: SetupOptions | None = None, data: str | None = None,
            batch_size: int = 2, seq_len: int = 32, seed: int = 0, dry_run: bool = False,
            status: Status = _no_status) -> Report:
    """Describe a model module by module (gradflow.api.inspect), or a MODEL spec loaded as `setup` says.

    Args:
        model: an nn.Module or Trainer (see gradflow.api.inspect), or a MODEL spec string.
        batch, static, loss_fn, trainable: as for gradflow.api.inspect.
        setup: how to build a spec (LoRA, quantization, checkpointing, dtype, device); default SetupOptions().
        data, batch_size, seq_len, seed: the batch for a spec: JSONL samples, or synthetic token ids.
        dry_run: load no weights: judge the setup on a toy-width twin of the spec's config.
        status: `status(text)` is a context manager around each slow stage (the CLI's spinner).
    """
    if not isinstance(model, str):
        _module_only(dry_run=dry_run, data=data)
        return api.inspect(model, batch, static=static, loss_fn=loss_fn, trainable=trainable)
    opts = _options(setup, seed, trainable)
    if dry_run:
        with status(f"dry run of {model} (no weights)"):
            return judge_twin(model, opts, command="inspect", static=static, batch_size=batch_size,
                              seq_len=seq_len, seed=seed, data=data)
    loaded, batch = _load(model, opts, status, data=data, batch_size=batch_size, seq_len=seq_len, seed=seed)
    report = api.inspect(loaded.model, batch, static=static, loss_fn=loaded.loss_fn, trainable=loaded.trainable)
    speak_for_ranks(report)  # a Trainer factory under torchrun started the process group: rank 0 speaks
    return _noted(_pointed(report, model), model, loaded)


def _noted(report: Report, spec: str, loaded: Setup) -> Report:
    """A factory that returns the model while its file sets up a Trainer that turns on checkpointing, mixed
    precision or PEFT inside train(): the probe saw the model without them, and says so in one note."""
    settings = trainer_settings(spec) if loaded.kind == Kind.FACTORY else []
    if settings:
        what = " and ".join(dict.fromkeys(w for w, _, _ in settings))
        said = "; ".join(f"{code} at {where}" for _, code, where in settings)
        report.notes.append(f"{spec} returns the model, and its file turns on {what} through a Trainer ({said}), "
                            "which this probe of the model alone did not see: probe the Trainer (return it from the "
                            "factory) to see the run as it will execute")
    return report


def _pointed(report: Report, spec: str) -> Report:
    """A Trainer-aware fix (`fix.here`) with the line of the factory's file that builds the TrainingArguments, found
    by the same source scan that places SARIF results."""
    here = [f for f in report.findings if f.fix is not None and f.fix.here]
    lines = source_lines(spec) if here else None
    where = lines.where("args") if lines is not None else None
    for f in here if where else ():
        f.fix.here = f"{f.fix.here} at {where}"
    return report


def probe(model: Any, batch: Any = None, *, loss_fn: Callable | None = None, optimizer=None,
          trainable: str | None = None, check_gc: bool = False, steps: int = 0, lr_scheduler=None,
          setup: SetupOptions | None = None, data: str | None = None, batch_size: int = 2, seq_len: int = 32,
          seed: int = 0, packed: bool = False, dry_run: bool = False, wrapper: str | None = None,
          status: Status = _no_status) -> Report:
    """One forward and backward (gradflow.api.probe), of a module or of a MODEL spec loaded as `setup` says.

    Args:
        model: an nn.Module or Trainer (see gradflow.api.probe), or a MODEL spec string.
        batch, loss_fn, optimizer, trainable, check_gc, steps, lr_scheduler: as for gradflow.api.probe.
        setup, data, batch_size, seq_len, seed, dry_run, status: as for `inspect`.
        packed: probe a packed batch (the samples in one row, position ids restarting per sample) and check that
            no sample's loss reaches another's inputs (packed-attention-leak).
        wrapper: "ddp" or "fsdp": under torchrun, probe through DistributedDataParallel or FSDP2 on every rank
            (the same batch) and return the report gathered across ranks.
    """
    if not isinstance(model, str):
        _module_only(dry_run=dry_run, data=data, packed=packed, wrapper=wrapper)
        return api.probe(model, batch, loss_fn=loss_fn, optimizer=optimizer, trainable=trainable,
                         check_gc=check_gc, steps=steps, lr_scheduler=lr_scheduler)
    steps = check_steps(steps) if steps else 0
    opts = _options(setup, seed, trainable)
    launch = None
    if wrapper is not None:
        launch = world.start(wrapper, refused={"--dry-run": dry_run, "--check-gc": check_gc, "--steps": steps,
                                               "--packed": packed})
    if dry_run:
        refuse_flags({"--check-gc": check_gc, "--steps": steps, "--packed": packed})
        with status(f"dry run of {model} (no weights)"):
            return judge_twin(model, opts, command="probe-backward", batch_size=batch_size, seq_len=seq_len,
                              seed=seed, data=data)
    adopt = (lambda s: distributed.adopt(s, launch)) if launch is not None else None
    loaded, batch = _load(model, opts, status, data=data, batch_size=batch_size, seq_len=seq_len, seed=seed,
                          packed=packed, adopt=adopt)
    with status("probing forward and backward"):
        if launch is not None:
            report = distributed.probe(loaded, batch, launch)
        else:
            report = api.probe(loaded.model, batch, loss_fn=loaded.loss_fn, optimizer=loaded.optimizer,
                               trainable=loaded.trainable, check_gc=check_gc, steps=steps,
                               lr_scheduler=loaded.lr_scheduler)
            speak_for_ranks(report)  # a Trainer factory under torchrun started the process group: rank 0 speaks
    return _noted(_pointed(report, model), model, loaded)


def patch(model: Any, batch: Any = None, *, loss_fn: Callable | None = None, optimizer=None,
          trainable: str | None = None, unsafe: bool = False, dry_run: bool = False,
          setup: SetupOptions | None = None, data: str | None = None, batch_size: int = 2, seq_len: int = 32,
          seed: int = 0, status: Status = _no_status, loaded: Callable[[Setup], None] | None = None) -> Report:
    """Probe, fix, probe again (gradflow.api.patch), on a module or on a MODEL spec loaded as `setup` says.

    Args:
        model, batch, loss_fn, optimizer, trainable, unsafe: as for gradflow.api.patch.
        dry_run: plan only; nothing is changed (the model is loaded: patch needs its weights).
        setup, data, batch_size, seq_len, seed, status: as for `inspect`.
        loaded: called with the loaded Setup before the patch (the CLI checks where `--save` will write).
    """
    if not isinstance(model, str):
        _module_only(data=data)
        return api.patch(model, batch, loss_fn=loss_fn, optimizer=optimizer, trainable=trainable, unsafe=unsafe,
                         dry_run=dry_run)
    opts = _options(setup, seed, trainable)
    spec_setup, batch = _load(model, opts, status, data=data, batch_size=batch_size, seq_len=seq_len, seed=seed)
    if loaded is not None:
        loaded(spec_setup)
    with status("probing, patching and probing again"):
        return api.patch(spec_setup.model, batch, loss_fn=spec_setup.loss_fn, optimizer=spec_setup.optimizer,
                         trainable=spec_setup.trainable, unsafe=unsafe, dry_run=dry_run)


def _options(setup: SetupOptions | None, seed: int, trainable: str | None) -> SetupOptions:
    """The caller's options (never changed in place: they may be reused), with `trainable` over theirs."""
    opts = setup if setup is not None else SetupOptions(seed=seed)
    return dataclasses.replace(opts, trainable=trainable) if trainable is not None else opts


def _load(spec: str, opts: SetupOptions, status: Status, **batch_args) -> tuple[Setup, Any]:
    with status(f"loading {spec}"):
        return load_batch(spec, opts, **batch_args)


def _module_only(**given) -> None:
    """Options that need a MODEL spec (the loader builds the batch, the twin, the wrapper): refused for a module."""
    named = [name for name, value in given.items() if value]
    if named:
        raise GradflowError(f"{', '.join(named)} need a MODEL spec string (a preset, directory, config or "
                            "FILE.py:FUNC), and a model object was given",
                            "Pass the spec, or build the batch yourself and pass it with the model")
