"""## What it does
Finds trainable parameters that got no gradient because their module took no part in the loss: either it never
ran in the forward, or it ran but none of its outputs reaches the loss (its output is computed, then not used: a
vision tower's last layer when the projector reads the layer before it). The second case is found from the forward
trace and the autograd graph, and named at the outermost module whose output is left unused. Experts of a
mixture-of-experts layer that the router did not pick in this batch are not reported, as long as a sibling
expert ran.

## Why is this bad?
They cost optimizer memory and never learn. Often a stale reference: a module replaced by PEFT (the old
`nn.Linear` object kept in a custom attribute), a head the forward never calls, or a branch behind a flag.

## Example
```python
self.extra_head = nn.Linear(d, d)       # trainable, never called in forward

feats = self.tower(pixels, output_hidden_states=True).hidden_states[-2]   # the tower's last layer runs, unused
```

## Fix safety
Unsafe, for a module that ran with its output unused: `patch --unsafe-fixes` freezes it (it changes what trains)
and re-probes. Display-only otherwise: remove the module, freeze it, or call it.
"""

from __future__ import annotations

from gradflow.rules._base import Rule, plural, short, unrouted_experts

UNUSED_OUTPUT_FIX = "Freeze it, or use its output"


def check(snap):
    if not snap.probed:
        return []
    return _never_ran(snap) + _output_unused(snap)


def _output_unused(snap):
    """Modules that ran, but none of whose outputs reaches the loss (the probe's autograd walk)."""
    held = [m for m in snap.modules if m.unused_params]
    if not held:
        return []
    names = [n for m in held for n in m.unused_params]
    where = [m.name for m in held]
    message = (f"{plural(len(names), 'trainable parameter')} in {short(where, 2)} got no gradient: "
               f"{'it' if len(where) == 1 else 'each'} ran in the forward, but none of "
               f"{'its' if len(where) == 1 else 'their'} outputs reaches the loss (computed, then not used)")
    return [RULE.finding(message, location=where[0] or None, params=names, fix_title=UNUSED_OUTPUT_FIX)]


def _never_ran(snap):
    root = snap.module("")
    if (root is not None and not root.ran) or (snap.loss is not None and snap.loss.error_phase == "forward"):
        return []  # the forward raised, or the loss skipped the model: the rest never ran for that reason
    flipped = snap.flipped()  # switched off during the step (set_adapter): requires-grad-changed says so
    unused = [p for p in snap.params if p.requires_grad and p.used is False and p.grad == "none"
              and p.name not in flipped]
    if not unused:
        return []
    unrouted = unrouted_experts(snap)
    unused = [p for p in unused if not unrouted(p)]
    if not unused:
        return []
    ran = {m.name for m in snap.modules if m.ran}
    # a module counts as run when it or something inside it ran: PEFT calls the base model's .forward directly
    alive = set()
    for name in ran:
        while name not in alive:
            alive.add(name)
            name = name.rsplit(".", 1)[0] if "." in name else ""
    modules, bypassed = [], []
    for p in unused:
        idle = _outermost_idle(p.module, alive)
        parent = idle.rsplit(".", 1)[0] if "." in idle else None
        if parent is not None and parent not in ran and parent + ".base_layer" in ran:
            # the LoRA layer did not run but its base_layer did: the forward calls the replaced module directly
            idle = parent
            bypassed.append(parent)
        modules.append(idle)
    modules = list(dict.fromkeys(modules))
    message = (f"{plural(len(unused), 'trainable parameter')} in {plural(len(modules), 'module')} never ran in the "
               f"forward: {short(modules, 2)}")
    if bypassed:
        message += (f"; the base_layer inside {bypassed[0]} ran without it: the forward calls a stale reference to "
                    "the module PEFT replaced")
    # display-only: freezing a module that never ran could hide a stale reference (gradflow.fixes.freeze_unused)
    return [RULE.finding(message, location=modules[0] or None, params=[p.name for p in unused], advice_only=True)]


def _outermost_idle(name: str, alive: set) -> str:
    """The highest ancestor of `name` that did not run: 'model.layers.3', not each lora_A inside it."""
    while "." in name and name.rsplit(".", 1)[0] not in alive:
        name = name.rsplit(".", 1)[0]
    return name


RULE = Rule(
    code="GF201", slug="trainable-param-unused", severity="warning",
    fix_title="Freeze or remove modules the forward never calls (or call them)",
    check=check, doc=__doc__,
)
