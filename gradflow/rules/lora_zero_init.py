"""## What it does
Notes that `lora_A` got an exactly-zero gradient on the first step because `lora_B` starts at zero (on an
embedding, PEFT starts `lora_embedding_A` at zero instead, so `lora_embedding_B` is the one with a zero gradient).
PEFT's other low-rank methods start the same way: VeRA's `vera_lambda_d` gets a zero because `vera_lambda_b` starts
at zero, AdaLoRA's `lora_A` and `lora_B` because `lora_E` does. Beyond PEFT, a zero-initialized gate: when a
trainable parameter is exactly zero, gets a gradient itself, and sits in the module of the zero-gradient
parameters or in a module around them (Flamingo's and LLaMA-Adapter's `tanh(gate)`), those zeros are its doing.
The values are read only when some zero gradient is not one of LoRA's.

## Why is this bad?
It is not: it is how these adapters start (the adapter is the identity at step 0). `lora_B` (or the gate) gets a
gradient on the first step, and `lora_A` from the second. gradflow reports it as info so a zero is not mistaken for
a break.

## Example
```python
LoraConfig(r=8, init_lora_weights=True)   # lora_B = 0 → d loss / d lora_A = 0 at step 0
VeraConfig(r=8)                           # vera_lambda_b = 0 → d loss / d vera_lambda_d = 0 at step 0

self.gate = nn.Parameter(torch.zeros(1))  # h + tanh(self.gate) * self.up(self.down(h)): down, up get 0 at step 0
```

## Fix safety
Nothing to fix.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, plural, short


def check(snap):
    return _lora_pairs(snap) + _gates(snap)


def _lora_pairs(snap):
    found = snap.lora_start_zeros()
    if not found:
        return []
    expected = [p for _, _, hit in found for p in hit]
    # the weight's own path (lora_A.default, q_proj.vera_lambda_d), not the module that runs it
    weights = " and ".join(f"{plural(len(hit), f'{zero} weight')} (first at {_container(hit[0].name)})"
                           for zero, _, hit in found)
    starts = list(dict.fromkeys(start for _, start, _ in found))  # AdaLoRA's lora_E zeroes lora_A's and lora_B's
    return [RULE.finding(f"{weights} got an exactly-zero first gradient because {' and '.join(starts)} "
                         f"start{'s' if len(starts) == 1 else ''} at zero (expected; they move from the second step)",
                         location=expected[0].module, params=[p.name for p in expected])]


def _gates(snap):
    """Zeros behind a trainable gate that is exactly zero and got a gradient itself (Snapshot.gated_zeros)."""
    found = snap.gated_zeros()
    if not found:
        return []
    held = [p for _, hit in found for p in hit]
    gates = [gate.name for gate, _ in found]
    one = len(gates) == 1
    what = (f"the trainable {gates[0]} is exactly zero and gets a gradient itself: a gate or scale that starts" if one
            else f"{len(gates)} trainable parameters around them ({short(gates, 2)}) are exactly zero and get "
                 "gradients themselves: gates or scales that start")
    message = (f"{plural(len(held), 'trainable parameter')} (first at {held[0].module}) got an exactly-zero first "
               f"gradient because {what} at zero (expected; they move once {'it has' if one else 'those have'} moved)")
    return [RULE.finding(message, location=held[0].module, params=[p.name for p in held])]


def _container(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


RULE = Rule(code="GF301", slug="lora-zero-init", severity="info", fix_title=None,
            check=check, doc=__doc__)
