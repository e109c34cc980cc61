"""`gradflow train` and `gradflow merge`: thin commands over gradflow.training."""

from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

from gradflow import choices as c
from gradflow.cli import _options as o
from gradflow.cli._errors import fail

_T = "Training"

DataFile = Annotated[str, typer.Option("--data", help="JSONL: {text}, {prompt, completion} or {messages} per line.",
                                       show_default=False)]
OutputDir = Annotated[str, typer.Option("--output", "-o", help="Run directory: adapter/, checkpoints/, report.json, "
                                                                "audit.jsonl, tensorboard/, grad_norms.png.",
                                        show_default=False)]


@o.command
def train(
    model: o.ModelArg,
    data: DataFile,
    output: OutputDir,
    setup: o.SetupArgs,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.", rich_help_panel=_T)] = 2e-4,
    epochs: Annotated[float, typer.Option("--epochs", help="Passes over the data.", rich_help_panel=_T)] = 1.0,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Optimizer steps (overrides --epochs).",
                                                     rich_help_panel=_T)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per device per step (with packing: the "
                                                                 "token budget is --batch-size x --seq-len).",
                                            rich_help_panel=_T)] = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Gradient accumulation steps.",
                                            rich_help_panel=_T)] = 1,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Truncate samples to this many tokens (packed "
                                                           "batches hold whole samples; with --no-packing batches are "
                                                           "padded to their longest row, not to this).",
                                         rich_help_panel=_T)] = 512,
    seed: o.Seed = 0,
    precision: Annotated[c.Precision, typer.Option("--precision", parser=c.Precision.parse,
                                                   help="Mixed precision (fp32: off).", rich_help_panel=_T)] = "fp32",
    loss_on: Annotated[c.LossOn, typer.Option("--loss-on", parser=c.LossOn.parse, help="completion: the "
                                              "assistant/completion tokens; all: every token.",
                                              rich_help_panel=_T)] = "completion",
    strict: Annotated[bool, typer.Option("--strict", help="Fail on malformed lines instead of skipping them.",
                                         rich_help_panel=_T)] = False,
    think_lenient: Annotated[bool, typer.Option("--think-lenient", help="Train /think samples whose tags are "
                                                "written with look-alikes as normalised, instead of skipping them.",
                                                rich_help_panel=_T)] = False,
    so8_layers: Annotated[Optional[str], typer.Option("--so8-layers", help="Layers that get an SO(8) rotation "
                                                                           "adapter before o_proj, e.g. 2,3.",
                                                      rich_help_panel=_T)] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="Apply a recipe written by 'gradflow patch "
                                                                   "--save' before the pre-flight.",
                                                  rich_help_panel=_T)] = None,
    unsafe_fixes: Annotated[bool, typer.Option("--unsafe-fixes", help="Let the pre-flight patch apply unsafe "
                                                                      "fixes too.", rich_help_panel=_T)] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest intact checkpoint in "
                                                          "--output, made with the same options.",
                                         rich_help_panel=_T)] = False,
    resume_anyway: Annotated[bool, typer.Option("--resume-anyway", help="Resume even though options that change "
                                                                        "the result differ from the run's.",
                                                rich_help_panel=_T)] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous run in --output.",
                                            rich_help_panel=_T)] = False,
    merge: Annotated[bool, typer.Option("--merge", help="Also write OUTPUT/merged: LoRA and SO(8) folded into "
                                                        "the base weights.", rich_help_panel=_T)] = False,
    check_every: Annotated[int, typer.Option("--check-every", help="Check gradients every N steps.",
                                             rich_help_panel=_T)] = 10,
    moved_at: Annotated[int, typer.Option("--moved-at", help="At this step, check the adapter weights moved.",
                                          rich_help_panel=_T)] = 5,
    save_steps: Annotated[int, typer.Option("--save-steps", help="Checkpoint every N steps.",
                                            rich_help_panel=_T)] = 50,
    logging_steps: Annotated[int, typer.Option("--logging-steps", help="Log loss every N steps.",
                                               rich_help_panel=_T)] = 10,
    packing: Annotated[bool, typer.Option("--packing/--no-packing", help="Pack samples into padding-free "
                                          "token-budget batches (attention never crosses samples); --no-packing pads "
                                          "each batch to its longest row.", rich_help_panel=_T)] = True,
    tokens_per_batch: Annotated[Optional[int], typer.Option("--tokens-per-batch", help="Tokens per packed batch. "
                                                            "Default: the memory plan's (--batch-size x --seq-len "
                                                            "when it fits).", rich_help_panel=_T)] = None,
    gc_every: Annotated[Optional[int], typer.Option("--gc-every", help="Checkpoint every N-th decoder layer (1: all). "
                                                    "Default: the memory plan's choice.", rich_help_panel=_T)] = None,
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="Memory the plan may use, e.g. 24GiB or "
                                                      "500MiB. Default: the device's free memory.",
                                                      rich_help_panel=_T)] = None,
    attn: Annotated[c.Attn, typer.Option("--attn", parser=c.Attn.parse, help="Attention (auto: flex_attention on "
                                         "CUDA, else sdpa).", rich_help_panel=_T)] = "auto",
    ce: Annotated[c.CE, typer.Option("--ce", parser=c.CE.parse, help="Cross-entropy (auto: chunked on CUDA where "
                                     "the model supports it).", rich_help_panel=_T)] = "auto",
    compile_mode: Annotated[c.Compile, typer.Option("--compile", parser=c.Compile.parse, help="torch.compile each decoder "
                                               "layer (auto: on CUDA with Triton, one process).",
                                               rich_help_panel=_T)] = "auto",
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Under torchrun: shard with FSDP2 (accelerate's plugin, one unit per decoder layer); sharded checkpoints, one consolidated adapter.", rich_help_panel="Distributed")] = False,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Keep the tokenised data and the compiled kernels "
                                        "in ~/.cache/gradflow for the next run (GRADFLOW_NO_CACHE=1 turns it off "
                                        "too).", rich_help_panel=_T)] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also print how long each stage took before the "
                                          "first step (stderr).", rich_help_panel=_T)] = False,
    format: o.Format = "text",
    quiet: o.Quiet = False, isolated: o.Isolated = False,
):
    """Fine-tune with gradient-flow checks: pre-flight probe → patch → probe, then Trainer with a live watch.

    Exit 0 when training completed (or had already); 1 when the pre-flight refused to start or the watch stopped
    the run (the findings say why); 2 on bad input; 130 / 143 after SIGINT / SIGTERM, with a checkpoint saved.
    """
    from gradflow.cli._common import check_format
    from gradflow.cli._output import Output
    from gradflow.errors import ExitCode

    out = Output(format, quiet=quiet)
    try:
        check_format(format, ("text", "json"))
        from gradflow.report.config import resolve

        trainable = resolve(trainable=setup.trainable, isolated=isolated).trainable  # else [tool.gradflow]'s
        opts = setup.options(seed=seed, trainable=trainable, so8_layers=_so8_layers(so8_layers))
        import gradflow
        from gradflow.stdio import stdout_to_stderr

        with stdout_to_stderr():  # the factory's and libraries' writes, even below Python: stdout is the report's
            report = gradflow.train(
                model, data, output, setup_options=opts, learning_rate=lr, epochs=epochs, max_steps=max_steps,
                batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, seed=seed, precision=str(precision),
                loss_on=str(loss_on), strict=strict, think_lenient=think_lenient, recipe=recipe,
                unsafe_fixes=unsafe_fixes, resume=resume, resume_anyway=resume_anyway, overwrite=overwrite, merge=merge,
                check_every=check_every, moved_at_step=moved_at, save_steps=save_steps, logging_steps=logging_steps,
                packing=packing, tokens_per_batch=tokens_per_batch, gc_every=gc_every, max_memory=max_memory, attn=attn,
                ce=ce, compile=compile_mode, fsdp=fsdp, cache=cache, progress=not quiet, started=_started())
    except KeyboardInterrupt:  # Ctrl-C while loading or writing: inside the training steps it saves a checkpoint
        import sys

        sys.stderr.write("gradflow: interrupted outside the training steps: this stop saved nothing\n")
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    except Exception as exc:
        fail(exc)
    from gradflow.world import end

    end()  # every rank together, before rank 0 prints and the process exits
    state = report.train
    import os

    if state["status"] == "interrupted":
        _interrupted(state, report, out)
    if os.environ.get("RANK", "0") != "0":  # under torchrun / accelerate launch, rank 0 speaks for the run
        raise typer.Exit(int(ExitCode.OK if state["status"] == "completed" else ExitCode.FINDINGS))
    if state.get("already_complete"):
        _already_complete(state, output, report, out)
    _startup_line(state, verbose and not quiet)
    if format == "json":
        out.data(report.to_dict())
    else:
        from gradflow.report.render.train import train_text

        out.show(train_text(report))
    if state["status"] == "refused":
        why = state["refused_because"]
        more = f" (and {len(why) - 1} more)" if len(why) > 1 else ""
        import sys

        sys.stderr.write(f"gradflow: the pre-flight refused to start: {why[0]}{more}. "
                         f"Run 'gradflow patch {model}' to see the fixes, or fix the setup\n")
    raise typer.Exit(int(ExitCode.OK if state["status"] == "completed" else ExitCode.FINDINGS))


