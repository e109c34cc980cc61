"""## What it does
Points at the exception when the forward, the loss or the backward raised, with the message that names it.

## Why this fix
No gradient can be checked, let alone fixed, until one step runs; the error is in the model code, the batch or
the loss function, which only you can change.

## Fix safety
Display-only.
"""

from __future__ import annotations

from gradflow.fixes._base import Fix, Plan

ANSWERS = ("step-raised",)


def plan(ctx, finding):
    return Plan(fix=FIX, data={}, answers=[finding.slug], applicability="display-only", key=f"advice:{finding.slug}",
                changes=[f"fix the error first: {finding.message}"],
                why="the training step raises, so nothing can train",
                snippet_lines=[f"# {finding.slug}: {finding.message}"])


FIX = Fix(id="fix-step-error", title="Fix the error the step raises", applicability="display-only",
          answers=ANSWERS, plan=plan, doc=__doc__)
