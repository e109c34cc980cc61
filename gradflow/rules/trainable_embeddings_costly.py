"""## What it does
Finds input-embedding or output-head matrices left trainable beside adapters, says which of the two each one is,
and reports what they cost in parameters and bytes (weights, gradients and two Adam states). A matrix the user
put in PEFT's `modules_to_save` on purpose (PEFT's way to train new tokens) is reported as info only, with its
cost; a matrix made trainable by hand is a warning.

## Why is this bad?
Making the whole input embedding trainable is the common workaround for missing input gradients under reentrant
checkpointing. For a 32k × 3072 vocabulary that is ~98M parameters and over 1.5 GB of optimizer state, while the
input-grad hook gives the adapters the same gradients for free. An output head made trainable by hand costs as
much; the adapters do not need it to get their gradients, and LoRA on the head adapts it for a fraction.

## Example
```python
model.get_input_embeddings().weight.requires_grad_(True)   # workaround
model.enable_input_require_grads()                          # the cheap fix

LoraConfig(..., modules_to_save=["embed_tokens"])           # deliberate (new tokens): info, with its cost
LoraConfig(..., trainable_token_indices=[32000, 32001])     # only the new tokens' rows: nothing to report
```

## Fix safety
Unsafe: refreezing the embeddings changes what the model learns (the embeddings stop training). Applied only
with `--unsafe-fixes`, and never to a `modules_to_save` copy.
"""

from __future__ import annotations

import dataclasses

from gradflow.rules._base import Rule, human_bytes

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
INPUT, OUTPUT, TIED = "input", "output", "tied"  # tied: an input embedding the output head shares


def role(snap, param) -> str:
    """INPUT, OUTPUT or TIED for an embedding-matrix parameter, from its module's class.

    Input embeddings are Embedding modules (a `modules_to_save` copy keeps the class); anything else holding an
    embedding matrix (Linear, a quantized Linear) is the output head. A head tied to the input embedding shares
    its weight, so the snapshot lists that weight once, under the embedding, and the head is left a Linear with no
    parameters of its own; the tied matrix is the first embedding in module order (the token embedding comes
    before position embeddings: GPT-2's wte before wpe).
    """
    classes = {m.name: m.cls for m in snap.modules}
    if "Embedding" not in classes.get(param.module, ""):
        return OUTPUT
    # PEFT copies one module: a modules_to_save copy is never tied, the head stays tied to the frozen original
    if not deliberate(param) and any("Linear" in m.cls and not m.dtypes and not (m.trainable or m.frozen or m.quantized)
                                     for m in snap.modules):
        first = next((p for p in snap.params if p.embedding and not deliberate(p)
                      and "Embedding" in classes.get(p.module, "")), None)
        if first is param:
            return TIED
    return INPUT


def deliberate(param) -> bool:
    """A copy PEFT trains and saves because the user listed its module in `modules_to_save`."""
    return "modules_to_save" in param.name.split(".")


def check(snap):
    if not any(p.adapter and p.requires_grad for p in snap.params):
        return []
    costly = [p for p in snap.params if p.embedding and p.requires_grad and not p.adapter and not p.intended]
    by_hand = [p for p in costly if not deliberate(p)]
    chosen = [p for p in costly if deliberate(p)]
    found = []
    if by_hand:
        roles = [role(snap, p) for p in by_hand]
        found.append(RULE.finding(f"{_what(by_hand, roles)} trainable beside adapters: {_cost(by_hand)}",
                                  location=by_hand[0].module, params=[p.name for p in by_hand],
                                  fix_title=fix_title(roles)))
    if chosen:
        roles = [role(snap, p) for p in chosen]
        message = (f"{_what(chosen, roles)} trained as a full copy through modules_to_save (deliberate, e.g. for "
                   f"new tokens): {_cost(chosen)}")
        # a deliberate copy: no fix refreezes it; for an input embedding, advice on training only the new rows
        finding = RULE.finding(message, location=chosen[0].module, params=[p.name for p in chosen],
                               fix_title="To train only new tokens, LoraConfig(trainable_token_indices=[...]) trains "
                                         "just their rows", advice_only=True)
        found.append(dataclasses.replace(finding, severity="info",
                                         fix=finding.fix if any(r != OUTPUT for r in roles) else None))
    return found


def fix_title(roles) -> str:
    """What to do, by which matrices are trainable: the input-grad hook only ever replaces an input embedding."""
    heads = OUTPUT in roles
    inputs = any(r != OUTPUT for r in roles)
    if inputs and heads:
        return "Refreeze the input embedding and the output head; the input-grad hook replaces the trainable embedding"
    if heads:
        return "Refreeze the output head; put LoRA on it (target_modules) if it must adapt"
    return "Refreeze the input embedding and install the input-grad hook instead"


def describe_role(module: str, role_: str) -> str:
    """'input embedding NAME', 'output head NAME' or 'input embedding NAME (tied to the output head)'."""
    if role_ == OUTPUT:
        return f"output head {module}"
    return f"input embedding {module}" + (" (tied to the output head)" if role_ == TIED else "")


def _what(params, roles) -> str:
    return " and ".join(describe_role(p.module, r) for p, r in zip(params, roles))


def _cost(params) -> str:
    numel = sum(p.numel for p in params)
    # weights + gradients in their dtype, plus AdamW's two fp32 moments
    cost = sum(p.numel * (2 * _BYTES.get(p.dtype, 4) + 8) for p in params)
    return f"{numel:,} parameters, about {human_bytes(cost)} with gradients and Adam states"


RULE = Rule(
    code="GF202", slug="trainable-embeddings-costly", severity="warning",
    fix_title="Refreeze the embedding matrices; for an input embedding, install the input-grad hook instead",
    check=check, doc=__doc__,
)
