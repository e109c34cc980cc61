"""## What it does
Shows where the loss is computed when it does not depend on the model output (a detached or recomputed loss, a
leaf with requires_grad set by hand, or a zero added so that backward stops raising).

## Why this fix
Only your code can compute the loss from the model output; gradflow does not rewrite it.

## Fix safety
Display-only.
"""

from __future__ import annotations

from gradflow.fixes._base import Fix, Plan, where_defined

ANSWERS = ("loss-detached",)


def plan(ctx, finding):
    if ctx.loss_fn is not None:
        where = f"your loss_fn {getattr(ctx.loss_fn, '__name__', '')}".rstrip()
        line = where_defined(ctx.loss_fn)
        where += f" at {line}" if line else ""
    else:
        line = where_defined(ctx.model)
        where = f"the forward of {type(ctx.model).__name__}" + (f" at {line}" if line else "")
    return Plan(fix=FIX, data={}, answers=[finding.slug], applicability="display-only", key=f"advice:{finding.slug}",
                changes=[f"in {where}: compute the loss from the model output (out.logits / out.loss); no .detach(), "
                         ".data, torch.no_grad(), requires_grad_() on the loss or '+ 0 * something'"],
                why="the loss must reach the model output through autograd",
                snippet_lines=[f"# {finding.slug}: in {where}:",
                               "#     loss = model(**batch).loss      # not a detached copy, not loss.requires_grad_()"])


FIX = Fix(id="loss-from-output", title="Compute the loss from the model output", applicability="display-only",
          answers=ANSWERS, plan=plan, doc=__doc__)
