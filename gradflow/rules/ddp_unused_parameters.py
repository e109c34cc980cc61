"""## What it does
Finds trainable parameters that got no gradient in the probe of a model that DistributedDataParallel wraps with
`find_unused_parameters=False` (and no `static_graph`), naming them. It reads the DDP wrapper itself, or, for a
`transformers.Trainer`, what the trainer will pass to DDP. Needs the probe's backward.

## Why is this bad?
DDP waits for a gradient of every trainable parameter before it finishes the step's reduction. A parameter that gets
none leaves the reduction unfinished, and the second step's forward raises `RuntimeError: Expected to have finished
reduction in the prior iteration before starting a new one`, after the first step's time is spent, on every rank.
With `find_unused_parameters=True` DDP finds such parameters itself each step (at some cost), so gradflow says
nothing here; `trainable-param-unused` still names parameters that never ran.

## Example
```python
class Model(nn.Module):
    def forward(self, x):
        return self.head(x)              # self.extra is trainable and never used
DistributedDataParallel(Model(), find_unused_parameters=False)   # the second step raises
```
Freeze the parameters the forward does not use (or use them), or pass `find_unused_parameters=True`
(`ddp_find_unused_parameters=True` in TrainingArguments).

## Fix safety
Display-only: the freezing and the DDP options are set in the training code.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, plural, short
from gradflow.snapshot import ancestors


def check(snap):
    if not snap.probed or snap.ddp_find_unused is not False or snap.ddp_static_graph:
        return []
    if snap.loss is None or snap.loss.error is not None:
        return []  # the backward did not finish: which parameters would get no gradient is unknown
    unused = [p for p in snap.params if p.requires_grad and p.grad == "none"]
    if not unused:
        return []
    names = [p.name for p in unused]
    # named at the branch that took no part (a VLM's vision tower on a text-only batch), not at each weight
    index = {m.name: m for m in snap.modules}
    unused_out = {m.name for m in snap.modules if m.unused_params}
    branches = list(dict.fromkeys(_branch(p.module, index, unused_out) for p in unused))
    message = (f"{plural(len(unused), 'trainable parameter')} got no gradient under DistributedDataParallel with "
               f"find_unused_parameters=False: {short(names, 3)}; the second step raises 'Expected to have finished "
               "reduction in the prior iteration'")
    message += f" (in {short([b or 'the model' for b in branches], 2)})"
    return [RULE.finding(message, location=branches[0] or None, params=names)]


def _branch(module: str, index: dict, unused: set) -> str:
    """The outermost module holding `module` that did not run, or whose outputs never reached the loss."""
    best = module
    for name in ancestors(module):
        m = index.get(name)
        if m is None or not name:
            break
        if m.ran is False or name in unused:
            best = name
        elif m.ran:
            break
    return best


RULE = Rule(
    code="GF107", slug="ddp-unused-parameters", severity="error",
    fix_title="Freeze the parameters the forward does not use, or find_unused_parameters=True",
    check=check, doc=__doc__,
)