def _started() -> float | None:
    """When this process started: the startup profile counts from there, the imports before train() included."""
    from gradflow.training.startup import process_started

    return process_started()


def _startup_line(state: dict, verbose: bool) -> None:
    """--verbose: how long each stage took before the first step, one line on stderr."""
    import sys

    from gradflow.training.startup import startup_line

    if verbose and state.get("startup"):
        sys.stderr.write(startup_line(state["startup"]) + "\n")


def _so8_layers(text: str | None) -> list[int]:
    if text is None:  # gradflow.setup.so8 imports torch: a refused run should not wait for it
        return []
    from gradflow.setup.so8 import parse_layers

    return parse_layers(text)


def _resume_command() -> str:
    """This command line with --resume (and without --overwrite), to paste."""
    import shlex
    import sys

    argv = sys.argv[1:]
    if "train" not in argv:  # run in-process (tests, notebooks): the arguments are not this command's
        return "gradflow train ... --resume"
    argv = [a for a in argv[argv.index("train"):] if a != "--overwrite"]
    if "--resume" not in argv and "--resume-anyway" not in argv:
        argv.append("--resume")
    return shlex.join(["gradflow", *argv])


def _interrupted(state: dict, report, out) -> "NoReturn":  # noqa: F821
    """After SIGINT / SIGTERM: one line with the step, the checkpoint and the command that resumes; 128+N."""
    import os
    import signal
    import sys

    from gradflow.training.signals import exit_code

    if os.environ.get("RANK", "0") == "0":
        if out.fmt == "json":
            out.data(report.to_dict())
        sys.stderr.write(f"gradflow: {state['signal']}: stopped at step {state['steps']}/{state['max_steps']} with "
                         f"{state['checkpoint']} saved. Resume with: {_resume_command()}\n")
        sys.stderr.flush()
    raise typer.Exit(exit_code(signal.Signals[state["signal"]]))


