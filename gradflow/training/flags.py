"""The requires_grad watch of GradFlowCallback: trainable parameters whose flag went off while the run trains.

The flags are kept when the first step begins, after every callback's `on_train_begin` (a module frozen there, or
before `trainer.train()`, is the user's choice, not a fault), for the parameters trainable then. Each step's
beginning takes the flags switched off since the last step (a callback's `on_step_end`: gradual freezing, also a
choice) out of the watch. After each step's backward they are compared: a parameter that required grad when the
step began and no longer does was switched off inside the step (`model.set_adapter(...)` or
`requires_grad_(False)` in a Trainer subclass's compute_loss, a hook), gets no gradient and never moves. That is
`requires-grad-changed`, said once, naming the deepest module that holds them all (and the adapter switch when the
active adapter changed).
"""

from __future__ import annotations

import torch

from gradflow.probing.describe import active_adapters
from gradflow.rules._base import owner, plural, short
from gradflow.training.findings import finding


def _active(model) -> tuple[str, ...]:
    """The PEFT adapters active now (none without adapters, or when they cannot be read)."""
    if model is None:
        return ()
    try:
        return active_adapters(model, {m: n for n, m in model.named_modules()})
    except Exception:  # noqa: BLE001 - an adapter set-up this PEFT cannot describe: say nothing about adapters
        return ()


class FlagWatch:
    """The parameters trainable when the first step began; `check` names those whose requires_grad went off."""

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]] = (), model=None):
        self.params = list(params)
        self.model = model
        self.adapters = _active(model) if self.params else ()
        self.flipped: list[str] = []  # switched off inside a step: the finding
        self.between: set[str] = set()  # switched off between steps (a callback's on_step_end): deliberate

    def begin_step(self) -> None:
        """At each step's beginning: flags that went off since the last step ended were switched by the loop or a
        callback, between steps (gradual freezing): deliberate, and no longer watched."""
        if not self.flipped:  # once a flip is found, check() says nothing more: nothing to keep watching
            self.between.update(n for n, p in self.params if not p.requires_grad)

    def check(self, step: int):
        """A requires-grad-changed Finding the first time a kept flag went off inside a step, else None."""
        if self.flipped:
            return None
        off = [n for n, p in self.params if not p.requires_grad and n not in self.between]
        if not off:
            return None
        self.flipped = off
        where = owner(off)
        now = _active(self.model)
        if self.adapters and now and now != self.adapters:
            how = (f"the active adapter changed from {', '.join(self.adapters)} to {', '.join(now)} "
                   "(set_adapter in compute_loss or a callback?)")
        else:
            how = "requires_grad went off inside the step (requires_grad_(False), set_adapter or a hook)"
        message = (f"step {step}: {plural(len(off), 'trainable parameter')} in {where or 'the model'} required grad "
                   f"when training began and no longer do: {how}; they get no gradient and never move: "
                   f"{short(off, 2)}")
        return finding("requires-grad-changed", message, location=where or None, params=off)
