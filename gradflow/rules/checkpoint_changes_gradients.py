"""## What it does
With `--check-gc` (`gradflow.probe(..., check_gc=True)`), runs the same batch twice, with gradient checkpointing on
and off (same seed, dropout at p=0, buffers and RNG restored before each run), and finds trainable parameters whose
gradients differ beyond a dtype-aware tolerance, or that get a gradient (or a nonzero one) in one run and not the
other.

The tolerance, per parameter: `||g_on - g_off|| <= atol * sqrt(numel) + rtol * ||g_off||`, with rtol 1e-4 and atol
1e-7 for float32 gradients, rtol 2e-2 / atol 1e-5 for bfloat16, rtol 2e-3 / atol 1e-6 for float16. When the model
already checkpoints, "off" runs each `torch.utils.checkpoint` region inline; when it does not, "on" turns
transformers' checkpointing on (non-reentrant) for the comparison and restores it afterwards.

## Why is this bad?
Checkpointing recomputes each region's forward during backward and differentiates the recomputation. When the
recomputation is not the forward that produced the loss, the gradients belong to a different function: the run
trains on wrong gradients, silently. Typical causes:
- a random draw inside the region with `preserve_rng_state=False` (noise, a functional dropout);
- a module that mutates state in its forward (a call counter, a cache, a buffer that feeds the output);
- a forward that branches on `torch.is_grad_enabled()`: a reentrant checkpoint runs the first forward under
  `no_grad`, so the recomputation takes the other branch.

## Example
```python
class Scaled(nn.Module):
    def forward(self, x):
        self.calls += 1                       # state changes on every call, recomputation included
        return x * (1 + 0.1 * self.calls)

model.gradient_checkpointing_enable()        # the layer holding Scaled now runs twice per step
```
Make the forward a pure function of its inputs and parameters, keep `preserve_rng_state=True`, or leave that module
outside the checkpointed region.

## Fix safety
Display-only: the cause is in the model's code.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, plural, short

_WHY = {
    "differs": "differ",
    "none-with-gc": "get no gradient with checkpointing on",
    "none-without-gc": "get no gradient with checkpointing off",
    "zero-with-gc": "get a zero gradient with checkpointing on only",
    "zero-without-gc": "get a zero gradient with checkpointing off only",
}


def check(snap):
    gc = snap.gc_equivalence
    if gc is None or not gc.compared:
        return []
    how = f"{gc.mode} checkpointing" + (" (turned on for the check)" if gc.enabled_for_check else "")
    if bool(gc.error_with_gc) != bool(gc.error_without_gc):  # both raising is the probe's own finding
        on = gc.error_with_gc is not None
        message = (f"the run with {how} raised and the run without did not: "
                   f"{gc.error_with_gc if on else gc.error_without_gc}" if on else
                   f"the run without checkpointing raised and the run with {how} did not: {gc.error_without_gc}")
        return [RULE.finding(message)]
    if not gc.diffs:
        return []
    parts = []
    for kind, why in _WHY.items():
        names = [d.name for d in gc.diffs if d.kind == kind]
        if names:
            worst = max((d.rel_diff for d in gc.diffs if d.kind == kind and d.rel_diff is not None), default=None)
            extra = f" (relative difference up to {worst:.3g})" if worst is not None else ""
            parts.append(f"{plural(len(names), 'parameter')} {why}{extra}: {short(names, 2)}")
    location = gc.diffs[0].module
    message = (f"gradients with {how} differ from those without it, first in {location}: " + "; ".join(parts))
    return [RULE.finding(message, location=location, params=[d.name for d in gc.diffs])]


RULE = Rule(
    code="GF104", slug="checkpoint-changes-gradients", severity="error",
    fix_title="Make the checkpointed forward deterministic: keep preserve_rng_state=True, no state changes or "
              "torch.is_grad_enabled() branches inside the region",
    check=check, doc=__doc__,
    # a region without input grad gives None inside it, and a nested region raises: those rules say why
    superseded_by=("reentrant-checkpoint-no-input-grad", "nested-checkpoint"),
)
