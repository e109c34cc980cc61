"""## What it does
The coverage fallback. After every other rule has run, it collects the trainable parameters whose gradient is
None or exactly zero and that no finding names, and lists them, so that none goes unreported. Exempt: experts of a
mixture-of-experts layer the router did not pick (a sibling expert ran), lora_A weights whose first gradient is
zero because lora_B starts at zero (`lora-zero-init`), PEFT's trainable-token rows (`trainable_token_indices`)
with a zero gradient when the batch holds none of those tokens, and, with `--steps K`, parameters whose zero
gradient at the probe's step was nonzero at one of the K steps. A finding that is about the whole step (the loss, the
labels, an exception in it) covers every parameter; `nonfinite-grad` covers the zero gradients inside the module
it names.

## Why is this bad?
A trainable parameter that gets no gradient does not learn. gradflow could not say why: this finding is a measure
of what it does not yet know. Please report it with the model and the training code.

## Example
```python
y = self.proj(x)
return x + custom_op_without_backward(y)       # an op gradflow does not recognise
```

## Fix safety
Display-only: gradflow does not know the cause, so it lists the parameters and changes nothing.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, owner, plural, short, under, unrouted_experts

# findings about the step as a whole: they explain every missing gradient
WHOLE_STEP = ("loss-detached", "no-supervised-tokens", "no-trainable-parameters", "nested-checkpoint")


def missing(snap) -> list:
    """Trainable parameters with a None or zero gradient, minus the documented exemptions."""
    if not snap.probed or snap.loss is None or snap.loss.error is not None:
        return []  # after an exception in the step the missing gradients say nothing
    unrouted = unrouted_experts(snap)
    # --steps K: a zero at the probe's step is no missing gradient when a later step gave it one (a gate moved)
    later = {s.name for s in snap.steps.params if s.grad == "ok"} if snap.steps is not None else set()
    out = []
    for p in snap.params:
        if not p.requires_grad or p.grad not in ("none", "zero"):
            continue
        if p.grad == "none" and unrouted(p):
            continue  # an expert the router did not pick in this batch
        if p.grad == "zero" and ".trainable_tokens_delta." in p.name:
            continue  # PEFT's trainable tokens: rows of token ids this batch does not contain
        if p.grad == "zero" and p.name in later:
            continue  # a nonzero gradient at one of the --steps: it starts at zero, and learns
        out.append(p)
    return out


def cover(snap, findings) -> list:
    """The fallback finding for what `findings` leave unexplained (empty when everything is covered)."""
    if any(f.slug in WHOLE_STEP for f in findings):
        return []
    named = {n for f in findings for n in f.params}
    # NaN/Inf in a module: a zero gradient beside it has the same cause (a gate at 0 under sqrt: inf for the gate,
    # 0 for what it multiplies)
    broken = [f.location for f in findings if f.slug == "nonfinite-grad" and f.location]
    left = [p for p in missing(snap) if p.name not in named
            and not (p.grad == "zero" and any(under(p.module, b) for b in broken))]
    if not left:
        return []
    names = [p.name for p in left]
    kinds = sorted({p.grad for p in left})
    what = " or ".join({"none": "no gradient", "zero": "an exactly-zero gradient"}[k] for k in kinds)
    where = owner(names)
    message = (f"unexplained: {plural(len(names), 'trainable parameter')} got {what} and no other finding says why "
               f"(in {where or 'the model'}): {short(names, 4)}")
    return [RULE.finding(message, location=where or None, params=names)]


RULE = Rule(
    code="GF209", slug="grad-missing-unexplained", severity="warning",
    fix_title="Check how these parameters reach the loss; report the case to gradflow",
    check=None, doc=__doc__,
)
