"""## What it does
Fires when no parameter of the model requires grad.

## Why is this bad?
There is nothing to train: the loss has no grad_fn and `backward()` raises, or a trainer runs an optimizer over
an empty parameter list. It usually follows `model.requires_grad_(False)` placed after the adapters were added,
an adapter loaded for inference, or a quantized base with no adapters yet.

## Example
```python
model = get_peft_model(model, config)
model.requires_grad_(False)        # meant to freeze the base, froze the adapters too
```
Freeze before `get_peft_model`, or load adapters with `PeftModel.from_pretrained(..., is_trainable=True)`.

## Fix safety
Display-only: gradflow cannot know what you meant to train unless you say so with `--trainable REGEX`.
"""

from __future__ import annotations

from gradflow.rules._base import Rule


def check(snap):
    if any(p.requires_grad for p in snap.params):
        return []
    total = sum(p.numel for p in snap.params)
    return [RULE.finding(f"no parameter requires grad ({total:,} parameters, all frozen): there is nothing to train",
                         location=None)]


RULE = Rule(
    code="GF110", slug="no-trainable-parameters", severity="error",
    fix_title="Add adapters (get_peft_model) or unfreeze what you mean to train (--trainable REGEX)",
    check=check, doc=__doc__,
    superseded_by=("adapter-frozen", "intended-param-frozen"),
)
