"""## What it does
Names the module (and the file and line of its forward) where the autograd graph is cut: `.detach()`, `.data`,
`torch.no_grad()`, inference mode or a non-differentiable op.

## Why this fix
The cut is in code gradflow does not rewrite; removing it is a one-line change there.

## Fix safety
Display-only.
"""

from __future__ import annotations

from gradflow.fixes._base import Fix, Plan, describe_module

ANSWERS = ("graph-break",)


def plan(ctx, finding):
    where = describe_module(ctx.model, finding.location) if finding.location is not None else "the model"
    return Plan(fix=FIX, data={}, answers=[finding.slug], location=finding.location, applicability="display-only",
                key=f"advice:{finding.slug}:{finding.location}",
                changes=[f"in {where}: remove the .detach() / .data / torch.no_grad() / inference_mode from the "
                         "training path"],
                why="parameters before the cut get no gradient",
                snippet_lines=[f"# {finding.slug}: in {where}:",
                               "#     remove .detach() / .data / torch.no_grad() from the forward"])


FIX = Fix(id="remove-graph-break", title="Remove the graph break from the forward", applicability="display-only",
          answers=ANSWERS, plan=plan, doc=__doc__)