def _already_complete(state: dict, output: str, report, out) -> "NoReturn":  # noqa: F821
    """--resume on a run that had ended: it trains nothing, says so, exit 0 (the stored report with --format json)."""
    import os
    import sys

    if out.fmt == "json":
        out.data(report.to_dict())
    sys.stderr.write(f"gradflow: the run in {output} is complete ({state['steps']}/{state['max_steps']} steps): "
                     f"nothing to resume. Its adapter is in {os.path.join(output, state.get('adapter', 'adapter'))}; "
                     "pass --overwrite to train it again\n")
    sys.stderr.flush()
    raise typer.Exit(0)


def merge(
    adapter_dir: Annotated[str, typer.Argument(help="An adapter directory a training run wrote (OUTPUT/adapter).",
                                               show_default=False)],
    output: OutputDir,
    dtype: o.DType = None,
    device: o.Device = "cpu",
    trust_remote_code: o.TrustRemoteCode = False,
):
    """Fold LoRA and SO(8) rotations into the base weights (o_proj ← W·blockdiag(R)) and save a full model."""
    try:
        from gradflow.training.merge import merge as run_merge

        done = run_merge(adapter_dir, output, dtype=c.plain(dtype), device=c.plain(device), trust_remote_code=trust_remote_code)
    except Exception as exc:
        fail(exc)
    print(f"merged {adapter_dir} into {done['output']} ({done['so8_folded']} SO(8) rotation(s) folded into o_proj)")
