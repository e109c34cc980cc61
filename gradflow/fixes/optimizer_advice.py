"""## What it does
Shows how to build the optimizer so that it holds every trainable parameter.

## Why this fix
The optimizer is yours: built before `get_peft_model`, before an unfreeze or before patch, it misses parameters,
which then get gradients and never change.

## Fix safety
Display-only.
"""

from __future__ import annotations

from gradflow.fixes._base import Fix, Plan

ANSWERS = ("param-not-in-optimizer",)


def plan(ctx, finding):
    return Plan(fix=FIX, data={}, answers=[finding.slug], location=finding.location, applicability="display-only",
                key=f"advice:{finding.slug}",
                changes=[f"build the optimizer after the model is final (after this patch): {len(finding.params)} "
                         f"trainable parameters are missing from it, first {finding.params[0] if finding.params else '?'}"],
                why="parameters missing from the optimizer get gradients but never change",
                snippet_lines=[f"# {finding.slug}: build the optimizer after this block:",
                               "#     optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], "
                               "lr=...)"])


FIX = Fix(id="rebuild-optimizer", title="Build the optimizer after the model is final", applicability="display-only",
          answers=ANSWERS, plan=plan, doc=__doc__)
