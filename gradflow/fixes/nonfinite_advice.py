"""## What it does
Names the module (and the file and line of its forward) where NaN/Inf first appear.

## Why this fix
The arithmetic is yours: an eps, a clamp, or fp32 for the unstable op fixes it at the source.

## Fix safety
Display-only.
"""

from __future__ import annotations

from gradflow.fixes._base import Fix, Plan, describe_module

ANSWERS = ("nonfinite-grad",)


def plan(ctx, finding):
    where = describe_module(ctx.model, finding.location) if finding.location is not None else "the model"
    return Plan(fix=FIX, data={}, answers=[finding.slug], location=finding.location, applicability="display-only",
                key=f"advice:{finding.slug}:{finding.location}",
                changes=[f"in {where}: make the op numerically safe (eps, clamp, fp32 for that op) or lower the loss "
                         "scale"],
                why="one non-finite gradient poisons the optimizer state",
                snippet_lines=[f"# {finding.slug}: in {where}: add an eps / clamp, or compute that op in fp32"])


FIX = Fix(id="numerically-safe-op", title="Make the named module numerically safe", applicability="display-only",
          answers=ANSWERS, plan=plan, doc=__doc__)
