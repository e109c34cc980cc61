"""`gradflow train`: data, model, memory plan, pre-flight (probe → patch → probe), then transformers.Trainer with
GradFlowCallback watching.

There is no home-made training loop: Trainer (accelerate underneath) runs the steps, DDP included. The parts:
options (gradflow.training.options), the data and packing (dataset), the pre-flight (preflight), the memory plan
(plan), the run directory and adapter (outputs), and the Trainer wiring (trainer). This module runs them in order.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import sys
import time
import warnings
from typing import Any

from gradflow.data.jsonl import read_once
from gradflow.files import write_json, write_jsonl
from gradflow.forward import model_device
from gradflow.noise import ignore_known_noise
from gradflow.finding import finding_line
from gradflow.report import Report, ranks as _ranks
from gradflow.setup.options import SetupOptions
from gradflow.setup.so8 import OUTSIDE_FILE
from gradflow.training import fsdp as _fsdp
from gradflow.training.checkpoint import clear_staging, plain_tensors, set_aside, writing
from gradflow.training.compiling import apply as apply_compile
from gradflow.training.dataset import (Prepared, cached_prepare, prepare_data, probe_batch, read_data,  # noqa: F401
                                       train_dataset)
from gradflow.training.lock import hold
from gradflow.training.merge import merge
from gradflow.training.model import build_setup
from gradflow.training.options import TrainOptions
from gradflow.training.outputs import (ADAPTER_DIR, CHECKPOINT_DIR, check_output, check_output_path, prepare_output,
                                       rank, save_adapter)
from gradflow.training.plan import make_plan
from gradflow.training.plots import plot_grad_norms
from gradflow.training.preflight import apply_recipe, preflight
from gradflow.training.resume import already_complete as _already_complete, as_dict as _resume_dict, \
    fingerprint as run_fingerprint, plan as resume_plan
from gradflow.training.signals import StopOnSignal
from gradflow.training.startup import Startup, first_step_callback, release_memory, timing_quantization
from gradflow.training.trainer import final_state, make_trainer, prepare_model, resolve_ce
from gradflow.world import bind_local_gpu


# ----- the run ----------------------------------------------------------------------------------------------
def train(model: Any, data: str, output: str, *, tokenizer=None, setup_options: SetupOptions | None = None,
          callbacks: list | None = None, progress: bool = True, started: float | None = None, **options) -> Report:
    """Fine-tune `model` on a JSONL file with gradient-flow checks before and during the run.

    Args:
        model: a MODEL spec (preset, directory, hub id, `file.py:func`), a Setup, or an nn.Module (trained in place).
        data: JSONL file of `text`, `prompt`/`completion`, or `messages` samples.
        output: the run directory (adapter/, checkpoints/, tensorboard/, report.json, audit.jsonl, grad_norms.png).
        tokenizer: the tokenizer, when `model` is an nn.Module or its source has none.
        setup_options: how to build the setup (LoRA, quantization, checkpointing, dtype, device).
        callbacks: extra TrainerCallbacks.
        progress: show progress on stderr.
        started: time.time() when the caller's process started (the CLI passes it): the startup profile then
            counts the imports before train() and the time to the first step from there.
        **options: TrainOptions fields (learning_rate, max_steps, batch_size, seq_len, resume, …), and
            `so8_layers`, the one SetupOptions field also taken here.

    Returns:
        A Report: the pre-flight probe's findings plus those raised while training (under torchrun: every
        rank's, merged; see gradflow.report.ranks), with `.before`/`.after` from the pre-flight (this rank's), and
        `.train` holding status (completed | refused | stopped | interrupted), losses and the final gradient state.
        `.trained_model` is the model in memory. `interrupted`: a SIGINT / SIGTERM stopped the run after a step
        and saved `.train["checkpoint"]`. Resuming a run that had ended returns its stored report with
        `.train["already_complete"]` and trains nothing.

    Raises:
        GradflowError: bad input; `output` is locked by another run; `resume` finds no intact checkpoint, or one
            written with other options (unless `resume_anyway`).
    """
    startup = Startup(started)
    so8_layers = options.pop("so8_layers", None)  # a setup option, taken here too for train's callers
    opts = TrainOptions(**options)
    opts.resume = opts.resume or opts.resume_anyway
    opts.validate()
    ropts = setup_options or SetupOptions()
    ropts = dataclasses.replace(ropts, seed=ropts.seed or opts.seed,
                                so8_layers=ropts.so8_layers if so8_layers is None else so8_layers)
    _fsdp.check(opts, ropts)
    check_output_path(output)
    # the lock: from the output check to the end, one run per directory; cleanup: undone however the run ends
    with hold(output, enabled=rank() == 0), contextlib.ExitStack() as cleanup:
        run = Run(model, data, output, opts, ropts, tokenizer=tokenizer, callbacks=callbacks or [],
                  progress=progress, cleanup=cleanup, startup=startup)
        done = run.setup()
        if done is not None:
            return done
        if not run.preflight():
            return run.refuse()
        run.fit()
        return run.finish()


class Run:
    """One `gradflow train`, its output locked, as named stages: setup → preflight → fit → finish.

    Each stage reads what the ones before it left on the run and adds its own; the order inside a stage is the
    order the run needs (bad data fails before the model loads; the probes hook the eager model, so compiling
    comes after them).
    """

    def __init__(self, model, data: str, output: str, opts: TrainOptions, ropts: SetupOptions, *, tokenizer,
                 callbacks: list, progress: bool, cleanup: contextlib.ExitStack, startup: Startup | None = None):
        from rich.console import Console

        self.model, self.data, self.output, self.opts, self.ropts = model, data, output, opts, ropts
        self.tokenizer, self.callbacks, self.progress, self.cleanup = tokenizer, callbacks, progress, cleanup
        self.console = Console(file=sys.stderr, highlight=False, soft_wrap=True)
        self.say = self.console.print if progress and rank() == 0 else (lambda *a, **k: None)
        self.resume = None  # the resume plan (gradflow.training.resume), when --resume finds a checkpoint
        self.report: Report | None = None
        self.startup = startup or Startup()  # seconds per stage before the first step (gradflow.training.startup)

    # ----- setup: output and resume checks, data, model, memory plan ------------------------------------------
    def setup(self) -> Report | None:
        """Everything before the pre-flight. Returns the stored report when a resumed run had already ended."""
        intact = check_output(self.output, self.opts)
        with self.startup.stage("data"):
            self.data_path = read_once(self.data)  # a pipe, read once: the data hashed is the data trained on
            read = read_data(self.data_path, self.opts)  # fail fast on bad data, before the model loads
            self.fingerprint = run_fingerprint(self.model, self.data_path, self.opts, self.ropts)
        if intact is not None:  # a checkpoint of another run is refused here, before the model loads
            self.resume = resume_plan(intact, self.fingerprint, self.opts, self.output)
            done = _already_complete(self.resume, self.output, ADAPTER_DIR)
            if done is not None:
                return done
        bind_local_gpu()  # torchrun on GPUs: each rank builds and probes on its own device
        with self.startup.stage("model"), timing_quantization(self.startup, self.ropts.quant):
            self.setup_, self.gc_from = build_setup(self.model, self.ropts, self.opts.seq_len, self.tokenizer)
        with self.startup.stage("data"):
            self._read_data(read)
        prepare_output(self.output, self.opts)
        if rank() == 0:
            write_jsonl(os.path.join(self.output, "audit.jsonl"), self.prepared.audit)
        with self.startup.stage("plan"):
            self._plan_memory(intact)
            release_memory(self.device.type)  # the measuring passes' blocks back before the pre-flight's
        return None

    def _read_data(self, read) -> None:
        self.prepared, cached = cached_prepare(self.data, self.setup_.tokenizer, self.opts, read,
                                               data_sha256=self.fingerprint["data_sha256"], use_cache=self.opts.cache)
        self.startup.cache["data"] = cached
        if cached["status"] == "hit":
            self.say(f"data: {len(self.prepared.rows)} encoded samples from the cache")
        for problem in self.prepared.problems[:5]:
            self.say(f"skipped {problem}")
        if len(self.prepared.problems) > 5:
            self.say(f"skipped {len(self.prepared.problems) - 5} more malformed lines")
        for p in self.prepared.previews:
            self.say(f"sample {p['id']}: {p['preview']}")

    def _plan_memory(self, intact) -> None:
        from rich.markup import escape

        self.device = model_device(self.setup_.model)
        self.attention = prepare_model(self.setup_.model, self.opts.attn, self.device.type)
        resumed = (intact.fingerprint or {}).get("tokens_per_batch_planned") if self.resume is not None else None
        # the loss training will use: the plan measures its steps with it (the full logits are most of a step's peak)
        self.ce, self.ce_why = resolve_ce(self.opts.ce, self.device.type, fsdp=self.opts.fsdp)
        self.memory = make_plan(self.setup_, self.opts, gc_from=self.gc_from, resumed_tokens=resumed, ce=self.ce)
        for line in self.memory.lines():
            self.say(escape(line))
        if self.opts.packing:  # recorded in each checkpoint, so that --resume packs the same batches
            self.fingerprint["tokens_per_batch_planned"] = self.memory.tokens_per_batch
        tok = self.setup_.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    # ----- preflight: probe → patch → probe, every rank's findings gathered ------------------------------------
    def preflight(self) -> bool:
        """The pre-flight on a batch shaped as training shapes it. False: an error finding remains (refuse)."""
        with self.startup.stage("preflight"):
            ok = self._preflight()
            release_memory(self.device.type)  # the probes' activations and graphs, before training allocates
        return ok

    def _preflight(self) -> bool:
        opts = self.opts
        # under torchrun: each rank its own samples
        batch = probe_batch(self.prepared, opts, self.pad_id, self.device, rank=rank())
        changes = apply_recipe(self.setup_, opts.recipe, batch) if opts.recipe is not None else None
        for change in changes or []:
            self.say(f"recipe: {change}")
        self.say("pre-flight: probing" + (" a packed batch" if opts.packing else ""))
        pf = preflight(self.setup_.model, batch, loss_fn=self.setup_.loss_fn, trainable=self.setup_.trainable,
                       patch=True, unsafe=opts.unsafe_fixes, say=self.say)
        self.report = report = _report(pf, self.prepared, opts, self.ropts.so8_layers, self.data, self.output)
        _ranks.gather_preflight(report, self.device.type)  # torchrun: every rank's findings, every rank decides
        report.preflight["recipe"] = {"path": opts.recipe, "changes": changes} if opts.recipe else None
        report.plan = self.memory.to_dict()
        report.train.update(packing=opts.packing, attention=self.attention, ce={"loss": self.ce, "why": self.ce_why})
        if any(f.severity == "error" for f in report.findings):
            return False
        for fix in pf["patch"].fixes_applied if pf["patch"] is not None else []:
            self.say(f"pre-flight: applied {fix.get('title', fix) if isinstance(fix, dict) else fix}")
        return True

    def refuse(self) -> Report:
        """No step is taken while an error finding remains: the report says which."""
        self.report.train["status"] = "refused"
        self.report.train["startup"] = self.startup.to_dict()
        self.report.train["refused_because"] = [finding_line(f) for f in self.report.findings
                                                if f.severity == "error"]
        if rank() == 0:
            write_json(os.path.join(self.output, "report.json"), self.report.to_dict(), default=str)
        self.report.trained_model = self.setup_.model
        return self.report

    # ----- fit: Trainer with the watch, until the last step, a watch stop or a signal --------------------------
    def fit(self) -> None:
        """Compile, build the Trainer, and train (or, resuming at the last step, only load the checkpoint)."""
        self._make_trainer()
        plan, train = self.resume, self.report.train
        if plan is not None:
            _announce_resume(plan, self.output, self.say)
            train["resume"] = _resume_dict(plan)
        t0 = time.perf_counter()
        if plan is not None and plan.reached_end:
            # it trained to its last step and was stopped before writing its outputs: Trainer would train one step
            # more, so load the checkpoint and write them
            self.say(f"{plan.checkpoint} is the run's last step: writing the outputs it did not get to write")
            with plain_tensors(plan.checkpoint):
                _load_checkpoint(self.trainer, plan.checkpoint)
            result = None
        else:
            with plain_tensors(plan.checkpoint if plan is not None else None):
                result = self._train(plan.checkpoint if plan is not None else None)
        self._record(result, time.perf_counter() - t0)

    def _make_trainer(self) -> None:
        opts, setup, report = self.opts, self.setup_, self.report
        with self.startup.stage("compile"):  # lazy: the compiling itself happens in the first step (startup.py)
            compiled = apply_compile(setup.model, opts.compile, self.device.type, cache=opts.cache)
        report.train["compile"] = compiled  # after the probes: they hook the eager model
        self.startup.cache["compile_dir"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR") if compiled["compiled"] else None
        if compiled["compiled"]:
            self.say(f"compile: {compiled['layers']} decoder layers ({compiled['why']})")
        with self.startup.stage("trainer"):
            self._build_trainer()

    def _build_trainer(self) -> None:
        opts, setup, report = self.opts, self.setup_, self.report
        dataset, self.collator = train_dataset(self.prepared, opts, self.pad_id, self.memory.tokens_per_batch)
        if opts.packing:
            report.data["packed_batches"] = len(dataset)
        self.trainer, self.watch = make_trainer(setup, dataset, self.collator, opts, self.output, self.console,
                                                self.callbacks, self.progress, ce=self.ce)
        self.trainer.gradflow_fingerprint = self.fingerprint  # recorded in every checkpoint's manifest
        self.signals = StopOnSignal()
        self.trainer.add_callback(self.signals)
        self.trainer.add_callback(first_step_callback(self.startup))

    def _train(self, checkpoint: str | None):
        signals = self.signals
        signals.install()
        self.cleanup.callback(signals.restore)
        self.startup.training_starts()
        with _quiet():
            result = self.trainer.train(resume_from_checkpoint=checkpoint)
        if signals.received is None:  # only the training steps are covered; after a stop the handlers stay
            signals.restore()  # until the run returns, so that a second signal still aborts at once
        return result

    def _record(self, result, seconds: float) -> None:
        """The run's end state into the report: steps, losses, gradients, the watch's findings, and the status."""
        report, trainer, watch, signals = self.report, self.trainer, self.watch, self.signals
        self.stopped = watch.stopped_at is not None
        self.interrupted = (not self.stopped and signals.stopped_at is not None
                            and trainer.state.global_step < trainer.state.max_steps)
        watched = _ranks.gather_watch(report, watch.findings)  # torchrun: every rank's, merged (a collective)
        report.findings = list(report.findings) + watched
        state = final_state(trainer, watch, self.collator, seconds, result)
        state["findings"] = [f.to_dict() for f in watched]
        report.train.update(state)
        report.train["startup"] = self.startup.to_dict()
        report.train["status"] = "stopped" if self.stopped else "interrupted" if self.interrupted else "completed"
        if self.interrupted:
            report.train["signal"] = signals.name
            report.train["checkpoint"] = os.path.join(self.output, CHECKPOINT_DIR,
                                                      f"checkpoint-{signals.stopped_at}")

    # ----- finish: adapter, plot, merge, report.json ----------------------------------------------------------
    def finish(self) -> Report:
        opts, setup, train, output = self.opts, self.setup_, self.report.train, self.output
        finished = not self.stopped and not self.interrupted
        is_main = self.trainer.is_world_process_zero()
        outside = []
        if finished and opts.fsdp:  # every rank gathers the sharded adapter; rank 0 writes it once
            outside = _fsdp.save_adapter(self.trainer, setup, self.model, self.ropts, opts,
                                         os.path.join(output, ADAPTER_DIR), is_main)
            train["adapter"] = ADAPTER_DIR
        if is_main:
            if plot_grad_norms(self.watch.history, os.path.join(output, "grad_norms.png")):
                train["grad_norms_png"] = "grad_norms.png"
            if finished and not opts.fsdp:
                with writing(f"the adapter in {output}", os.path.join(output, CHECKPOINT_DIR)):
                    outside = save_adapter(setup, self.model, self.ropts, opts, os.path.join(output, ADAPTER_DIR))
                train["adapter"] = ADAPTER_DIR
            if outside:  # trainable tensors save_pretrained drops: kept beside the adapter, and said so
                train["adapter_outside"] = {"file": OUTSIDE_FILE, "tensors": outside}
        if finished and opts.merge and is_main:
            merge(os.path.join(output, ADAPTER_DIR), os.path.join(output, "merged"),
                  trust_remote_code=self.ropts.trust_remote_code)
            train["merged"] = "merged"
        if is_main:
            with writing(f"report.json in {output}", os.path.join(output, CHECKPOINT_DIR)):
                write_json(os.path.join(output, "report.json"), self.report.to_dict(), default=str)
        self.report.trained_model = setup.model
        return self.report


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


def _load_checkpoint(trainer, path: str) -> None:
    """The checkpoint's weights and state into `trainer`, without a training step."""
    from transformers.trainer_callback import TrainerState

    trainer._load_from_checkpoint(path)
    trainer.state = TrainerState.load_from_json(os.path.join(path, "trainer_state.json"))


