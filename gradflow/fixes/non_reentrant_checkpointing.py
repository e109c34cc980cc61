"""## What it does
Switches transformers' gradient checkpointing from reentrant to non-reentrant
(`gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})`, or
`activation_checkpointing_enable` on transformers 5). For a Trainer, also its
`args.gradient_checkpointing_kwargs`, since `train()` turns checkpointing on again from its arguments.

## Why this fix
Non-reentrant checkpointing gives the parameters inside a region their gradients whatever its inputs. It is the
alternative to the input-grad hook, chosen only where the hook has no entry point to sit on, because it changes
memory behaviour (what is saved and when it is recomputed). Where the checkpoint call is your own code, gradflow
shows where to change it instead.

## Fix safety
Safe: the gradients are the same; only what is kept in memory between forward and backward changes.
"""

from __future__ import annotations

from gradflow.fixes import input_grad_hook
from gradflow.fixes._base import Fix, Plan
from gradflow.models import gc_mode_of, is_peft_model, set_checkpointing

ANSWERS = ("reentrant-checkpoint-no-input-grad",)


def _transformers_checkpointing(snap) -> str | None:
    """The module whose transformers checkpointing made the first cut region, or None for a user's checkpoint call."""
    for call in input_grad_hook.cut_regions(snap):
        for name in (call.location, call.caller):
            state = snap.module(name) if name is not None else None
            if state is not None and state.gc == "reentrant":
                return name
    return None


def plan(ctx, finding):
    where = _transformers_checkpointing(ctx.snap)
    if where is None:
        return input_grad_hook.advice_for_custom_region(ctx, finding)
    data = {"mode": "non-reentrant", "peft": is_peft_model(ctx.model), "trainer": ctx.snap.trainer is not None}
    return Plan(fix=FIX, data=data, answers=[finding.slug],
                location=where, key="checkpointing-mode",
                changes=["transformers gradient checkpointing: reentrant -> non-reentrant"],
                why=("no entry point can carry the input-grad hook here (the inputs do not come through an embedding "
                     "gradflow can hook); non-reentrant checkpointing passes gradients whatever the inputs, at the "
                     "price of a different memory behaviour"))


def apply(model, data, env=None) -> list[str]:
    if not any(gc_mode_of(m) == "reentrant" for m in model.modules()):
        return []
    set_checkpointing(model, "non-reentrant")
    return ["gradient checkpointing set to non-reentrant"]


def snippet(data) -> list[str]:
    if data.get("trainer"):  # train() turns checkpointing on again from the arguments (gradflow.api keeps it there)
        return ['trainer.args.gradient_checkpointing_kwargs = {"use_reentrant": False}  # before trainer.train()']
    target = "model.get_base_model()" if data.get("peft") else "model"
    return [f'{target}.gradient_checkpointing_enable(gradient_checkpointing_kwargs={{"use_reentrant": False}})']


FIX = Fix(id="non-reentrant-checkpointing", title="Use non-reentrant gradient checkpointing", applicability="safe",
          answers=ANSWERS, plan=plan, apply=apply, snippet=snippet, doc=__doc__)
