"""## What it does
Finds trainable parameters missing from the optimizer you passed.

## Why is this bad?
They get gradients but never change. This happens when the optimizer is built before `get_peft_model`, before
unfreezing a module, or from a filtered list that misses new parameters.

## Example
```python
opt = torch.optim.AdamW(model.parameters())   # built on the base model
model = get_peft_model(model, config)          # LoRA weights are not in opt
```
Build the optimizer last: `AdamW([p for p in model.parameters() if p.requires_grad])`.

## Fix safety
Display-only: the optimizer is yours to rebuild.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, plural, short


def check(snap):
    if not snap.optimizer_given:
        return []
    missing = [p for p in snap.params if p.requires_grad and p.in_optimizer is False]
    if not missing:
        return []
    message = (f"{plural(len(missing), 'trainable parameter')} are not in the optimizer and will never change: "
               f"{short([p.name for p in missing], 2)}")
    return [RULE.finding(message, location=missing[0].module, params=[p.name for p in missing])]


RULE = Rule(
    code="GF140", slug="param-not-in-optimizer", severity="error",
    fix_title="Build the optimizer after the model is final: AdamW(p for p in model.parameters() if p.requires_grad)",
    check=check, doc=__doc__,
)
