"""## What it does
Fires when the loss does not depend on the model output: the loss is a leaf whose `requires_grad` was set by
hand, it was recomputed from detached tensors, or only an auxiliary term (such as `0 * p.sum()`) connects it to
the parameters.

## Why is this bad?
These are the usual workarounds for `element 0 of tensors does not require grad`: they stop the error and hide
the break. `backward()` runs, gradients are zero or `None`, and the adapters never move.

## Example
```python
logits = model(**batch).logits
loss = F.cross_entropy(logits.detach().flatten(0, 1), labels.flatten())
loss.requires_grad_(True)                          # hides the break
loss = loss + 0.0 * sum(p.sum() for p in params)   # so does this
```
Compute the loss from the model output itself, and fix the real cause that gradflow names.

## Fix safety
Display-only: the loss is your code.
"""

from __future__ import annotations

from gradflow.rules._base import Rule


def check(snap):
    loss = snap.loss
    if loss is None or loss.error is not None or loss.value is None:
        return []
    if loss.is_leaf:
        message = "the loss is a leaf tensor whose requires_grad was set by hand: it has no graph back to the model"
    elif loss.reaches_output is False and snap.output_requires_grad is None:
        message = "the loss was computed without running the model"
    elif loss.reaches_output is False and snap.output_requires_grad and loss.requires_grad:
        message = ("the loss does not depend on the model output (detached or recomputed); only an auxiliary term "
                   "connects it to the parameters")
    elif loss.reaches_output is False and snap.output_requires_grad and not loss.requires_grad:
        message = "the loss was computed from a detached copy of the model output"
    else:
        return []
    return [RULE.finding(message, location=None)]


RULE = Rule(
    code="GF121", slug="loss-detached", severity="error",
    fix_title="Compute the loss from the model output; do not detach it or set requires_grad on the loss",
    check=check, doc=__doc__,
)
