"""## What it does
With `--steps K` (`gradflow.probe(..., steps=K)`), gradflow takes K real optimizer steps on the probe batch with the
optimizer the run will use (then puts every parameter and the optimizer state back). This rule finds
intended-trainable parameters (those matching `--trainable`, else those that require grad) that are bit-identical
after the K steps although nothing else explains it:
- frozen: the parameter matches `--trainable` but does not require grad;
- no optimizer state: it got a gradient and sits in the optimizer's groups, yet the optimizer kept no state for it;
- lost update: it got a nonzero gradient and the optimizer holds it, yet its value did not change (an update below
  the precision of a bf16/fp16 weight, a step skipped by a wrapper).

Left to other findings: parameters the given optimizer does not hold (`param-not-in-optimizer`), a learning rate of
zero throughout (`zero-learning-rate`), and parameters whose gradient was None or zero at every step (the gradient
findings: `reentrant-checkpoint-no-input-grad`, `graph-break`, `lora-zero-init`, ...), and steps that raise
(`step-raised` names the error: an optimizer that cannot step these parameters, a `compute_loss` that fails).

Related: `adapter-not-updated` (GF402) is the same symptom seen while training, by `GradFlowCallback`; this is the
pre-flight check, for any intended parameter, adapters or not.

## Why is this bad?
The run trains without error while these weights never learn. The loss may still fall through other parameters, so
nothing else tells you.

## Example
```python
model = get_peft_model(model, LoraConfig(target_modules=["q_proj"]))   # freezes everything else
# ... and the SO(8) `theta` you meant to train (--trainable 'theta') is frozen with it
```
Unfreeze what you intend to train after `get_peft_model` (or list it in `modules_to_save`), keep trainable weights in
fp32, and step the optimizer that holds them.

## Fix safety
Display-only: the optimizer and what it holds are yours.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, plural, short


def check(snap):
    run = snap.steps
    if run is None:
        return []
    if run.error is not None:
        return []  # a step that raised says nothing about frozen parameters: step-raised names the error
    stale = []
    for p in run.params:
        if p.changed or p.zero_lr:
            continue
        if not p.requires_grad:
            stale.append((p, "frozen (requires_grad=False)"))
        elif snap.optimizer_given and not p.in_optimizer:
            continue  # param-not-in-optimizer names it
        elif p.grad != "ok":
            continue  # no gradient, or a zero one, at every step: the gradient findings explain it
        elif not p.in_optimizer:
            stale.append((p, "not held by the optimizer"))
        elif p.has_state is False:
            stale.append((p, "no optimizer state"))
        else:
            stale.append((p, "update lost"))
    if not stale:
        return []
    reasons = {}
    for p, why in stale:
        reasons.setdefault(why, []).append(p.name)
    detail = "; ".join(f"{why}: {short(names, 2)}" for why, names in reasons.items())
    first = stale[0][0]
    message = (f"{plural(len(stale), 'intended-trainable parameter')} did not change after "
               f"{plural(run.steps, 'step')} of {run.optimizer}, first in {first.module}: {detail}")
    return [RULE.finding(message, location=first.module, params=[p.name for p, _ in stale])]


RULE = Rule(
    code="GF141", slug="param-not-updated", severity="error",
    fix_title="Unfreeze the parameters you intend to train and step an optimizer that holds them",
    check=check, doc=__doc__,
)
