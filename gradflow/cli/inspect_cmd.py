"""`gradflow inspect`: the model as a tree, with checkpointing, hooks and (unless --static) a forward trace."""

from __future__ import annotations

from typing import Optional

import typer

from gradflow.cli import _options as o
from gradflow.cli._errors import fail


def inspect(
    model: o.ModelArg,
    lora_r: o.LoraR = None, lora_alpha: o.LoraAlpha = None, lora_targets: o.LoraTargets = None,
    adapter: o.Adapter = None, adapter_trainable: o.AdapterTrainable = False, quant: o.Quant = "none",
    gc: o.GC = None, dtype: o.DType = None, device: o.Device = "auto", trainable: o.Trainable = None,
    trust_remote_code: o.TrustRemoteCode = False,
    data: o.Data = None, batch_size: o.BatchSize = 2, seq_len: o.SeqLen = 32, seed: o.Seed = 0,
    static: bool = typer.Option(False, "--static", help="Describe only; do not run a forward."),
    depth: Optional[int] = typer.Option(4, "--depth", help="Tree depth to show; single-child wrappers (PeftModel, LoraModel) do not count, and the way to a cut is always shown."),
    format: o.Format = "text",
    detail: o.Detail = "compact",
    fail_on: o.FailOn = None, select: o.Select = None, ignore: o.Ignore = None, baseline: o.Baseline = None,
    update_baseline: o.UpdateBaseline = False, quiet: o.Quiet = False, isolated: o.Isolated = False,
    dry_run: o.DryRun = False,
):
    """Show the model module by module: trainable/frozen/quantized counts, dtype, hooks, checkpointing."""
    from gradflow.cli._common import Gate, prepare, user_code
    from gradflow.cli._output import Output

    out = Output(format, quiet=quiet)
    try:
        gate = Gate(fail_on=fail_on, select=select, ignore=ignore, trainable=trainable, baseline=baseline,
                    update_baseline=update_baseline, isolated=isolated)
        if depth is not None:
            from gradflow.limits import check_int

            check_int("--depth", depth)
        opts = o.setup_options(lora_r, lora_alpha, lora_targets, adapter, adapter_trainable, quant, gc, dtype,
                               device, gate.trainable, trust_remote_code, seed)
        if dry_run:
            from gradflow.dryrun import dry_run as run_dry

            with out.status(f"dry run of {model} (no weights)"), user_code():
                report = run_dry(model, opts, command="inspect", static=static, batch_size=batch_size,
                                 seq_len=seq_len, seed=seed, data=data)
        else:
            setup, batch = prepare(model, opts, data=data, batch_size=batch_size, seq_len=seq_len, seed=seed,
                                   out=out)
            import gradflow

            with user_code(setup):
                report = gradflow.inspect(setup.model, batch, static=static, loss_fn=setup.loss_fn,
                                          trainable=setup.trainable)
            from gradflow.report.ranks import speak_for_ranks

            speak_for_ranks(report)  # a Trainer factory under torchrun started the process group: rank 0 speaks
        report, code = gate.judge(report, command="inspect", model=model)
    except Exception as exc:
        fail(exc)
    if format == "json":
        out.data(report.to_dict(detail))
    else:
        from gradflow.report.render.tree import inspect_text

        out.show(inspect_text(report, depth=depth, static=static))
        if dry_run:
            from gradflow.dryrun import note_text

            out.show("")  # a blank line between the report and what the dry run could not see
            out.show(note_text(report))
    gate.explain(out)
    from gradflow.world import end

    end()  # under torchrun: every rank waits for rank 0's output, then the process group goes
    raise typer.Exit(code)
