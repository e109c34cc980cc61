"""`gradflow patch`: probe, apply the fixes the findings call for, probe again, and show the proof and the code."""

from __future__ import annotations

from typing import Optional

import typer

from gradflow.cli import _options as o
from gradflow.cli._errors import fail


def patch(
    model: o.ModelArg,
    lora_r: o.LoraR = None, lora_alpha: o.LoraAlpha = None, lora_targets: o.LoraTargets = None,
    adapter: o.Adapter = None, adapter_trainable: o.AdapterTrainable = False, quant: o.Quant = "none",
    gc: o.GC = None, dtype: o.DType = None, device: o.Device = "auto", trainable: o.Trainable = None,
    trust_remote_code: o.TrustRemoteCode = False,
    data: o.Data = None, batch_size: o.BatchSize = 2, seq_len: o.SeqLen = 32, seed: o.Seed = 0,
    unsafe_fixes: bool = typer.Option(False, "--unsafe-fixes", help="Also apply fixes that change what the model learns."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan; change nothing."),
    save: Optional[str] = typer.Option(None, "--save", help="Write the patched adapter (save_pretrained) and "
                                                            "gradflow_recipe.json (for train --recipe) to DIR."),
    format: o.Format = "text",
    detail: o.Detail = "compact",
    fail_on: o.FailOn = None, select: o.Select = None, ignore: o.Ignore = None, baseline: o.Baseline = None,
    update_baseline: o.UpdateBaseline = False, quiet: o.Quiet = False, isolated: o.Isolated = False,
):
    """Apply the safe fixes (unsafe ones with --unsafe-fixes), re-probe, and print the before/after and the code."""
    from gradflow.cli._common import Gate, prepare, user_code
    from gradflow.cli._output import Output
    from gradflow.errors import GradflowError
    from gradflow.setup.sources import Kind

    out = Output(format, quiet=quiet)
    try:
        gate = Gate(fail_on=fail_on, select=select, ignore=ignore, trainable=trainable, baseline=baseline,
                    update_baseline=update_baseline, isolated=isolated)
        if save is not None and dry_run:
            raise GradflowError("--save writes the patched model, --dry-run changes nothing", "Pass one of them")
        from gradflow.fixes.recipe_file import check_save_dir, check_save_target, save_patched

        if save is not None:
            check_save_dir(save)
        opts = o.setup_options(lora_r, lora_alpha, lora_targets, adapter, adapter_trainable, quant, gc, dtype,
                               device, gate.trainable, trust_remote_code, seed)
        setup, batch = prepare(model, opts, data=data, batch_size=batch_size, seq_len=seq_len, seed=seed, out=out)
        trained = setup.model.model if setup.kind == Kind.TRAINER else setup.model  # a Trainer's model is saved
        if save is not None:
            check_save_target(trained, save)
        import gradflow

        with out.status("probing, patching and probing again"), user_code(setup):
            report = gradflow.patch(setup.model, batch, loss_fn=setup.loss_fn, optimizer=setup.optimizer,
                                    trainable=setup.trainable, unsafe=unsafe_fixes, dry_run=dry_run)
        if save is not None:
            with out.status(f"saving to {save}"):
                report.patch.saved = save_patched(trained, report, save, source=model,
                                               base_name=setup.preset if setup.kind == Kind.PRESET else None)
        report, code = gate.judge(report, command="patch", model=model)
    except Exception as exc:
        fail(exc)
    if format == "json":
        out.data(report.to_dict(detail))
    else:
        from gradflow.report.render.patch import patch_text, snippet_text

        out.show(patch_text(report))
        if report.patch.snippet:
            out.out.print(snippet_text(report.patch.snippet), soft_wrap=True)
    gate.explain(out)
    raise typer.Exit(code)

