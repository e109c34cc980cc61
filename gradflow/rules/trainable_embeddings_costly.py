"""## What it does
Finds input-embedding or output-head matrices left trainable beside adapters, and reports what they cost in
parameters and bytes (weights, gradients and two Adam states).

## Why is this bad?
Making the whole embedding trainable is the common workaround for missing input gradients under reentrant
checkpointing. For a 32k × 3072 vocabulary that is ~98M parameters and over 1.5 GB of optimizer state, while the
input-grad hook gives the adapters the same gradients for free.

## Example
```python
model.get_input_embeddings().weight.requires_grad_(True)   # workaround
model.enable_input_require_grads()                          # the cheap fix
```

## Fix safety
Unsafe: refreezing the embeddings changes what the model learns (the embeddings stop training). Applied only
with `--unsafe-fixes`.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, human_bytes

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def check(snap):
    if not any(p.adapter and p.requires_grad for p in snap.params):
        return []
    costly = [p for p in snap.params if p.embedding and p.requires_grad and not p.adapter and not p.intended]
    if not costly:
        return []
    numel = sum(p.numel for p in costly)
    # weights + gradients in their dtype, plus AdamW's two fp32 moments
    cost = sum(p.numel * (2 * _BYTES.get(p.dtype, 4) + 8) for p in costly)
    modules = ", ".join(dict.fromkeys(p.module for p in costly))
    noun = "embedding matrix" if len(costly) == 1 else f"{len(costly)} embedding matrices"
    message = (f"{noun} trainable beside adapters ({modules}): "
               f"{numel:,} parameters, about {human_bytes(cost)} with gradients and Adam states")
    return [RULE.finding(message, location=costly[0].module, params=[p.name for p in costly])]


RULE = Rule(
    code="GF202", slug="trainable-embeddings-costly", severity="warning",
    fix_title="Refreeze the embeddings and install the input-grad hook instead", applicability="unsafe",
    check=check, doc=__doc__,
)