@contextlib.contextmanager
def _quiet():
    """The warnings gradflow's own set-up provokes stay off stderr while Trainer runs; the user's still show."""
    with warnings.catch_warnings():
        if os.environ.get("GRADFLOW_DEBUG", "") in ("", "0"):
            ignore_known_noise()
        yield


def _report(pf, prepared: Prepared, opts: TrainOptions, so8_layers: list[int], data: str,
            output: str) -> Report:
    """The train report: the pre-flight's last probe, with its own sections for the pre-flight, data and run."""
    after = pf["after"]
    report = copy.copy(after)
    report.command = "train"
    report.before = pf["before"]
    report.after = after
    report.fixes_applied = list(pf["patch"].fixes_applied) if pf["patch"] is not None else []
    report.findings = list(after.findings)
    report.preflight = {
        "patch_available": pf["patch_available"],
        "patched": pf["patch"] is not None,
        "patch": pf["patch"].to_dict() if pf["patch"] is not None else None,
        "errors_before": [finding_line(f) for f in pf["before"].findings if f.severity == "error"],
        "errors_after": [finding_line(f) for f in after.findings if f.severity == "error"],
    }
    report.data = {
        "file": data, "samples": prepared.samples, "used": len(prepared.rows),
        "skipped": [str(p) for p in prepared.problems],
        "think_samples": sum(1 for a in prepared.audit if a["think_sha256"]),
        "supervised_tokens": sum(a["supervised_tokens"] for a in prepared.audit),
        "truncated": sum(1 for a in prepared.audit if a["truncated"]),
        "previews": prepared.previews, "audit": "audit.jsonl",
    }
    options = {**dataclasses.asdict(opts), "so8_layers": so8_layers}  # the schema's train options
    report.train = {"status": None, "options": options, "output": output}
    return report
