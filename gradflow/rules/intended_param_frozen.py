"""## What it does
Finds parameters that match the `trainable` regex you gave (what you intend to train) but do not require grad.

## Why is this bad?
`get_peft_model` freezes every parameter outside the LoRA targets, including your custom modules (for example
SO(8) rotations or a new head). They then never learn, and no error says so.

## Example
```python
model = get_peft_model(model, LoraConfig(target_modules="all-linear"))   # freezes model.so8.theta
```
Put custom modules in `modules_to_save=[...]` so PEFT keeps them trainable and saves them.

## Fix safety
Safe: only the parameters you named are unfrozen (and, for PEFT models, registered to be saved).
"""

from __future__ import annotations

from gradflow.rules import adapter_frozen
from gradflow.rules._base import Rule, plural, short


def check(snap):
    if not snap.trainable_regex:
        return []

    # frozen adapter weights are adapter-frozen's to report, with the fix that fits them (is_trainable=True)
    covered = {name for f in adapter_frozen.check(snap) for name in f.params}
    frozen = [p for p in snap.params if p.intended and not p.requires_grad and not p.quantized
              and p.name not in covered]
    if not frozen:
        return []
    message = (f"{plural(len(frozen), 'parameter')} matching --trainable {snap.trainable_regex!r} "
               f"{'is' if len(frozen) == 1 else 'are'} frozen: {short([p.name for p in frozen])}")
    return [RULE.finding(message, location=frozen[0].module, params=[p.name for p in frozen])]


RULE = Rule(
    code="GF112", slug="intended-param-frozen", severity="error",
    fix_title="Unfreeze the intended parameters (via modules_to_save on a PEFT model)",
    check=check, doc=__doc__,
)
