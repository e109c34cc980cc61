"""## What it does
Names the modules whose trainable parameters took no part in the forward (a stale reference to a module PEFT
replaced, a head never called, a branch behind a flag).

## Why this fix
Whether to call, freeze or remove the module is your decision.

## Fix safety
Display-only.
"""

from __future__ import annotations

from gradflow.fixes._base import Fix, Plan, describe_module

ANSWERS = ("trainable-param-unused",)


def plan(ctx, finding):
    where = describe_module(ctx.model, finding.location) if finding.location is not None else "the model"
    return Plan(fix=FIX, data={}, answers=[finding.slug], location=finding.location, applicability="display-only",
                key=f"advice:{finding.slug}:{finding.location}",
                changes=[f"{where} never ran in the forward: call it, freeze it, or remove it "
                         f"({len(finding.params)} trainable parameters)"],
                why="parameters that never run cost optimizer memory and never learn",
                snippet_lines=[f"# {finding.slug}: {where} never runs in the forward; freeze it if it should not:",
                               f"#     model.get_submodule({finding.location!r}).requires_grad_(False)"])


FIX = Fix(id="unused-params", title="Call, freeze or remove modules the forward never runs",
          applicability="display-only", answers=ANSWERS, plan=plan, doc=__doc__)
