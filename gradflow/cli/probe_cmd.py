"""`gradflow probe-backward`: one forward+backward, every trainable parameter's gradient classified."""

from __future__ import annotations

import typer

from gradflow.cli import _options as o
from gradflow.cli._errors import fail


def probe_backward(
    model: o.ModelArg,
    lora_r: o.LoraR = None, lora_alpha: o.LoraAlpha = None, lora_targets: o.LoraTargets = None,
    adapter: o.Adapter = None, adapter_trainable: o.AdapterTrainable = False, quant: o.Quant = "none",
    gc: o.GC = None, dtype: o.DType = None, device: o.Device = "auto", trainable: o.Trainable = None,
    trust_remote_code: o.TrustRemoteCode = False,
    data: o.Data = None, batch_size: o.BatchSize = 2, seq_len: o.SeqLen = 32, seed: o.Seed = 0,
    format: o.ProbeFormat = "text",
    detail: o.Detail = "compact",
    fail_on: o.FailOn = None, select: o.Select = None, ignore: o.Ignore = None, baseline: o.Baseline = None,
    update_baseline: o.UpdateBaseline = False, quiet: o.Quiet = False, isolated: o.Isolated = False,
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
    from gradflow.cli._common import Gate, prepare, user_code
    from gradflow.cli._output import Output

    out = Output(format, quiet=quiet)
    try:
        gate = Gate(fail_on=fail_on, select=select, ignore=ignore, trainable=trainable, baseline=baseline,
                    update_baseline=update_baseline, isolated=isolated)
        if steps:
            from gradflow.probing.steps import check_steps

            check_steps(steps)
        opts = o.setup_options(lora_r, lora_alpha, lora_targets, adapter, adapter_trainable, quant, gc, dtype,
                               device, gate.trainable, trust_remote_code, seed)
        launch = None
        if ddp or fsdp:
            from gradflow import world
            from gradflow.errors import GradflowError

            if ddp and fsdp:
                raise GradflowError("--ddp and --fsdp are two ways to wrap one model", "Pass one of them")
            launch = world.start("fsdp" if fsdp else "ddp", refused={
                "--dry-run": dry_run, "--check-gc": check_gc, "--steps": steps, "--packed": packed,
                "--update-baseline": update_baseline})
        if dry_run:
            from gradflow.dryrun import dry_run as run_dry, refuse_flags

            refuse_flags({"--check-gc": check_gc, "--steps": steps, "--packed": packed})
            with out.status(f"dry run of {model} (no weights)"), user_code():
                report = run_dry(model, opts, command="probe-backward", batch_size=batch_size, seq_len=seq_len,
                                 seed=seed, data=data)
        else:
            adopt = None
            if launch is not None:
                from gradflow import distributed

                adopt = lambda setup: distributed.adopt(setup, launch)  # noqa: E731
            setup, batch = prepare(model, opts, data=data, batch_size=batch_size, seq_len=seq_len, seed=seed, out=out,
                                   adopt=adopt)
            if packed:
                from gradflow.setup.load import packed_batch

                batch = packed_batch(setup, data=data, batch_size=batch_size, seq_len=seq_len, seed=seed)
            import gradflow

            with out.status("probing forward and backward"), user_code(setup):
                if launch is not None:
                    from gradflow import distributed

                    report = distributed.probe(setup, batch, launch)
                else:
                    report = gradflow.probe(setup.model, batch, loss_fn=setup.loss_fn, optimizer=setup.optimizer,
                                            trainable=setup.trainable, check_gc=check_gc, steps=steps,
                                            lr_scheduler=setup.lr_scheduler)
            if launch is None:  # a Trainer factory under torchrun started the process group: rank 0 speaks
                from gradflow.report.ranks import speak_for_ranks

                speak_for_ranks(report)
        report, code = gate.judge(report, command="probe-backward", model=model)
    except Exception as exc:
        fail(exc)
    if format == "json":
        out.data(report.to_dict(detail))
    elif format == "sarif":
        from gradflow.report.render.sarif import to_sarif

        out.data(to_sarif(report, source=model))  # results point at the factory line, where known
    else:
        from gradflow.report.render.text import probe_text

        out.show(probe_text(report))
        if dry_run:
            from gradflow.dryrun import note_text

            out.show("")  # a blank line between the report and what the dry run could not see
            out.show(note_text(report))
    gate.explain(out)
    from gradflow.world import end

    end()  # under torchrun: every rank waits for rank 0's output, then the process group goes
    raise typer.Exit(code)
