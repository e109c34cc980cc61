"""## What it does
Finds NaN or Inf in gradients (or in the loss), and names the first module where they appear: the first module
whose forward output is non-finite, else the last module in forward order (the first reached by backward) whose
parameters got a non-finite gradient.

## Why is this bad?
One non-finite gradient poisons the optimizer state; with AMP the step is skipped forever; without it the
weights turn into NaN.

## Example
```python
scale = torch.sqrt(self.gate - self.gate)   # d/dx sqrt(0) = inf
```

## Fix safety
Display-only: the arithmetic is yours (clamp, eps, fp32 for the unstable op).
"""

from __future__ import annotations

from gradflow.rules._base import Rule, plural, short


def check(snap):
    bad = [p for p in snap.params if p.requires_grad and p.grad == "nonfinite"]
    loss_bad = (snap.loss is not None and snap.loss.value is not None
                and (snap.loss.value != snap.loss.value or abs(snap.loss.value) == float("inf")))
    if snap.labels_all_masked and not bad:
        return []  # no-supervised-tokens explains a NaN loss
    if not bad and not loss_bad:
        return []
    location = snap.forward_nonfinite_at
    if location is None and bad:
        order = {m.name: (m.order if m.order is not None else -1) for m in snap.modules}
        location = max(bad, key=lambda p: order.get(p.module, -1)).module
    where = f"first at {location}" if location else "origin unknown"
    what = plural(len(bad), "parameter") + " got a NaN/Inf gradient" if bad else "the loss is NaN/Inf"
    if snap.forward_nonfinite_at and snap.nonfinite_weights:
        where = (f"the forward output of {location} is already non-finite: its weights hold NaN/Inf "
                 f"({short(snap.nonfinite_weights, 1)}), from before this step (an earlier optimizer step, or the "
                 "weights as loaded): look at the first step whose loss or gradients went non-finite")
    elif snap.forward_nonfinite_at:
        where = f"the forward output of {location} is already non-finite"
    elif loss_bad:
        where += "; every module output is finite, so the loss computation itself produces the NaN/Inf"
    return [RULE.finding(f"{what} ({where})", location=location, params=[p.name for p in bad])]


RULE = Rule(
    code="GF130", slug="nonfinite-grad", severity="error",
    fix_title="Make the named module numerically safe (eps, clamp, fp32) or lower the loss scale",
    check=check, doc=__doc__,
)
