"""## What it does
Notes `use_cache=True` while training with gradient checkpointing, and legacy tuple `past_key_values` passed to a
training forward.

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

from gradflow.rules._base import Rule


def check(snap):
    found = []
    if snap.use_cache and snap.gc_mode != "off":
        found.append(RULE.finding("use_cache is on while training with gradient checkpointing (transformers turns it "
                                  "off with a warning each step)", location=None))
    if snap.legacy_cache_in_batch:
        found.append(RULE.finding("a legacy tuple past_key_values is passed to a training forward", location=None,
                                  fix_title="Do not pass past_key_values when training; set use_cache=False"))
    return found


RULE = Rule(
    code="GF302", slug="use-cache-in-training", severity="info",
    fix_title="Set model.config.use_cache = False for training", check=check, doc=__doc__,
)
