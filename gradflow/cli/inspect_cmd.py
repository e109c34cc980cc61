"""`gradflow inspect`: the model as a tree, with checkpointing, hooks and (unless --static) a forward trace."""

from __future__ import annotations

from typing import Optional

import typer

from gradflow.cli import _options as o
from gradflow.cli._errors import fail


@o.command
def inspect(
    model: o.ModelArg,
    setup: o.SetupArgs,
    probe: o.ProbeArgs,
    static: bool = typer.Option(False, "--static", help="Describe only; do not run a forward."),
    depth: Optional[int] = typer.Option(4, "--depth", help="Tree depth to show; single-child wrappers (PeftModel, LoraModel) do not count, and the way to a cut is always shown."),
    format: o.Format = "text",
    detail: o.Detail = "compact",
    ci: o.CIArgs = None,
    dry_run: o.DryRun = False,
):
    """Show the model module by module: trainable/frozen/quantized counts, dtype, hooks, checkpointing."""
    from gradflow.cli._common import Gate, finish, user_code
    from gradflow.cli._output import Output

    out = Output(format, quiet=ci.quiet)
    try:
        gate = Gate(ci, setup.trainable)
        if depth is not None:
            from gradflow.limits import check_int

            check_int("--depth", depth)
        import gradflow

        with user_code(model):
            report = gradflow.inspect(model, static=static, setup=setup.options(seed=probe.seed,
                                                                                  trainable=gate.trainable),
                                      data=probe.data, batch_size=probe.batch_size, seq_len=probe.seq_len,
                                      seed=probe.seed, dry_run=dry_run, status=out.status)
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
    finish(out, report, gate, code)
