"""## What it does
Finds reentrant checkpointed regions (`torch.utils.checkpoint(..., use_reentrant=True)`, transformers'
`gradient_checkpointing_enable()` with `use_reentrant=True`, or your own wrapper) whose tensor inputs do not
require grad while trainable parameters live inside.

## Why is this bad?
A reentrant checkpoint is an autograd Function: it only builds a graph when one of its *inputs* requires grad.
Parameters inside it are not inputs. With a frozen embedding feeding it, the LoRA weights inside get `None`.
It is loud when nothing else is trainable (`element 0 of tensors does not require grad and does not have a
grad_fn`) and silent when something after the region still is (the run trains, the adapters never move).
Typical causes: `get_peft_model` before `gradient_checkpointing_enable()` on transformers 4.x, a removed
input-grad hook, `inputs_embeds` passed directly, a custom checkpoint loop.

## Example
```python
# transformers 4.x (5.x installs the input-grad hook itself when it turns reentrant checkpointing on)
model = get_peft_model(model, LoraConfig(target_modules="all-linear"))
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
model(input_ids=ids, labels=ids).loss.backward()   # RuntimeError: element 0 of tensors does not require grad
```
Use instead:
```python
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
# or, keeping reentrant checkpointing:
model.enable_input_require_grads()    # after checkpointing is on
```

## Fix safety
Safe: the input-grad hook only marks the embedding output as requiring grad; non-reentrant checkpointing
computes the same gradients. Neither changes what the model learns.
"""

from __future__ import annotations

from gradflow.models import is_input_grad_hook
from gradflow.rules._base import Rule, layer_span, plural, under


def check(snap):
    trainable = [p for p in snap.params if p.requires_grad]
    if not trainable:
        return []
    if not snap.traced:
        return _static(snap, trainable)
    cut = [c for c in snap.checkpoints if c.reentrant and c.phase == "forward" and c.depth == 0 and c.grad_args == 0]
    regions, inside = [], []
    for call in cut:
        roots = call.modules or ([call.location] if call.location else [])
        params = [p for p in trainable if any(under(p.module, r) for r in roots)]
        if params:
            regions.append(call.location or "?")
            inside.extend(params)
    if not regions:
        return []
    if snap.probed:
        inside = [p for p in inside if p.grad in ("none", None)] or inside
    names = list(dict.fromkeys(p.name for p in inside))
    how = ("the loss has no grad_fn" if snap.loss is not None and not snap.loss.requires_grad
           else "silent: the loss still has a grad_fn through later trainable parameters")
    if snap.inputs_embeds_given:
        why = "inputs_embeds was passed and does not require grad"
    elif not snap.input_grad_hook:
        why = "no input-grad hook on the input embedding"
    elif idle := [m.name for m in snap.modules if m.ran is False and any(is_input_grad_hook(h) for h in m.hooks)]:
        why = (f"the input-grad hook sits on {idle[0]}, which the forward never calls: the inputs enter through "
               "another module")
    else:
        why = "the region's inputs do not require grad"
    message = (f"{plural(len(regions), 'reentrant checkpointed region')} ({layer_span(regions)}) get no input that "
               f"requires grad ({why}); {plural(len(names), 'trainable parameter')} inside get no gradient — {how}")
    return [RULE.finding(message, location=regions[0], params=names)]


def _static(snap, trainable):
    """Without a forward: predict the cut from transformers' checkpointing state and the hook."""
    if snap.gc_mode != "reentrant" or snap.input_grad_hook:
        return []
    gc_layers = [m.name for m in snap.modules if m.gc == "reentrant" and m.name and m.cls != snap.model_class
                 and not m.cls.endswith("Model")]
    if not gc_layers:
        return []
    if any(p.embedding and p.requires_grad for p in snap.params):
        return []
    inside = [p for p in trainable if any(under(p.module, g) for g in gc_layers)]
    if not inside:
        return []
    message = (f"predicted without a forward: reentrant checkpointing on {plural(len(gc_layers), 'layer')} "
               f"({layer_span(gc_layers)}), no input-grad hook and a frozen embedding; "
               f"{plural(len(inside), 'trainable parameter')} inside would get no gradient")
    return [RULE.finding(message, location=gc_layers[0], params=[p.name for p in inside])]


RULE = Rule(
    code="GF101", slug="reentrant-checkpoint-no-input-grad", severity="error",
    fix_title="Install the input-grad hook where inputs enter (enable_input_require_grads) or use non-reentrant checkpointing",
    check=check, doc=__doc__,
)
