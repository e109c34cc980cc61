"""## What it does
Notes `use_cache=True` while training with gradient checkpointing, and legacy tuple `past_key_values` passed to a
training forward. Inside your own reentrant checkpoint wrapper the cache also costs gradients: the recomputation
in backward attends to keys and values the no-grad forward cached, so the key/value projections get an exactly-zero
gradient; the finding then lists them.

## Why is this bad?
transformers turns the cache off under checkpointing and warns on every step; a cache is only for generation. A
legacy tuple cache fed into a training forward is deprecated (a `Cache` object is expected) and mixes stale keys
into attention.

## Example
```python
model.config.use_cache = False        # for training
```

## Fix safety
Safe: the cache only serves generation; training results do not change.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, layer_span, plural, short, under


def check(snap):
    found = _zeroed_by_cache(snap)
    if snap.use_cache and snap.gc_mode != "off":
        found.append(RULE.finding("use_cache is on while training with gradient checkpointing (transformers turns it "
                                  "off with a warning each step)", location=None))
    if snap.legacy_cache_in_batch:
        found.append(RULE.finding("a legacy tuple past_key_values is passed to a training forward", location=None,
                                  fix_title="Do not pass past_key_values when training; set use_cache=False"))
    return found


def _zeroed_by_cache(snap):
    """Exactly-zero gradients inside reentrant regions run with use_cache on (lora_A at its expected first zero
    left to lora-zero-init)."""
    regions = [c for c in snap.checkpoints if c.reentrant and c.phase == "forward" and c.location]
    if not snap.use_cache or not snap.probed or not regions:
        return []
    inside = list(dict.fromkeys(m for c in regions for m in (c.modules or [c.location])))
    ok = {p.name for p in snap.params if p.grad == "ok"}
    zero = [p.name for p in snap.params if p.requires_grad and p.grad == "zero"
            and any(under(p.module, m) for m in inside)
            and not (".lora_A." in p.name and p.name.replace(".lora_A.", ".lora_B.") in ok)]
    if not zero:
        return []
    message = (f"use_cache is on inside reentrant checkpointed regions ({layer_span(inside)}): the recomputation in "
               f"backward attends to the keys and values the no-grad forward cached, so "
               f"{plural(len(zero), 'trainable parameter')} get an exactly-zero gradient: {short(zero, 2)}")
    return [RULE.finding(message, location=inside[0] or None, params=zero)]


RULE = Rule(
    code="GF302", slug="use-cache-in-training", severity="info",
    fix_title="Set model.config.use_cache = False for training", check=check, doc=__doc__,
)
