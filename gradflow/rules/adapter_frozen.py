"""## What it does
Finds PEFT adapter weights of the active adapter that do not require grad.

## Why is this bad?
The adapter exists but cannot learn. `PeftModel.from_pretrained(base, path)` loads adapters for inference
(`is_trainable=False`), and a `model.requires_grad_(False)` after `get_peft_model` freezes them too. Training
then either raises (nothing requires grad) or silently updates only the other trainable parameters.

## Example
```python
model = PeftModel.from_pretrained(base, "out/adapter")                 # frozen
model = PeftModel.from_pretrained(base, "out/adapter", is_trainable=True)  # trainable
```

## Fix safety
Safe: the adapter weights are unfrozen; nothing else changes.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, plural


def check(snap):
    if not snap.is_peft:
        return []
    active = set(snap.extra.get("active_adapters") or snap.adapter_names)
    adapter = [p for p in snap.params if p.adapter and not p.quantized and active & set(p.name.split("."))]
    frozen = [p for p in adapter if not p.requires_grad]
    if not frozen:
        return []
    share = "all" if len(frozen) == len(adapter) else f"{len(frozen)} of {len(adapter)}"
    message = (f"{share} adapter weights of {', '.join(sorted(active))} are frozen "
               f"({plural(len(frozen), 'parameter')}, first at {frozen[0].module}); they cannot learn")
    return [RULE.finding(message, location=frozen[0].module, params=[p.name for p in frozen])]


RULE = Rule(
    code="GF111", slug="adapter-frozen", severity="error",
    fix_title="Unfreeze the adapter (PeftModel.from_pretrained(..., is_trainable=True))", applicability="safe",
    check=check, doc=__doc__,
)
