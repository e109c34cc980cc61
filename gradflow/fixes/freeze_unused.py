"""## What it does
Freezes the trainable parameters of a module that ran in the forward but whose outputs never reach the loss (a
vision tower's last layer when the projector reads the layer before it, a head computed and never used), then
re-probes: every parameter left trainable must get a gradient.

## Why this fix
They cost optimizer memory and never learn. Freezing them states what already happens; the other way out, using
the module's output in the loss, is a change to your model that gradflow does not make.

## Fix safety
Unsafe: it changes what trains (`patch --unsafe-fixes` applies it). Modules the forward never runs get display-only
advice instead (freezing could hide a stale reference to a module PEFT replaced), and so do adapter weights: leave
the module out of the adapter's `target_modules`.
"""

from __future__ import annotations

from gradflow.fixes._base import Fix, Plan

ANSWERS = ("trainable-param-unused",)


def plan(ctx, finding):
    unused = ctx.snap.unused_outputs()
    adapters = {p.name for p in ctx.snap.params if p.adapter}
    # adapter weights are left to the advice (leave the module out of target_modules): a half-frozen adapter is
    # what adapter-frozen reports, and its fix would unfreeze them again
    names = [n for n in finding.params if n in unused and n not in adapters]
    if not names:
        return None  # a module that never ran, or adapter weights: the advice table answers it
    modules = sorted({m.name for m in ctx.snap.modules if set(m.unused_params) & set(names)})
    return Plan(fix=FIX, data={"params": names, "modules": modules}, answers=[finding.slug],
                location=finding.location,
                changes=[f"requires_grad=False on {len(names)} parameters in {', '.join(modules)}: "
                         "they ran, but no output of theirs reaches the loss"],
                why="they never get a gradient; freezing them saves their optimizer state and says what trains")


def apply(model, data, env=None) -> list[str]:
    wanted = set(data["params"])
    count = 0
    for name, p in model.named_parameters():
        if name in wanted and p.requires_grad:
            p.requires_grad_(False)
            count += 1
    return [f"froze {count} parameters in {', '.join(data['modules'])} (outputs unused)"] if count else []


def snippet(data) -> list[str]:
    lines = ["# these modules run, but none of their outputs reaches the loss: freeze them (or use their output)"]
    lines += [f"model.get_submodule({m!r}).requires_grad_(False)" for m in data["modules"]]
    return lines


FIX = Fix(id="freeze-unused", title="Freeze the modules whose outputs never reach the loss", applicability="unsafe",
          answers=ANSWERS, plan=plan, apply=apply, snippet=snippet, doc=__doc__)
