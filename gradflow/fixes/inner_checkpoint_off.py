"""## What it does
Turns off transformers' per-layer gradient checkpointing on the layers that already run inside another
(outer) checkpointed region, so each activation is checkpointed once.

## Why this fix
A checkpoint inside a checkpoint saves nothing more, and when the inner layer is called with keyword arguments
only, the inner checkpoint sees no tensor input and backward raises
`none of output has requires_grad=True, this checkpoint() is not necessary`. The outer checkpoint is yours and
stays; the inner one is transformers' and can be switched off per layer. When the inner checkpoint is your own
code too, gradflow shows the exact place instead.

## Fix safety
Safe: the outer checkpoint still recomputes the layers; the gradients are the same.
"""

from __future__ import annotations

from gradflow.fixes._base import Fix, Plan, describe_module, submodule_expr, under

ANSWERS = ("nested-checkpoint",)


def inner_layers(snap) -> list[str]:
    """transformers checkpointing layers that run inside a checkpointed region they did not open."""
    gc_layers = {m.name for m in snap.modules if m.gc != "off" and m.name}
    found = {c.location for c in snap.checkpoints if c.depth >= 1 and c.location in gc_layers}
    if found:
        # transformers 5 checkpoints a layer only while grad is on, so only the first layer recomputed before the
        # error shows up nested; every transformers layer inside a region opened by user code is nested too
        for call in snap.checkpoints:
            caller = snap.module(call.caller) if call.caller is not None else None
            if call.depth == 0 and call.phase == "forward" and caller is not None and caller.gc == "off":
                roots = call.modules or [call.caller]
                found.update(n for n in gc_layers if n != call.caller and any(under(n, r) for r in roots))
    order = {m.name: i for i, m in enumerate(snap.modules)}
    return sorted(found, key=lambda n: order.get(n, 0))


def plan(ctx, finding):
    layers = inner_layers(ctx.snap)
    if not layers:
        # the exact place: the module whose code opens the inner checkpoint (else the region the rule named)
        inner = next((c for c in ctx.snap.checkpoints if c.depth >= 1 and c.caller is not None), None)
        place = inner.caller if inner is not None else finding.location
        where = describe_module(ctx.model, place) if place is not None else "your code"
        return Plan(fix=FIX, data={}, answers=[finding.slug], location=place, applicability="display-only",
                    key=f"advice:nested-checkpoint:{place}",
                    changes=[f"checkpoint only once at {where}: remove the outer or the inner checkpoint call, or pass "
                             "the hidden states positionally to the inner one"],
                    why="both checkpoint calls are in your code",
                    snippet_lines=[f"# in {where}: checkpoint only once (remove the inner checkpoint call)"])
    return Plan(fix=FIX, data={"modules": layers}, answers=[finding.slug], location=layers[0],
                changes=[f"gradient_checkpointing = False on {len(layers)} inner layer{'s' if len(layers) != 1 else ''}"
                         f" ({layers[0]}{', …' if len(layers) > 1 else ''}); the outer checkpoint stays"],
                why="the inner checkpointing is transformers' per-layer switch, so it can be turned off where an outer "
                    "checkpoint already covers the layer; the outer one is your code and stays")


def apply(model, data, env=None) -> list[str]:
    changed = []
    for name in data["modules"]:
        module = model.get_submodule(name)
        if getattr(module, "gradient_checkpointing", False):
            module.gradient_checkpointing = False
            changed.append(f"{name}.gradient_checkpointing = False")
    return changed


def snippet(data) -> list[str]:
    names = data["modules"]
    if len(names) == 1:
        return [f"{submodule_expr(names[0])}.gradient_checkpointing = False  # the outer checkpoint covers it"]
    return [f"for name in {names!r}:",
            "    model.get_submodule(name).gradient_checkpointing = False  # the outer checkpoint covers it"]


FIX = Fix(id="inner-checkpoint-off", title="Turn off the inner checkpointing under the outer checkpoint",
          applicability="safe", answers=ANSWERS, plan=plan, apply=apply, snippet=snippet, doc=__doc__)
