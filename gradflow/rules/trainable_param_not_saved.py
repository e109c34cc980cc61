"""## What it does
Finds trainable parameters that the PEFT adapter's `save_pretrained` will drop: they are neither adapter weights
nor in `modules_to_save`.

## Why is this bad?
They train, and then vanish: the saved adapter reloads without them and the fine-tune silently loses part of
what it learned. This is what happens to custom modules unfrozen by hand after `get_peft_model`.

## Example
```python
model = get_peft_model(model, LoraConfig(target_modules="all-linear"))
model.base_model.model.rot.theta.requires_grad_(True)     # trains, is not saved
LoraConfig(target_modules="all-linear", modules_to_save=["rot"])   # trains and is saved
```

## Fix safety
Safe: the module is wrapped by PEFT's `modules_to_save`, which keeps its values and saves them.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, plural, short


def check(snap):
    if not snap.is_peft:
        return []
    lost = [p for p in snap.params if p.requires_grad and p.saved is False]
    if not lost:
        return []
    message = (f"{plural(len(lost), 'trainable parameter')} will not be saved by save_pretrained "
               f"(not adapter weights, not in modules_to_save): {short([p.name for p in lost], 2)}")
    return [RULE.finding(message, location=lost[0].module, params=[p.name for p in lost])]


RULE = Rule(
    code="GF204", slug="trainable-param-not-saved", severity="warning",
    fix_title="Add the module to modules_to_save so the adapter saves it",
    check=check, doc=__doc__,
)
