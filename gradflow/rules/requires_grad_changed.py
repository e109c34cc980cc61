"""## What it does
Finds trainable parameters whose `requires_grad` went off during the step: on before the step, off when the
model's forward began (the loss function or `compute_loss` switched them before calling the model), after the
model's forward or after the loss. The probe records the flags before the step, when the model's forward begins,
after it and after the loss, and names the module whose forward hook (or pre-hook) switched them,
`set_adapter(...)` when the active adapter changed, or PEFT's `disable_adapter()` when the model ran with its
adapters disabled (PEFT freezes the adapter weights while they are disabled).
`GradFlowCallback` raises it too, after a real step: a parameter that required grad when the first step began
and no longer does (a Trainer subclass's `compute_loss` runs only in the real step, not in the pre-flight). A
module frozen before the first step (before `train()`, or in a callback's `on_train_begin`) or between steps (a
callback's `on_step_end`) is no finding.

## Why is this bad?
A parameter whose flag goes off during the forward is not recorded in the graph: it gets no gradient, and the
optimizer never moves it. The run raises `element 0 of tensors does not require grad` when every trainable
parameter went off, and trains silently without the others.

## Example
```python
class MyTrainer(Trainer):
    def compute_loss(self, model, inputs, **kwargs):
        model.set_adapter("eval")          # freezes the adapter being trained
        ...

    def compute_loss(self, model, inputs, **kwargs):
        with model.disable_adapter():      # meant for a reference forward: the adapters are frozen and bypassed
            out = model(**inputs)
        ...

layer.register_forward_pre_hook(lambda m, a: m.requires_grad_(False))   # a 'freeze' hook left in
```
Switch adapters and freeze parameters before training starts, not inside the forward, a hook or the loss.

## Fix safety
Display-only: the call that switches the flag is in your code; the finding names where it ran.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, owner, plural, short


def check(snap):
    if not snap.probed or not snap.flips:
        return []
    found = []
    loss = f"{snap.trainer}.compute_loss" if snap.trainer else "the loss function"
    for flip in snap.flips:
        where = flip.module if flip.module is not None else owner(flip.params)
        when = {"before_forward": f"in {loss}, before the model's forward",
                "forward": "during the model's forward"}.get(flip.phase, f"in {loss}, after the model's forward")
        if flip.via == "disable_adapter":
            how = (f"PEFT's disable_adapter() switched requires_grad off {when} (while it is active the adapters are "
                   "frozen and bypassed, so the forward inside it trains none of them)")
            title = ("Run only the reference forward inside model.disable_adapter(); compute the training loss from a "
                     "forward outside it")
        elif flip.via == "set_adapter":
            how = (f"set_adapter switched the active adapter from {', '.join(flip.adapters_before)} to "
                   f"{', '.join(flip.adapters_after)} {when}")
            title = "Call set_adapter before training starts, not inside the forward or compute_loss"
        elif flip.via is not None and flip.module is not None:
            how = f"a {flip.via} of {flip.module or 'the model'} switched requires_grad off"
            title = f"Remove the requires_grad_(False) from the {flip.via} on {flip.module or 'the model'}"
        else:
            how = f"requires_grad went off {when} " + (
                "(a requires_grad_(False) there)" if flip.phase == "before_forward"
                else "(requires_grad_(False), set_adapter or a hook)")
            title = None
        again = "; it was on again by the end of the loss" if flip.toggled else ""
        message = (f"{plural(len(flip.params), 'trainable parameter')} in {where or 'the model'} stopped requiring "
                   f"grad during the step: {how}{again}; {'it gets' if len(flip.params) == 1 else 'they get'} no "
                   f"gradient: {short(flip.params, 2)}")
        found.append(RULE.finding(message, location=where or None, params=flip.params, fix_title=title,
                                  advice_only=True))
    return found


RULE = Rule(
    code="GF114", slug="requires-grad-changed", severity="error",
    fix_title="Set requires_grad (and the active adapter) before training, not inside the forward or the loss",
    check=check, doc=__doc__,
)
