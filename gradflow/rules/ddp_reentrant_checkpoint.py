"""## What it does
Finds reentrant gradient checkpointing around trainable parameters in a model that DistributedDataParallel wraps
with `find_unused_parameters=True` (and no `static_graph`). It reads the DDP wrapper itself, or, for a
`transformers.Trainer`, what the trainer will pass to DDP. Static: found before the first step.

## Why is this bad?
The first backward raises `RuntimeError: Expected to mark a variable ready only once`. At the end of the
forward, DDP walks the autograd graph to find unused parameters. The parameters inside a reentrant checkpoint
are hidden from that walk, so DDP marks them ready as unused; the checkpoint's recomputation in backward then
produces their gradients and marks them ready a second time. It fails with a single process already.

`Trainer` sets `find_unused_parameters=True` by itself when `ddp_find_unused_parameters` is unset and the
model is not a `PreTrainedModel` (a `PeftModel` is not), and on transformers 4.57 its checkpointing is
reentrant unless `gradient_checkpointing_kwargs={"use_reentrant": False}` is given (5.x defaults to
non-reentrant).

## Example
```python
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
ddp = DistributedDataParallel(model, find_unused_parameters=True)       # backward raises
TrainingArguments(gradient_checkpointing=True, ddp_find_unused_parameters=True,
                  gradient_checkpointing_kwargs={"use_reentrant": True})  # the same through a Trainer
```
Use non-reentrant checkpointing (`gradient_checkpointing_kwargs={"use_reentrant": False}`), or
`find_unused_parameters=False` when every trainable parameter is used in each step (or `static_graph=True`).

## Fix safety
Display-only: the checkpointing mode and the DDP options are set where the model is wrapped.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, layer_span


def _reentrant_regions(snap) -> list[str]:
    """Modules checkpointed reentrantly with trainable parameters inside: transformers' layers, or traced calls."""
    marked = [m.name for m in snap.modules if m.gc == "reentrant" and m.trainable]
    # the checkpointed layers, not the model that holds the flag too
    names = [n for n in marked if not any(o.startswith(n + ".") for o in marked)]
    for call in snap.checkpoints:
        if not call.reentrant or call.phase != "forward":
            continue
        inside = [snap.module(n) for n in call.modules]
        if any(m is not None and m.trainable for m in inside) and call.location is not None:
            names.append(call.location)
    return list(dict.fromkeys(names))


def check(snap):
    if snap.ddp_find_unused is not True or snap.ddp_static_graph:
        return []
    regions = _reentrant_regions(snap)
    if not regions and not (snap.gc_mode == "reentrant" and snap.trainable_params()):
        return []
    where = f" in {layer_span(regions)}" if regions else ""
    message = (f"reentrant gradient checkpointing{where} under DistributedDataParallel with "
               "find_unused_parameters=True: the first backward raises 'Expected to mark a variable ready only once'")
    return [RULE.finding(message, location=regions[0] if regions else None)]


RULE = Rule(
    code="GF103", slug="ddp-reentrant-checkpoint", severity="error",
    fix_title="Use non-reentrant checkpointing (gradient_checkpointing_kwargs={'use_reentrant': False}), "
              "or find_unused_parameters=False",
    check=check, doc=__doc__,
)
