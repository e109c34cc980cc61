"""## What it does
Finds trainable parameters stored in float16 or bfloat16.

## Why is this bad?
With fp16 AMP, `GradScaler.unscale_` raises `Attempting to unscale FP16 gradients`. Without it, small updates
round away in half precision (lr × grad below the weight's ulp), so the adapter moves less than it should or
not at all. Master weights belong in fp32; the base can stay in half precision.

## Example
```python
model = get_peft_model(model, config, autocast_adapter_dtype=False)   # adapters stay bf16
model.half()                                                           # after adding adapters
```

## Fix safety
Safe: the trainable parameters are cast to fp32 (the frozen base is untouched); forward math runs in the
compute dtype as before.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, plural, short


def check(snap):
    half = [p for p in snap.params if p.requires_grad and p.dtype in ("float16", "bfloat16")]
    if not half:
        return []
    dtypes = "/".join(sorted({p.dtype for p in half}))
    verb = "is" if len(half) == 1 else "are"
    message = f"{plural(len(half), 'trainable parameter')} {verb} stored in {dtypes}: {short([p.name for p in half], 2)}"
    return [RULE.finding(message, location=half[0].module, params=[p.name for p in half])]


RULE = Rule(
    code="GF203", slug="half-precision-trainable-params", severity="warning",
    fix_title="Cast the trainable parameters to float32", check=check, doc=__doc__,
)
