"""`gradflow train`: pre-flight (probe → patch → probe), then transformers.Trainer with GradFlowCallback watching.

There is no home-made training loop: Trainer (accelerate underneath) runs the steps, DDP included. gradflow adds
the data pipeline (dynamic padding, loss on assistant/completion tokens, /think validation), the pre-flight gate,
atomic checkpoints, SO(8) adapters, and the outputs: adapter, report.json, audit.jsonl, TensorBoard, grad_norms.png.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any

from gradflow.errors import GradflowError
from gradflow.recipe import RecipeOptions

PRECISIONS = ("fp32", "bf16", "fp16")
LOSS_ON = ("completion", "all")
ADAPTER_DIR, CHECKPOINT_DIR, TB_DIR = "adapter", "checkpoints", "tensorboard"
RUN_META = "gradflow_train.json"


@dataclasses.dataclass
class TrainOptions:
    """Training options as the CLI takes them."""

    learning_rate: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 512
    seed: int = 0
    precision: str = "fp32"  # mixed precision: fp32 (off) | bf16 | fp16
    loss_on: str = "completion"
    strict: bool = False
    so8_layers: list[int] = dataclasses.field(default_factory=list)
    recipe: str | None = None
    resume: bool = False
    resume_anyway: bool = False  # resume although the run's fingerprint differs (implies resume)
    overwrite: bool = False
    merge: bool = False
    unsafe_fixes: bool = False
    check_every: int = 10
    moved_at_step: int = 5
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int = 10
    warmup_steps: int = 0
    previews: int = 2

    def validate(self) -> None:
        from gradflow.limits import check_float, check_int

        # finite and bounded, each bound in the message (gradflow.limits holds the table)
        bounded = {"--batch-size": self.batch_size, "--grad-accum": self.grad_accum, "--seq-len": self.seq_len,
                   "--check-every": self.check_every, "--save-steps": self.save_steps,
                   "--logging-steps": self.logging_steps, "--seed": self.seed}
        for flag, value in bounded.items():
            check_int(flag, value)
        for flag, value in (("--max-steps", self.max_steps), ("--moved-at", self.moved_at_step)):
            if value is not None:  # None: no step limit / no moved-weights check
                check_int(flag, value)
        check_float("--epochs", self.epochs)  # checked even beside --max-steps: inf is a typo either way
        check_float("--lr", self.learning_rate)
        if self.precision not in PRECISIONS:
            raise GradflowError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}",
                                "Pick one of those")
        if self.loss_on not in LOSS_ON:
            raise GradflowError(f"--loss-on {self.loss_on!r} is not one of {', '.join(LOSS_ON)}", "Pick one of those")
        if self.resume and self.overwrite:
            raise GradflowError("--resume and --overwrite contradict each other", "Pass one of them")


def _check_output_path(output: str) -> None:
    """--output must be (or be creatable as) a directory: checked before the lock creates it."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise GradflowError(f"--output {output} is a file, not a directory", "Pass a new or existing directory")
    parent = os.path.dirname(os.path.abspath(output))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise GradflowError(f"--output {output}: {parent} is a file, not a directory", "Pass a path under a directory")


def _check_output(output: str, opts: TrainOptions):
    """With --output locked, before any work: the intact checkpoint to resume from (checkpoint.Intact), if any."""
    from gradflow.training.lock import LOCK_NAME
    from gradflow.training.resume import find

    if opts.resume:
        return find(output, os.path.join(output, CHECKPOINT_DIR))
    held = [n for n in os.listdir(output) if n != LOCK_NAME] if os.path.isdir(output) else []
    if held and _rank() == 0:
        # only rank 0 checks: under torchrun it may already have written here when another rank looks
        if not opts.overwrite:
            raise GradflowError(f"--output {output} already holds files",
                                "Pass --resume to continue that run, --overwrite to replace it, or a new directory")
    return None


