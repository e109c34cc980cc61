"""## What it does
Finds a checkpointed region called inside another checkpointed region whose inner call gets no tensor
inputs (for example decoder layers that checkpoint themselves, called with keyword arguments only, inside your
own outer `checkpoint`). It also recognises the error this produces in backward.

## Why is this bad?
The inner reentrant checkpoint sees no tensor input, so its output does not require grad. When the outer
region recomputes during backward, torch raises `none of output has requires_grad=True, this checkpoint() is not
necessary`, or, without the error, the layers inside get no gradient. Checkpointing twice also recomputes the
same activations twice.

## Example
```python
model.gradient_checkpointing_enable()              # layers checkpoint themselves
def block(h):                                       # and an outer wrapper checkpoints them again
    return layer(hidden_states=h, position_embeddings=pe)[0]
h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=True)
```
Use one level of checkpointing: `model.gradient_checkpointing_disable()` under your wrapper, or drop the wrapper.

## Fix safety
Safe when the inner checkpointing is transformers' per-layer flag (turning it off changes memory, not results);
display-only when the inner call is your own code.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, plural, under

_ERROR = "this checkpoint() is not necessary"


def check(snap):
    inner = [c for c in snap.checkpoints if c.depth >= 1 and c.tensor_args == 0]
    # a region recomputed in backward repeats what its forward saw; the forward's view names the modules inside
    first = [c for c in inner if c.phase == "forward"] or inner
    locations = list(dict.fromkeys(c.location for c in first if c.location is not None))
    error = snap.loss is not None and snap.loss.error is not None and _ERROR in snap.loss.error
    if not inner and not error:
        return []
    where = locations[0] if locations else None
    mod = snap.module(where) if where else None
    inner_is_hf = mod is not None and mod.gc != "off"
    if inner:
        count = plural(len(locations) or len(first), "checkpointed region")
        shown = f" ({where}{', …' if len(locations) > 1 else ''})" if where else ""
        message = (f"{count}{shown} run inside another checkpointed region and get no tensor inputs (a keyword-only "
                   "call or a partial), so nothing computed inside them can require grad")
    else:
        message = "a nested checkpoint got no tensor inputs"
    if error:
        message += f"; backward raised: {snap.loss.error}"
    elif snap.probed and locations:
        lost = [p for p in snap.params if p.requires_grad and p.grad == "none"
                and any(under(p.module, loc) for loc in locations)]
        if lost:
            message += f"; {plural(len(lost), 'trainable parameter')} inside get no gradient"
    if inner_is_hf:
        return [RULE.finding(message, location=where)]
    # the inner checkpoint call is the user's own code: no fix can turn it off, only advice
    return [RULE.finding(message, location=where, fix_title="Checkpoint only once: remove the outer or the inner "
                         "checkpoint call, or pass the hidden states positionally", advice_only=True)]


RULE = Rule(
    code="GF102", slug="nested-checkpoint", severity="error",
    fix_title="Turn off the inner checkpointing under the outer checkpoint",
    check=check, doc=__doc__,
)
