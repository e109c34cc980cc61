"""`gradflow patch`: probe, apply the fixes the findings call for, probe again, and show the proof and the code."""

from __future__ import annotations

from typing import Optional

import typer

from gradflow.cli import _options as o
from gradflow.cli._errors import fail


@o.command
def patch(
    model: o.ModelArg,
    setup: o.SetupArgs,
    probe: o.ProbeArgs,
    unsafe_fixes: bool = typer.Option(False, "--unsafe-fixes", help="Also apply fixes that change what the model learns."),
    plan_only: bool = typer.Option(False, "--plan-only", help="Show the plan; change nothing."),
    dry_run: bool = typer.Option(False, "--dry-run", hidden=True, help="The old name of --plan-only."),
    save: Optional[str] = typer.Option(None, "--save", help="Write the patched adapter (save_pretrained) and "
                                                            "gradflow_recipe.json (for train --recipe) to DIR."),
    format: o.Format = "text",
    detail: o.Detail = "compact",
    ci: o.CIArgs = None,
):
    """Apply the safe fixes (unsafe ones with --unsafe-fixes), re-probe, and print the before/after and the code."""
    from gradflow.cli._common import Gate, user_code
    from gradflow.cli._output import Output
    from gradflow.errors import GradflowError
    from gradflow.setup.sources import Kind

    out = Output(format, quiet=ci.quiet)
    # patch's "change nothing" is --plan-only: --dry-run means "load no weights" on inspect and probe-backward
    plan_flag = "--dry-run" if dry_run else "--plan-only"
    plan_only = plan_only or dry_run
    try:
        gate = Gate(ci, setup.trainable)
        if save is not None and plan_only:
            raise GradflowError(f"--save writes the patched model, {plan_flag} changes nothing", "Pass one of them")
        from gradflow.fixes.recipe_file import check_save_dir, check_save_target, save_patched

        if save is not None:
            check_save_dir(save)
        loaded = []

        def check_target(spec_setup) -> None:  # before patching: a bad --save target fails before any work
            loaded.append(spec_setup)
            if save is not None:
                check_save_target(_trained(spec_setup), save)

        import gradflow

        with user_code(model):
            report = gradflow.patch(model, setup=setup.options(seed=probe.seed, trainable=gate.trainable),
                                    data=probe.data, batch_size=probe.batch_size, seq_len=probe.seq_len,
                                    seed=probe.seed, unsafe=unsafe_fixes, dry_run=plan_only, status=out.status,
                                    loaded=check_target)
        if save is not None:
            spec_setup = loaded[0]
            with out.status(f"saving to {save}"):
                report.patch.saved = save_patched(_trained(spec_setup), report, save, source=model,
                                                  base_name=spec_setup.preset if spec_setup.kind == Kind.PRESET
                                                  else None)
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


def _trained(spec_setup):
    """What --save writes: the model, or a Trainer's model."""
    from gradflow.setup.sources import Kind

    return spec_setup.model.model if spec_setup.kind == Kind.TRAINER else spec_setup.model
