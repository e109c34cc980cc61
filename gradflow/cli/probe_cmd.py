"""`gradflow probe-backward`: one forward+backward, every trainable parameter's gradient classified."""

from __future__ import annotations

import typer

from gradflow.cli import _options as o
from gradflow.cli._errors import fail


@o.command
def probe_backward(
    model: o.ModelArg,
    setup: o.SetupArgs,
    probe: o.ProbeArgs,
    format: o.ProbeFormat = "text",
    detail: o.Detail = "compact",
    ci: o.CIArgs = None,
    check_gc: bool = typer.Option(False, "--check-gc", rich_help_panel="Probe",
                                  help="Also compare every trainable gradient with checkpointing on and off."),
    steps: int = typer.Option(0, "--steps", metavar="K", rich_help_panel="Probe",
                              help="Also take K real optimizer steps (then restore) and report parameters that "
                                   "did not move and a zero learning rate. 0: none."),
    packed: bool = typer.Option(False, "--packed", rich_help_panel="Probe",
                                help="Probe a packed batch: the --batch-size samples in one row, position ids "
                                     "restarting per sample, and check that no sample's loss reaches another's "
                                     "inputs (packed-attention-leak)."),
    dry_run: o.DryRun = False,
    ddp: bool = typer.Option(False, "--ddp", rich_help_panel="Distributed",
                             help="Under torchrun: wrap the model in DistributedDataParallel, probe on every rank "
                                  "(same batch) and print one report gathered on rank 0."),
    fsdp: bool = typer.Option(False, "--fsdp", rich_help_panel="Distributed",
                              help="Under torchrun: shard the model with FSDP2 (fully_shard per decoder layer), "
                                   "probe on every rank and print one report gathered on rank 0."),
):
    """Run one forward and backward and show where gradients stop, and why."""
    from gradflow.cli._common import Gate, finish, user_code
    from gradflow.cli._output import Output

    out = Output(format, quiet=ci.quiet)
    try:
        gate = Gate(ci, setup.trainable)
        wrapper = o.wrapper(ddp, fsdp, update_baseline=ci.update_baseline)
        import gradflow

        with user_code(model):
            report = gradflow.probe(model, setup=setup.options(seed=probe.seed, trainable=gate.trainable),
                                    data=probe.data, batch_size=probe.batch_size, seq_len=probe.seq_len,
                                    seed=probe.seed, check_gc=check_gc, steps=steps, packed=packed, dry_run=dry_run,
                                    wrapper=wrapper, status=out.status)
        report, code = gate.judge(report, command="probe-backward", model=model)
    except Exception as exc:
        fail(exc)
    if format == "json":
        out.data(report.to_dict(detail))
    elif format == "sarif":
        from gradflow.report.render.sarif import to_sarif

        out.data(to_sarif(report, source=model, config=gate.settings.config.path))  # the factory line, where known
    else:
        from gradflow.report.render.text import probe_text

        out.show(probe_text(report))
        if dry_run:
            from gradflow.dryrun import note_text

            out.show("")  # a blank line between the report and what the dry run could not see
            out.show(note_text(report))
    finish(out, report, gate, code)
