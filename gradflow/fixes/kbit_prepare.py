"""## What it does
Does what `peft.prepare_model_for_kbit_training` does for an already-built quantized model: casts the
unquantized half-precision parameters (norms) to float32, and installs the input-grad hook when checkpointing is
on without it.

## Why this fix
Norms in fp16/bf16 make k-bit training unstable, and PEFT does not add the input-grad hook on a quantized model
by itself, so reentrant checkpointing leaves the adapters without gradients. `prepare_model_for_kbit_training`
cannot run after `get_peft_model` (it would re-freeze the adapters), so gradflow applies its two effects directly.

## Fix safety
Safe: the norms compute in fp32 as PEFT's preparation would have them; the hook only marks activations.
"""

from __future__ import annotations

from gradflow.fixes import input_grad_hook
from gradflow.fixes._base import Fix, Plan
from gradflow.rules.kbit_not_prepared import reentrant_checkpointing

ANSWERS = ("kbit-not-prepared",)


def unquantized_half(model):
    """(name, param) of every fp16/bf16 parameter that bitsandbytes did not quantize (norms, embeddings, head)."""
    import torch

    return [(n, p) for n, p in model.named_parameters()
            if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ != "Params4bit"]


def plan(ctx, finding):
    plans = []
    half = unquantized_half(ctx.model)
    if half:
        plans.append(Plan(fix=FIX, data={"params": "unquantized-half"}, answers=[finding.slug],
                          location=finding.location,
                          changes=[f"{len(half)} unquantized half-precision parameters -> float32 "
                                   f"({half[0][0]}{', …' if len(half) > 1 else ''})"],
                          why="k-bit training keeps the unquantized parameters (norms first) in fp32 for stability, "
                              "as prepare_model_for_kbit_training does; casting all of them keeps the dtypes consistent"))
    if reentrant_checkpointing(ctx.snap) and not ctx.snap.input_grad_hook:  # only reentrant regions need it
        hook = input_grad_hook.hook_plan(ctx, [finding.slug], need_region=False)
        if hook is not None:
            hook.why = ("checkpointing is on over a quantized base without the input-grad hook that "
                        "prepare_model_for_kbit_training installs")
            plans.append(hook)
    return plans or None


def apply(model, data, env=None) -> list[str]:
    import torch

    half = unquantized_half(model)
    for _, p in half:
        p.data = p.data.to(torch.float32)
    return [f"{len(half)} unquantized parameters cast to float32"] if half else []


def snippet(data) -> list[str]:
    return ["for param in model.parameters():  # as prepare_model_for_kbit_training does",
            "    if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != 'Params4bit':",
            "        param.data = param.data.float()"]


FIX = Fix(id="kbit-prepare", title="Prepare the quantized base for training (fp32 norms, input-grad hook)",
          applicability="safe", answers=ANSWERS, plan=plan, apply=apply, snippet=snippet, doc=__doc__)
