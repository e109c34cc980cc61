"""`gradflow train`: data, model, memory plan, pre-flight (probe → patch → probe), then transformers.Trainer with
GradFlowCallback watching.

There is no home-made training loop: Trainer (accelerate underneath) runs the steps, DDP included. The parts:
options (gradflow.training.options), the data and packing (dataset), the pre-flight (preflight), the memory plan
(plan), the run directory and adapter (outputs), and the Trainer wiring (trainer). This module runs them in order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any

from gradflow.data.audit import write_json_atomic, write_jsonl_atomic
from gradflow.errors import GradflowError
from gradflow.forward import model_device
from gradflow.noise import ignore_known_noise
from gradflow.report import Finding, Fix, Report, finding_line, ranks as _ranks
from gradflow.setup.build import SetupOptions, apply_lora
from gradflow.setup.load import build_setup as build_resolved, check_lora_flags, check_seq_len, resolve_setup
from gradflow.setup.sources import Kind
from gradflow.training import fsdp as _fsdp, so8
from gradflow.training.checkpoint import clear_staging, set_aside
from gradflow.training.compiling import apply as apply_compile
from gradflow.training.dataset import Prepared, prepare_data, probe_batch, read_data, train_dataset  # noqa: F401
from gradflow.training.lock import hold
from gradflow.training.merge import merge
from gradflow.training.options import TrainOptions
from gradflow.training.outputs import (ADAPTER_DIR, CHECKPOINT_DIR, check_output, check_output_path, prepare_output,
                                       rank, save_adapter)
from gradflow.training.plan import make_plan
from gradflow.training.plots import plot_grad_norms
from gradflow.training.preflight import apply_recipe, preflight
from gradflow.training.resume import fingerprint as run_fingerprint, plan as resume_plan
from gradflow.training.signals import StopOnSignal
from gradflow.training.trainer import final_state, make_trainer, prepare_model, resolve_ce
from gradflow.world import bind_local_gpu


# ----- the model --------------------------------------------------------------------------------------------
def build_setup(model: Any, ropts: SetupOptions, opts: TrainOptions, tokenizer=None):
    """MODEL (spec string, Setup or nn.Module) → (Setup, who sets checkpointing), through the loader every command
    uses (gradflow.setup.load), with LoRA and SO(8) adapters applied."""
    setup = resolve_setup(model, ropts)
    if setup.kind == Kind.TRAINER:
        raise GradflowError(f"{setup.source} returns a Trainer: gradflow train builds its own",
                            "Run your trainer with callbacks=[gradflow.GradFlowCallback()], or check it first with "
                            "gradflow probe-backward")
    if tokenizer is not None:
        setup.tokenizer = tokenizer
    builds_lora = setup.kind in (Kind.PRESET, Kind.DIR, Kind.HUB) and ropts.adapter is None
    gc_from = "--gc" if ropts.gc is not None else "plan" if builds_lora else "the model"
    if builds_lora and ropts.gc is None:
        ropts.gc = "non-reentrant"  # on every layer; the memory plan then turns off what memory allows
    if opts.so8_layers:
        if not builds_lora or (setup.kind == Kind.DIR and os.path.isfile(os.path.join(setup.source,
                                                                                    "adapter_config.json"))):
            raise GradflowError("--so8-layers needs a base model that gradflow adds LoRA to (a preset, directory "
                                "or hub id, without --adapter)", "Drop --so8-layers, or start from the base model")
        rank_ = ropts.lora_r if ropts.lora_r is not None else 8
        if rank_ == 0:
            raise GradflowError("--so8-layers rides on a LoRA adapter, and --lora-r is 0",
                                "Pass --lora-r 8 (or any positive rank)")
        check_lora_flags(setup, ropts)
        setup = build_resolved(setup, dataclasses.replace(ropts, lora_r=0), check_flags=False)

        so8.install(setup.model, opts.so8_layers)
        setup.model = apply_lora(setup.model, rank_, ropts.lora_alpha or 2 * rank_, ropts.lora_targets or "all-linear",
                                 modules_to_save=[so8.MODULE_NAME])
        so8.attach_hooks(setup.model)
    else:
        setup = build_resolved(setup, ropts)
    check_seq_len(setup.model, opts.seq_len)  # the same length check as probe-backward, before any tokenising
    return setup, gc_from


# ----- the run ----------------------------------------------------------------------------------------------
def train(model: Any, data: str, output: str, *, tokenizer=None, setup_options: SetupOptions | None = None,
          callbacks: list | None = None, progress: bool = True, **options):
    """Fine-tune `model` on a JSONL file with gradient-flow checks before and during the run.

    Args:
        model: a MODEL spec (preset, directory, hub id, `file.py:func`), a Setup, or an nn.Module (trained in place).
        data: JSONL file of `text`, `prompt`/`completion`, or `messages` samples.
        output: the run directory (adapter/, checkpoints/, tensorboard/, report.json, audit.jsonl, grad_norms.png).
        tokenizer: the tokenizer, when `model` is an nn.Module or its source has none.
        setup_options: how to build the setup (LoRA, quantization, checkpointing, dtype, device).
        callbacks: extra TrainerCallbacks.
        progress: show progress on stderr.
        **options: TrainOptions fields (learning_rate, max_steps, batch_size, seq_len, so8_layers, resume, …).

    Returns:
        A Report: the pre-flight probe's findings plus those raised while training (under torchrun: every
        rank's, merged; see gradflow.report.ranks), with `.before`/`.after` from the pre-flight (this rank's), and
        `extra["train"]` holding status (completed | refused | stopped | interrupted), losses and the final
        gradient state. `report.trained_model` is the model in memory. `interrupted`: a
        SIGINT / SIGTERM stopped the run after a step and saved `extra["train"]["checkpoint"]`. Resuming a run
        that had ended returns its stored report with `extra["train"]["already_complete"]` and trains nothing.

    Raises:
        GradflowError: bad input; `output` is locked by another run; `resume` finds no intact checkpoint, or one
            written with other options (unless `resume_anyway`).
    """
    opts = TrainOptions(**options)
    opts.resume = opts.resume or opts.resume_anyway
    opts.validate()
    ropts = setup_options or SetupOptions()

    _fsdp.check(opts, ropts)
    if ropts.seed == 0 and opts.seed:
        ropts.seed = opts.seed
    check_output_path(output)
    # the lock: from the output check to the end, one run per directory; cleanup: undone however the run ends
    with hold(output, enabled=rank() == 0), contextlib.ExitStack() as cleanup:
        return _run(model, data, output, opts, ropts, tokenizer=tokenizer, callbacks=callbacks, progress=progress,
                    cleanup=cleanup)


def _run(model, data: str, output: str, opts: TrainOptions, ropts: SetupOptions, *, tokenizer, callbacks,
         progress: bool, cleanup):
    """The run, --output locked: output and resume checks, data, model, plan, pre-flight, Trainer, outputs."""
    from rich.console import Console

    intact = check_output(output, opts)
    console = Console(file=sys.stderr, highlight=False, soft_wrap=True)
    say = console.print if progress and rank() == 0 else (lambda *a, **k: None)

    read = read_data(data, opts)  # fail fast on bad data, before the model loads

    fingerprint = run_fingerprint(model, data, opts, ropts)
    # a checkpoint of another run is refused here, before the model loads
    plan = resume_plan(intact, fingerprint, opts, output) if intact is not None else None
    if plan is not None:
        done = _already_complete(plan, output)
        if done is not None:
            return done

    bind_local_gpu()  # torchrun on GPUs: each rank builds and probes on its own device
    setup, gc_from = build_setup(model, ropts, opts, tokenizer)
    prepared = prepare_data(data, setup.tokenizer, opts, read)
    for problem in prepared.problems[:5]:
        say(f"skipped {problem}")
    if len(prepared.problems) > 5:
        say(f"skipped {len(prepared.problems) - 5} more malformed lines")
    for p in prepared.previews:
        say(f"sample {p['id']}: {p['preview']}")
    prepare_output(output, opts)


    if rank() == 0:
        write_jsonl_atomic(os.path.join(output, "audit.jsonl"), prepared.audit)

    from rich.markup import escape


    device = model_device(setup.model)
    attention = prepare_model(setup.model, opts.attn, device.type)
    resumed_tokens = (intact.fingerprint or {}).get("tokens_per_batch_planned") if plan is not None else None
    memory = make_plan(setup, opts, gc_from=gc_from, resumed_tokens=resumed_tokens)
    for line in memory.lines():
        say(escape(line))
    if opts.packing:  # recorded in each checkpoint, so that --resume packs the same batches
        fingerprint["tokens_per_batch_planned"] = memory.tokens_per_batch
    pad_id = setup.tokenizer.pad_token_id if setup.tokenizer.pad_token_id is not None else 0
    batch = probe_batch(prepared, opts, pad_id, device, rank=rank())  # under torchrun: each rank its own samples
    recipe_changes = None
    if opts.recipe is not None:
        recipe_changes = apply_recipe(setup, opts.recipe, batch)
        for change in recipe_changes:
            say(f"recipe: {change}")
    say("pre-flight: probing" + (" a packed batch" if opts.packing else ""))
    pf = preflight(setup, batch, unsafe=opts.unsafe_fixes, say=say)
    report = _report(pf, prepared, opts, data, output)

    _ranks.gather_preflight(report, device.type)  # torchrun: every rank's findings, so every rank decides alike
    report.extra["preflight"]["recipe"] = {"path": opts.recipe, "changes": recipe_changes} if opts.recipe else None
    report.extra["plan"] = memory.to_dict()
    ce, ce_why = resolve_ce(opts.ce, device.type, fsdp=opts.fsdp)
    report.extra["train"].update(packing=opts.packing, attention=attention, ce={"loss": ce, "why": ce_why})
    errors = [f for f in report.findings if f.severity == "error"]
    if errors:
        report.extra["train"]["status"] = "refused"
        report.extra["train"]["refused_because"] = [finding_line(f) for f in errors]
        if rank() == 0:
            write_json_atomic(os.path.join(output, "report.json"), report.to_dict())
        report.trained_model = setup.model
        return report
    if pf["patch"] is not None:
        for fix in pf["patch"].fixes_applied:
            say(f"pre-flight: applied {fix.get('title', fix) if isinstance(fix, dict) else fix}")


    compiled = apply_compile(setup.model, opts.compile, device.type)  # after the probes: they hook the eager model
    report.extra["train"]["compile"] = compiled
    if compiled["compiled"]:
        say(f"compile: {compiled['layers']} decoder layers ({compiled['why']})")
    dataset, collator = train_dataset(prepared, opts, pad_id, memory.tokens_per_batch)
    if opts.packing:
        report.extra["data"]["packed_batches"] = len(dataset)
    trainer, watch = make_trainer(setup, dataset, collator, opts, output, console, callbacks or [], progress,
                                  ce=ce)
    trainer.gradflow_fingerprint = fingerprint  # recorded in every checkpoint's manifest

    signals = StopOnSignal()
    trainer.add_callback(signals)
    t0 = time.perf_counter()
    if plan is not None:
        _announce_resume(plan, output, say)
        report.extra["train"]["resume"] = {"from": plan.checkpoint, "step": plan.step, "differences": plan.differences,
                                           "damaged": [{"checkpoint": p, "why": w} for p, w in plan.damaged]}
    if plan is not None and plan.reached_end:
        # it trained to its last step and was stopped before writing its outputs: Trainer would train one step
        # more, so load the checkpoint and write them
        say(f"{plan.checkpoint} is the run's last step: writing the outputs it did not get to write")
        _load_checkpoint(trainer, plan.checkpoint)
        result = None
    else:
        signals.install()
        cleanup.callback(signals.restore)
        with _quiet():
            result = trainer.train(resume_from_checkpoint=plan.checkpoint if plan is not None else None)
        if signals.received is None:  # only the training steps are covered; after a stop the handlers stay
            signals.restore()  # until the run returns, so that a second signal still aborts at once
    seconds = time.perf_counter() - t0
    stopped = watch.stopped_at is not None
    interrupted = not stopped and signals.stopped_at is not None and trainer.state.global_step < trainer.state.max_steps
    watched = _ranks.gather_watch(report, watch.findings)  # torchrun: every rank's, merged (a collective)
    report.findings = list(report.findings) + watched
    state = final_state(trainer, watch, collator, seconds, result)
    state["findings"] = [f.to_dict() for f in watched]
    report.extra["train"].update(state)
    report.extra["train"]["status"] = "stopped" if stopped else "interrupted" if interrupted else "completed"
    if interrupted:
        report.extra["train"]["signal"] = signals.name
        report.extra["train"]["checkpoint"] = os.path.join(output, CHECKPOINT_DIR, f"checkpoint-{signals.stopped_at}")
    finished = not stopped and not interrupted

    is_main = trainer.is_world_process_zero()
    if finished and opts.fsdp:  # every rank gathers the sharded adapter; rank 0 writes it once

        _fsdp.save_adapter(trainer, setup, model, ropts, opts, os.path.join(output, ADAPTER_DIR), is_main)
        report.extra["train"]["adapter"] = ADAPTER_DIR
    if is_main:
        if plot_grad_norms(watch.history, os.path.join(output, "grad_norms.png")):
            report.extra["train"]["grad_norms_png"] = "grad_norms.png"
        if finished and not opts.fsdp:
            save_adapter(setup, model, ropts, opts, os.path.join(output, ADAPTER_DIR))
            report.extra["train"]["adapter"] = ADAPTER_DIR
    if finished and opts.merge and is_main:
        merge(os.path.join(output, ADAPTER_DIR), os.path.join(output, "merged"),
              trust_remote_code=ropts.trust_remote_code)
        report.extra["train"]["merged"] = "merged"
    if is_main:
        write_json_atomic(os.path.join(output, "report.json"), report.to_dict())
    report.trained_model = setup.model
    return report


# ----- resuming ---------------------------------------------------------------------------------------------
def _announce_resume(plan, output: str, say) -> None:
    """Say where the run continues from and why; damaged checkpoints are set aside (rank 0), staging cleared."""
    from rich.markup import escape


    warn = _warn if rank() == 0 else (lambda text: None)
    for path, why in plan.damaged:
        where = set_aside(path) if rank() == 0 and os.path.isdir(path) else path
        warn(f"gradflow: {os.path.basename(path)} is damaged ({why}): set aside as {os.path.basename(where)}; "
             f"resuming from {os.path.basename(plan.checkpoint)} instead")
    if plan.unchecked:
        warn(f"gradflow: {os.path.basename(plan.checkpoint)} was written before gradflow recorded run options: "
             "they cannot be checked")
    if plan.differences:
        warn(f"gradflow: --resume-anyway: continuing with {', '.join(plan.differences)}")
    if rank() == 0:
        clear_staging(os.path.join(output, CHECKPOINT_DIR))
    say(escape(f"resuming from {plan.checkpoint}"))


def _warn(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _already_complete(plan, output: str):
    """The stored Report when the run reached its last step and wrote its outputs; None when there is work left."""
    path = os.path.join(output, "report.json")
    if not plan.reached_end or not os.path.isdir(os.path.join(output, ADAPTER_DIR)) or not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            stored = json.load(fh)
        train = stored["train"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if train.get("status") != "completed" or train.get("steps") != plan.step:
        return None

    fields = ("schema_version", "gradflow_version", "command", "model", "loss", "params", "modules", "findings")
    findings = [Finding(f["code"], f["slug"], f["severity"], f["message"], f.get("location"),
                        Fix(f["fix"]["title"], f["fix"]["applicability"]) if f.get("fix") else None,
                        list(f.get("params") or [])) for f in stored.get("findings", [])]
    report = Report(command="train", model=stored.get("model"), loss=stored.get("loss"), params=stored.get("params"),
                    modules=stored.get("modules", []), findings=findings,
                    extra={k: v for k, v in stored.items() if k not in fields})
    train["already_complete"] = True  # this call trained nothing: the run had ended
    train["resume"] = {"from": plan.checkpoint, "step": plan.step, "differences": plan.differences,
                       "damaged": [{"checkpoint": p, "why": w} for p, w in plan.damaged]}
    report.trained_model = None  # nothing was loaded
    return report


def _load_checkpoint(trainer, path: str) -> None:
    """The checkpoint's weights and state into `trainer`, without a training step."""
    from transformers.trainer_callback import TrainerState

    trainer._load_from_checkpoint(path)
    trainer.state = TrainerState.load_from_json(os.path.join(path, "trainer_state.json"))


