"""## What it does
Notes that `lora_A` got an exactly-zero gradient on the first step because `lora_B` starts at zero (on an
embedding, PEFT starts `lora_embedding_A` at zero instead, so `lora_embedding_B` is the one with a zero gradient).

## Why is this bad?
It is not: it is how LoRA starts (the adapter is the identity at step 0). `lora_B` gets a gradient on the first
step, and `lora_A` from the second. gradflow reports it as info so a zero is not mistaken for a break.

## Example
```python
LoraConfig(r=8, init_lora_weights=True)   # lora_B = 0 → d loss / d lora_A = 0 at step 0
```

## Fix safety
Nothing to fix.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, plural


def check(snap):
    found = snap.lora_start_zeros()
    if not found:
        return []
    expected = [p for _, _, hit in found for p in hit]
    weights = " and ".join(f"{plural(len(hit), f'{zero} weight')} (first at {hit[0].module})" for zero, _, hit in found)
    starts = " and ".join(start for _, start, _ in found)
    return [RULE.finding(f"{weights} got an exactly-zero first gradient because {starts} "
                         f"start{'s' if len(found) == 1 else ''} at zero (expected; they move from the second step)",
                         location=expected[0].module, params=[p.name for p in expected])]


RULE = Rule(code="GF301", slug="lora-zero-init", severity="info", fix_title=None,
            check=check, doc=__doc__)
