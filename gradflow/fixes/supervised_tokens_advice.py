"""## What it does
Points at the labels when every label of the batch is -100.

## Why this fix
With nothing supervised the loss is NaN or zero and nothing learns; the cause is the data (a mask that covers the
completion, a sequence length that truncates it, a chat template without the assistant turn).

## Fix safety
Display-only.
"""

from __future__ import annotations

from gradflow.fixes._base import Fix, Plan

ANSWERS = ("no-supervised-tokens",)


def plan(ctx, finding):
    return Plan(fix=FIX, data={}, answers=[finding.slug], applicability="display-only", key=f"advice:{finding.slug}",
                changes=["keep the completion tokens in labels: check the loss mask, the truncation length "
                         "(--seq-len) and that the assistant turn survives the chat template"],
                why="every label is -100, so no token is supervised",
                snippet_lines=[f"# {finding.slug}: check the labels: (batch['labels'] != -100).sum() must be > 0"])


FIX = Fix(id="supervise-tokens", title="Keep the completion tokens in the labels", applicability="display-only",
          answers=ANSWERS, plan=plan, doc=__doc__)
