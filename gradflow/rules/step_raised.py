"""## What it does
Fires when the training step itself raises: the forward, the loss extraction (no loss, a non-scalar loss) or
the backward. The exception is recorded as data in the report (`loss.error`, `loss.error_phase`); a more
specific finding (such as `nested-checkpoint`) replaces this one when it explains the error.

## Why is this bad?
A setup whose step raises cannot train at all. As a pre-flight check in CI this must fail the run, not pass it
because no gradient rule had anything to look at.

## Example
```python
def loss_fn(model, batch):
    return model(**batch).logits          # a [batch, seq, vocab] tensor, not a scalar loss
```
Return a scalar loss (`.loss`, or reduce with `.mean()`), or fix the error the message names.

## Fix safety
Display-only: the failing code is yours.
"""

from __future__ import annotations

from gradflow.rules._base import Rule


def check(snap):
    loss = snap.loss
    if loss is None or loss.error is None:
        return []
    phase = {"forward": "the forward", "loss": "reading the loss", "backward": "the backward"}.get(
        loss.error_phase, "the step")
    return [RULE.finding(f"{phase} raised {loss.error}", location=None)]


RULE = Rule(
    code="GF150", slug="step-raised", severity="error",
    fix_title="Fix the error in the forward / loss / backward named in the message",
    check=check, doc=__doc__, superseded_by=("nested-checkpoint", "inference-tensor-params", "ddp-reentrant-checkpoint"),
)