def _rank() -> int:
    """This process's global rank under torchrun / accelerate launch (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def _prepare_output(output: str, opts: TrainOptions) -> None:
    if _rank() != 0:
        return
    if opts.overwrite and os.path.isdir(output):
        for name in (ADAPTER_DIR, CHECKPOINT_DIR, TB_DIR, "merged", "report.json", "audit.jsonl", "grad_norms.png"):
            path = os.path.join(output, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(output, exist_ok=True)


# ----- the model --------------------------------------------------------------------------------------------
def build_setup(model: Any, ropts: RecipeOptions, opts: TrainOptions, tokenizer=None):
    """MODEL (spec string, Setup or nn.Module) → Setup, with LoRA, SO(8) adapters and --recipe applied."""
    import torch

    from gradflow.recipe import apply_lora, build
    from gradflow.runner import _try_tokenizer
    from gradflow.sources import Setup, resolve, setup_from_factory_result

    ropts.validate()
    if isinstance(model, Setup):
        setup = model
    elif isinstance(model, str):
        setup = resolve(model, trust_remote_code=ropts.trust_remote_code)
    elif isinstance(model, (torch.nn.Module, dict)):
        setup = setup_from_factory_result(model, type(model).__name__)
        setup.kind = "object"
    else:
        raise GradflowError(f"cannot train a {type(model).__name__}", "Pass a MODEL spec string or an nn.Module")
    if setup.kind == "trainer":
        raise GradflowError(f"{setup.source} returns a Trainer: gradflow train builds its own",
                            "Run your trainer with callbacks=[gradflow.GradFlowCallback()], or check it first with "
                            "gradflow probe-backward")
    if tokenizer is not None:
        setup.tokenizer = tokenizer
    builds_lora = setup.kind in ("preset", "dir", "hub") and ropts.adapter is None
    if builds_lora and ropts.gc is None:
        ropts.gc = "non-reentrant"  # the right default for a real fine-tune, and the one DDP needs
    if opts.so8_layers:
        if not builds_lora or (setup.kind == "dir" and os.path.isfile(os.path.join(setup.source,
                                                                                    "adapter_config.json"))):
            raise GradflowError("--so8-layers needs a base model that gradflow adds LoRA to (a preset, directory "
                                "or hub id, without --adapter)", "Drop --so8-layers, or start from the base model")
        rank = ropts.lora_r if ropts.lora_r is not None else 8
        if rank == 0:
            raise GradflowError("--so8-layers rides on a LoRA adapter, and --lora-r is 0",
                                "Pass --lora-r 8 (or any positive rank)")
        alpha = ropts.lora_alpha or 2 * rank
        base_opts = dataclasses.replace(ropts, lora_r=0)
        setup = build(setup, base_opts)
        from gradflow.training import so8

        so8.install(setup.model, opts.so8_layers)
        setup.model = apply_lora(setup.model, rank, alpha, ropts.lora_targets or "all-linear",
                                 modules_to_save=[so8.MODULE_NAME])
        so8.attach_hooks(setup.model)
    else:
        setup = build(setup, ropts)
    if setup.tokenizer is None and setup.kind in ("dir", "hub"):
        setup.tokenizer = _try_tokenizer(setup.source)
    from gradflow.runner import check_seq_len

    check_seq_len(setup.model, opts.seq_len)  # the same length check as probe-backward, before any tokenising
    return setup


def _apply_recipe(setup, path: str, batch=None) -> list:
    try:
        from gradflow.fixes.recipe_file import apply_recipe, load_recipe
    except ImportError as exc:
        raise GradflowError("--recipe needs gradflow's patch recipes, which this installation lacks",
                            "Upgrade gradflow, or drop --recipe (pre-flight patches the setup anyway)") from exc
    if not os.path.exists(path):
        raise GradflowError(f"--recipe {path} does not exist", "Pass the directory written by 'gradflow patch --save'")
    recipe = load_recipe(path)
    return list(apply_recipe(setup.model, recipe, batch) or [])


# ----- the data ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
    rows: list[dict]
    audit: list[dict]
    previews: list[dict]
    problems: list[Any]
    samples: int


def read_data(path: str, opts: TrainOptions):
    """Read and validate the JSONL file (no tokenizer needed): fails early on --strict or no usable line."""
    from gradflow.data import read_jsonl

    samples, problems = read_jsonl(path)
    if problems and opts.strict:
        raise GradflowError(f"malformed sample at {problems[0]}"
                            f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}",
                            "Fix or remove those lines, or run without --strict to skip them")
    if not samples:
        raise GradflowError(f"every line of {path} is malformed ({len(problems)}); first: {problems[0]}",
                            "Fix the data: each line needs text, prompt/completion, or messages")
    return samples, problems


def prepare_data(path: str, tokenizer, opts: TrainOptions, read=None) -> Prepared:
    """Read, validate and encode the JSONL file; bad lines become Problems (or an error with --strict)."""
    from gradflow.data import Problem, encode, sample_id, supervised_count, think_of

    samples, problems = read if read is not None else read_data(path, opts)
    if tokenizer is None:
        raise GradflowError("training on --data needs a tokenizer, and this model source has none",
                            "Use a preset or a directory with a tokenizer, or return 'tokenizer' from your factory")
    rows, audit, previews, too_short = [], [], [], []
    for sample in samples:
        row = encode(sample, tokenizer, opts.seq_len, loss_on=opts.loss_on)
        supervised = supervised_count(row["labels"])
        think = think_of(sample)
        sid = sample_id(sample, path)
        if supervised == 0:
            too_short.append(Problem(path, sample.line, f"--seq-len {opts.seq_len} leaves no supervised token "
                                                        f"(the prompt fills it)"))
            continue
        rows.append({"input_ids": row["input_ids"], "labels": row["labels"]})
        audit.append({"id": sid, "line": sample.line, "think_sha256": think.sha256 if think else None,
                      "tokens": len(row["input_ids"]), "supervised_tokens": supervised,
                      "tokens_before_truncation": row["full_length"],
                      "truncated": row["full_length"] > len(row["input_ids"])})
        if len(previews) < opts.previews:
            from gradflow.training.audit import preview

            previews.append({"id": sid, "preview": preview(sample, think)})
    if too_short and opts.strict:
        raise GradflowError(f"{too_short[0]}", "Raise --seq-len, or shorten the prompts")
    if not rows:
        cap = 4096  # enough to suggest a --seq-len; a 50 MB line is not tokenised whole for a hint
        longest = max(len(encode(s, tokenizer, cap, loss_on=opts.loss_on)["input_ids"]) for s in samples)
        size = f"{longest}{'+' if longest >= cap else ''}"
        raise GradflowError(f"--seq-len {opts.seq_len} is shorter than the prompt of every sample in {path}: "
                            f"no supervised token is left (longest sample {size} tokens)",
                            f"Raise --seq-len (e.g. --seq-len {min(longest, cap)})")
    return Prepared(rows=rows, audit=audit, previews=previews, problems=problems + too_short, samples=len(samples))


class Collator:
    """Pads each batch to its longest row (not to --seq-len) and counts the tokens it has served."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.tokens = 0

    def __call__(self, rows):
        from gradflow.data import collate

        batch = collate(rows, self.pad_id)
        self.tokens += int(batch["attention_mask"].sum())  # on the CPU, before the batch moves: no sync
        return batch


