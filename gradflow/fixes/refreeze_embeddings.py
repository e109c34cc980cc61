"""## What it does
Freezes input-embedding / output-head matrices left trainable beside adapters. When an input embedding is among
them and reentrant checkpointing needs it, it also installs the input-grad hook (see `input-grad-hook`), so the
adapters keep their gradients; an output head needs no hook (nothing checkpointed runs after it).

## Why this fix
Making the whole embedding trainable is the usual workaround for missing input gradients under reentrant
checkpointing: for a 32k x 3072 vocabulary that is ~98M parameters and over 1.5 GB of gradients and optimizer
state. The hook gives the adapters the same gradients for one extra activation gradient.

## Fix safety
Unsafe: the embeddings stop training, which changes what the model learns. Applied only with `--unsafe-fixes`.
"""

from __future__ import annotations

from gradflow.fixes import input_grad_hook
from gradflow.fixes._base import Fix, Plan, training_cost
from gradflow.rules._base import human_bytes
from gradflow.rules.trainable_embeddings_costly import OUTPUT, deliberate, role

ANSWERS = ("trainable-embeddings-costly",)


def _needs_hook(snap) -> bool:
    return snap.gc_mode == "reentrant" or any(c.reentrant for c in snap.checkpoints)


def plan(ctx, finding):
    by_name = {p.name: p for p in ctx.snap.params}
    # a modules_to_save copy is the user's choice (an info finding): never refrozen
    costly = [by_name[n] for n in finding.params
              if n in by_name and by_name[n].requires_grad and not deliberate(by_name[n])]
    if finding.severity == "info" or not costly:
        return None
    numel = sum(p.numel for p in costly)
    saved = training_cost(costly)
    inputs = [p for p in costly if role(ctx.snap, p) != OUTPUT]
    why = ("the adapters need gradients through the embedding output, not a trainable embedding matrix" if inputs else
           "the adapters get their gradients without it; LoRA on the head (target_modules) adapts it for a fraction")
    plans = [Plan(fix=FIX, data={"params": [p.name for p in costly]}, answers=[finding.slug], location=finding.location,
                  changes=[f"requires_grad=False on {', '.join(p.name for p in costly)}: {numel:,} parameters and about "
                           f"{human_bytes(saved)} of gradients and Adam states saved"],
                  why=why)]
    if inputs and _needs_hook(ctx.snap):  # a frozen head changes nothing upstream: no hook for it
        hook = input_grad_hook.hook_plan(ctx, [finding.slug], need_region=False)
        if hook is not None:
            hook.why = "with the embedding frozen, reentrant checkpointed regions need the hook to pass gradients"
            hook.applicability = FIX.applicability  # part of the unsafe change: applied with it or not at all
            plans.append(hook)
    return plans


def apply(model, data, env=None) -> list[str]:
    params = dict(model.named_parameters())
    frozen = []
    for name in data["params"]:
        p = params.get(name)
        if p is not None and p.requires_grad:
            p.requires_grad_(False)
            frozen.append(name)
    return [f"froze {', '.join(frozen)}"] if frozen else []


def snippet(data) -> list[str]:
    return [f"for name in {data['params']!r}:",
            "    model.get_parameter(name).requires_grad_(False)  # the adapters train without the full matrix"]


FIX = Fix(id="refreeze-embeddings", title="Refreeze the costly embedding matrices",
          applicability="unsafe", answers=ANSWERS, plan=plan, apply=apply, snippet=snippet, doc=__doc__)
