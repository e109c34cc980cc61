"""## What it does
Fires when every trainable parameter that got a gradient got an exactly-zero one: the backward ran, and nothing
will move. It says why when the probe can tell: a loss of exactly 0 (per-token loss weights or a mask that are all
zero, a loss multiplied by 0), or a loss that does not vary with the parameters.

## Why is this bad?
Training runs without an error, the loss stays flat, and the optimizer steps with zero updates (AdamW still decays
the weights). The first sign is usually a loss of 0.0 in the logs, or weights that never change.

## Example
```python
weights = torch.zeros_like(input_ids)                     # meant as float weights: all zero
loss = (per_token_loss * weights).sum() / weights.sum().clamp(min=1)   # 0.0, every gradient zero
```
Build the weights (or the mask) so that the tokens you train on weigh more than zero.

## Fix safety
Display-only: the loss is your code.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, owner, plural, short


def check(snap):
    if not snap.probed or snap.loss is None or snap.loss.error is not None:
        return []
    trainable = [p for p in snap.params if p.requires_grad and p.grad is not None]
    if any(p.grad in ("ok", "nonfinite") for p in trainable):
        return []
    zero = [p.name for p in trainable if p.grad == "zero"]
    if not zero:
        return []
    value = snap.loss.value
    if value == 0.0:
        why = ("the loss is exactly 0.0: per-token loss weights or a mask that are all zero, or a loss multiplied by "
               "zero")
    else:
        why = (f"the loss ({value:.4g}) does not vary with the parameters: a zero weight or mask multiplies the "
               "model's contribution, or a custom backward returns zeros")
    message = (f"every trainable parameter's gradient is exactly zero ({plural(len(zero), 'tensor')}: "
               f"{short(zero, 2)}): {why}; nothing will train")
    return [RULE.finding(message, location=owner(zero) or None, params=zero, advice_only=True)]


RULE = Rule(
    code="GF131", slug="grad-all-zero", severity="error",
    fix_title="Make the loss depend on the parameters: check the loss weights and masks for all-zero values",
    check=check, doc=__doc__,
    superseded_by=("loss-detached", "no-supervised-tokens"),
)