# ----- pre-flight -------------------------------------------------------------------------------------------
def preflight(setup, batch, *, unsafe: bool = False, say=None) -> dict:
    """Probe, patch (when gradflow.fixes is installed; patch re-probes). Returns the three reports."""
    import gradflow

    say = say or (lambda text: None)
    before = gradflow.probe(setup.model, batch, loss_fn=setup.loss_fn, optimizer=None, trainable=setup.trainable)
    patched = None
    try:
        import gradflow.fixes.engine  # noqa: F401
        have_patch = True
    except ImportError:
        have_patch = False
    if have_patch and any(f.severity in ("error", "warning") for f in before.findings):
        say("pre-flight: patching")
        patched = gradflow.patch(setup.model, batch, loss_fn=setup.loss_fn, trainable=setup.trainable,
                                 unsafe=unsafe)
    # patch ends with its own re-probe of the patched model: that is the "probe again", no fourth pass
    after = patched.after if patched is not None else before
    return {"before": before, "patch": patched, "after": after, "patch_available": have_patch}


def _finding_line(f) -> str:
    where = f" at {f.location}" if f.location else ""
    return f"{f.code} {f.slug}{where}: {f.message}"


# ----- the run ----------------------------------------------------------------------------------------------
def train(model: Any, data: str, output: str, *, tokenizer=None, setup_options: RecipeOptions | None = None,
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
        A Report: the pre-flight probe's findings plus those raised while training, with `.before`/`.after`
        from the pre-flight, and `extra["train"]` holding status (completed | refused | stopped | interrupted),
        losses and the final gradient state. `report.trained_model` is the model in memory. `interrupted`: a
        SIGINT / SIGTERM stopped the run after a step and saved `extra["train"]["checkpoint"]`. Resuming a run
        that had ended returns its stored report with `extra["train"]["already_complete"]` and trains nothing.

    Raises:
        GradflowError: bad input; `output` is locked by another run; `resume` finds no intact checkpoint, or one
            written with other options (unless `resume_anyway`).
    """
    from gradflow.training.lock import hold

    opts = TrainOptions(**options)
    opts.resume = opts.resume or opts.resume_anyway
    opts.validate()
    ropts = setup_options or RecipeOptions()
    if ropts.seed == 0 and opts.seed:
        ropts.seed = opts.seed
    _check_output_path(output)
    # the lock: from the output check to the end, one run per directory; cleanup: undone however the run ends
    with hold(output, enabled=_rank() == 0), contextlib.ExitStack() as cleanup:
        return _run(model, data, output, opts, ropts, tokenizer=tokenizer, callbacks=callbacks, progress=progress,
                    cleanup=cleanup)


def _run(model, data: str, output: str, opts: TrainOptions, ropts: RecipeOptions, *, tokenizer, callbacks,
         progress: bool, cleanup):
    """The run, --output locked: output and resume checks, data, model, pre-flight, Trainer, outputs."""
    from rich.console import Console

    intact = _check_output(output, opts)
    console = Console(file=sys.stderr, highlight=False, soft_wrap=True)
    say = console.print if progress and _rank() == 0 else (lambda *a, **k: None)

    read = read_data(data, opts)  # fail fast on bad data, before the model loads
    from gradflow.training.resume import fingerprint as run_fingerprint, plan as resume_plan

    fingerprint = run_fingerprint(model, data, opts, ropts)
    # a checkpoint of another run is refused here, before the model loads
    plan = resume_plan(intact, fingerprint, opts, output) if intact is not None else None
    if plan is not None:
        done = _already_complete(plan, output)
        if done is not None:
            return done
    setup = build_setup(model, ropts, opts, tokenizer)
    prepared = prepare_data(data, setup.tokenizer, opts, read)
    for problem in prepared.problems[:5]:
        say(f"skipped {problem}")
    if len(prepared.problems) > 5:
        say(f"skipped {len(prepared.problems) - 5} more malformed lines")
    for p in prepared.previews:
        say(f"sample {p['id']}: {p['preview']}")
    _prepare_output(output, opts)

    from gradflow.training.audit import write_json_atomic, write_jsonl_atomic

    if _rank() == 0:
        write_jsonl_atomic(os.path.join(output, "audit.jsonl"), prepared.audit)

    import torch

    from gradflow.data import collate
    from gradflow.probing import model_device

    pad_id = setup.tokenizer.pad_token_id if setup.tokenizer.pad_token_id is not None else 0
    batch = collate(prepared.rows[: opts.batch_size], pad_id, model_device(setup.model))
    recipe_changes = None
    if opts.recipe is not None:
        recipe_changes = _apply_recipe(setup, opts.recipe, batch)
        for change in recipe_changes:
            say(f"recipe: {change}")
    say("pre-flight: probing")
    pf = preflight(setup, batch, unsafe=opts.unsafe_fixes, say=say)
    report = _report(pf, prepared, opts, data, output)
    report.extra["preflight"]["recipe"] = {"path": opts.recipe, "changes": recipe_changes} if opts.recipe else None
    errors = [f for f in pf["after"].findings if f.severity == "error"]
    if errors:
        report.extra["train"]["status"] = "refused"
        report.extra["train"]["refused_because"] = [_finding_line(f) for f in errors]
        if _rank() == 0:
            write_json_atomic(os.path.join(output, "report.json"), report.to_dict())
        report.trained_model = setup.model
        return report
    if pf["patch"] is not None:
        for fix in pf["patch"].fixes_applied:
            say(f"pre-flight: applied {fix.get('title', fix) if isinstance(fix, dict) else fix}")

    trainer, watch, collator = _trainer(setup, prepared, opts, output, console, callbacks or [], progress)
    trainer.gradflow_fingerprint = fingerprint  # recorded in every checkpoint's manifest
    from gradflow.training.signals import StopOnSignal

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
    report.findings = list(report.findings) + list(watch.findings)
    state = _final_state(trainer, watch, collator, seconds, result)
    report.extra["train"].update(state)
    report.extra["train"]["status"] = "stopped" if stopped else "interrupted" if interrupted else "completed"
    if interrupted:
        report.extra["train"]["signal"] = signals.name
        report.extra["train"]["checkpoint"] = os.path.join(output, CHECKPOINT_DIR, f"checkpoint-{signals.stopped_at}")
    finished = not stopped and not interrupted

    is_main = trainer.is_world_process_zero()
    if is_main:
        from gradflow.training.plots import plot_grad_norms

        if plot_grad_norms(watch.history, os.path.join(output, "grad_norms.png")):
            report.extra["train"]["grad_norms_png"] = "grad_norms.png"
        if finished:
            _save_adapter(setup, model, ropts, opts, os.path.join(output, ADAPTER_DIR))
            report.extra["train"]["adapter"] = ADAPTER_DIR
    if finished and opts.merge and is_main:
        from gradflow.training.merge import merge

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

    from gradflow.training.checkpoint import clear_staging, set_aside

    warn = _warn if _rank() == 0 else (lambda text: None)
    for path, why in plan.damaged:
        where = set_aside(path) if _rank() == 0 and os.path.isdir(path) else path
        warn(f"gradflow: {os.path.basename(path)} is damaged ({why}): set aside as {os.path.basename(where)}; "
             f"resuming from {os.path.basename(plan.checkpoint)} instead")
    if plan.unchecked:
        warn(f"gradflow: {os.path.basename(plan.checkpoint)} was written before gradflow recorded run options: "
             "they cannot be checked")
    if plan.differences:
        warn(f"gradflow: --resume-anyway: continuing with {', '.join(plan.differences)}")
    if _rank() == 0:
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
    from gradflow.report import Finding, Fix, Report

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

    from gradflow.noise import ignore_known_noise

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
        "errors_before": [_finding_line(f) for f in pf["before"].findings if f.severity == "error"],
        "errors_after": [_finding_line(f) for f in after.findings if f.severity == "error"],
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


def _training_args(opts: TrainOptions, output: str, device: str, n_rows: int):
    import inspect

    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=os.path.join(output, CHECKPOINT_DIR), per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum, learning_rate=opts.learning_rate,
        num_train_epochs=opts.epochs, max_steps=opts.max_steps if opts.max_steps is not None else -1,
        logging_steps=opts.logging_steps, logging_first_step=True, save_strategy="steps",
        save_steps=opts.save_steps, save_total_limit=opts.save_total_limit, seed=opts.seed,
        bf16=opts.precision == "bf16", fp16=opts.precision == "fp16", report_to="none", disable_tqdm=True,
        remove_unused_columns=False, ddp_find_unused_parameters=False,
        dataloader_num_workers=0, warmup_steps=opts.warmup_steps, optim="adamw_torch", max_grad_norm=1.0,
        use_cpu=device == "cpu",
    )
    accepted = inspect.signature(TrainingArguments.__init__).parameters
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in accepted})


def _trainer(setup, prepared: Prepared, opts: TrainOptions, output: str, console, callbacks, progress: bool):
    import math

    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from gradflow.probing import model_device
    from gradflow.training.callback import GradFlowCallback
    from gradflow.training.checkpoint import atomic_save_mixin
    from gradflow.training.progress import RichProgress

    device = model_device(setup.model).type
    if opts.precision == "fp16" and device == "cpu":
        raise GradflowError("--precision fp16 needs a GPU (CPU has no fp16 loss scaling)",
                            "Use --precision bf16 or fp32 on CPU")
    args = _training_args(opts, output, device, len(prepared.rows))
    world = max(1, args.world_size)
    per_epoch = math.ceil(len(prepared.rows) / (opts.batch_size * world) / opts.grad_accum)
    total = opts.max_steps if opts.max_steps is not None else max(1, math.ceil(per_epoch * opts.epochs))
    if opts.logging_steps > total:  # a short run still logs its last loss
        args.logging_steps = total
    if world > 1 and _gc_reentrant(setup.model):
        raise GradflowError("reentrant gradient checkpointing under DDP", "Use --gc non-reentrant for multi-GPU runs")
    watch = GradFlowCallback(check_every=min(opts.check_every, total), moved_at_step=min(opts.moved_at_step, total),
                             preflight=False, tensorboard_dir=os.path.join(output, TB_DIR),
                             on_finding=lambda f: console.print(f"[bold red]gradflow[/]: step finding "
                                                                f"{_finding_line(f)}"))
    collator = Collator(setup.tokenizer.pad_token_id if setup.tokenizer.pad_token_id is not None else 0)
    trainer_cls = atomic_save_mixin(Trainer)
    trainer = trainer_cls(model=setup.model, args=args, train_dataset=prepared.rows, data_collator=collator,
                          callbacks=[watch, *callbacks])
    trainer.remove_callback(PrinterCallback)  # it prints log dicts on stdout, which carries data
    trainer.remove_callback(ProgressCallback)
    if progress:  # RichProgress itself stays silent on ranks other than 0
        trainer.add_callback(RichProgress(console, lambda: collator.tokens))
    return trainer, watch, collator


def _gc_reentrant(model) -> bool:
    from gradflow.models import gc_mode_of

    return any(gc_mode_of(m) == "reentrant" for m in model.modules())


def _final_state(trainer, watch, collator, seconds: float, result) -> dict:
    history = trainer.state.log_history
    losses = [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h]
    last = watch.history[-1] if watch.history else None
    moved = watch.moved() if watch._params else {}
    return {
        "steps": trainer.state.global_step, "max_steps": trainer.state.max_steps,
        "world_size": trainer.args.world_size,
        "seconds": round(seconds, 2), "tokens": collator.tokens,
        "tokens_per_second": round(collator.tokens / seconds, 1) if seconds > 0 else None,
        "loss_first": losses[0]["loss"] if losses else None, "loss_last": losses[-1]["loss"] if losses else None,
        "losses": losses, "stopped_at": watch.stopped_at,
        "findings": [f.to_dict() for f in watch.findings],
        "gradients": {
            "checks": len(watch.history),
            "last_check_step": last["step"] if last else None,
            "missing": last["missing"] if last else None, "nonfinite": last["nonfinite"] if last else None,
            "per_layer": last["layers"] if last else {},
            "params_moved": sum(moved.values()), "params_trainable": len(moved),
            "moved_checked": watch.moved_checked,
        },
    }


def _save_adapter(setup, model_spec, ropts: RecipeOptions, opts: TrainOptions, path: str) -> None:
    """The adapter, written atomically: PeftModel.from_pretrained loads it; gradflow.load_adapter adds SO(8)."""
    from gradflow.training import so8

    model = setup.model
    if not hasattr(model, "peft_config"):
        # not a PEFT model (a factory's own module): save its trainable state, which is what trained
        import torch

        tmp = f"{path}.tmp-{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        state = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(state, os.path.join(tmp, "trainable_state.pt"))
        _replace_dir(tmp, path)
        return
    base = model_spec if isinstance(model_spec, str) and setup.kind in ("preset", "dir", "hub") else None
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    config_path = os.path.join(tmp, "adapter_config.json")
    if base is not None and os.path.isfile(config_path):
        # written after saving: a preset name resolves again through gradflow (a temp path would not), and
        # PEFT would otherwise try to look the name up on the hub while saving
        with open(config_path) as fh:
            adapter_config = json.load(fh)
        adapter_config["base_model_name_or_path"] = base
        with open(config_path, "w") as fh:
            json.dump(adapter_config, fh, indent=2)
    if opts.so8_layers:
        so8.write_meta(tmp, opts.so8_layers)
    with open(os.path.join(tmp, RUN_META), "w") as fh:
        json.dump({"base": base, "base_kind": setup.kind, "base_seed": ropts.seed, "quant": ropts.quant,
                   "dtype": ropts.dtype, "so8_layers": opts.so8_layers}, fh, indent=2)
    if setup.tokenizer is not None:
        try:
            setup.tokenizer.save_pretrained(tmp)
        except Exception:  # a tokenizer that cannot save is no reason to lose the adapter
            pass
    _replace_dir(tmp, path)


def _replace_dir(tmp: str, path: str) -> None:
    if os.path.isdir(path):
        old = f"{path}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