def _quiet():
    """The warnings gradflow's own set-up provokes stay off stderr while Trainer runs; the user's still show."""
    import contextlib
    import warnings


    @contextlib.contextmanager
    def ctx():
        with warnings.catch_warnings():
            if os.environ.get("GRADFLOW_DEBUG", "") in ("", "0"):
                ignore_known_noise()
            yield

    return ctx()


def _report(pf, prepared: Prepared, opts: TrainOptions, data: str, output: str):
    import copy

    after = pf["after"]
    report = copy.copy(after)
    report.command = "train"
    report.before = pf["before"]
    report.after = after
    report.fixes_applied = list(pf["patch"].fixes_applied) if pf["patch"] is not None else []
    report.findings = list(after.findings)
    report.extra = dict(after.extra)
    report.extra["preflight"] = {
        "patch_available": pf["patch_available"],
        "patched": pf["patch"] is not None,
        "patch": pf["patch"].to_dict() if pf["patch"] is not None else None,
        "errors_before": [finding_line(f) for f in pf["before"].findings if f.severity == "error"],
        "errors_after": [finding_line(f) for f in after.findings if f.severity == "error"],
    }
    report.extra["data"] = {
        "file": data, "samples": prepared.samples, "used": len(prepared.rows),
        "skipped": [str(p) for p in prepared.problems],
        "think_samples": sum(1 for a in prepared.audit if a["think_sha256"]),
        "supervised_tokens": sum(a["supervised_tokens"] for a in prepared.audit),
        "truncated": sum(1 for a in prepared.audit if a["truncated"]),
        "previews": prepared.previews, "audit": "audit.jsonl",
    }
    report.extra["train"] = {"status": None, "options": {k: v for k, v in dataclasses.asdict(opts).items()},
                             "output": output}
    return report
