"""## What it does
Fires when every label in the batch is `-100` (after the causal shift), so no token is supervised.

## Why is this bad?
There is nothing to learn: the loss is NaN (mean over zero tokens) or zero, and gradients are NaN or zero.
Common causes: a prompt longer than the sequence length truncates every completion away, or a masking function
that masks the assistant turn instead of the prompt.

## Example
```python
labels[:] = -100                          # masks everything
labels[:, :prompt_len] = -100             # masks the prompt only
```

## Fix safety
Display-only: the data pipeline is yours; raise the sequence length or fix the mask.
"""

from __future__ import annotations

from gradflow.rules._base import Rule


def check(snap):
    if not snap.labels_all_masked:
        return []
    return [RULE.finding("every label in the batch is -100: no token is supervised, so the loss is NaN or zero",
                         location=None)]


RULE = Rule(
    code="GF122", slug="no-supervised-tokens", severity="error",
    fix_title="Keep the completion tokens in the labels (check the mask and the sequence length)",
    check=check, doc=__doc__,
)
