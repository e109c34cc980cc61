"""## What it does
Casts trainable parameters stored in float16/bfloat16 to float32. Adapter layers already cast their inputs to
their own dtype and their result back; for other modules a forward hook (`keep_output_dtype`) casts the output
back to the dtype the module produced before, so the half-precision base around it still gets the dtype it expects.

## Why this fix
Master weights belong in fp32: with fp16 AMP, `GradScaler.unscale_` refuses fp16 gradients, and without it small
updates round away in half precision. The frozen base stays in its dtype, so memory barely changes.

## Fix safety
Safe: the forward math keeps its compute dtype; only the stored weights (and so their updates) gain precision.
"""

from __future__ import annotations

from gradflow.fixes._base import Fix, Plan, is_peft

ANSWERS = ("half-precision-trainable-params",)
_HALF = ("float16", "bfloat16")


def make_keep_output_dtype(dtype):
    """A forward hook casting floating outputs back to `dtype` (what the module produced before the cast)."""
    import torch

    def keep_output_dtype(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point() and output.dtype != dtype:
            return output.to(dtype)
        if isinstance(output, tuple) and any(isinstance(t, torch.Tensor) for t in output):
            return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype
                         else t for t in output)
        return None

    keep_output_dtype.dtype = dtype
    return keep_output_dtype


def _casts_itself(module) -> bool:
    """PEFT tuner layers (LoRA) cast their input to the adapter dtype and their result back."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(module, BaseTunerLayer)


def half_trainable(model):
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and str(p.dtype).replace("torch.", "") in _HALF]


def plan(ctx, finding):
    half = half_trainable(ctx.model)
    if not half:
        return None
    dtypes = "/".join(sorted({str(p.dtype).replace("torch.", "") for _, p in half}))
    return Plan(fix=FIX, data={"params": "trainable", "peft": is_peft(ctx.model)}, answers=[finding.slug],
                location=finding.location,
                changes=[f"{len(half)} trainable parameters {dtypes} -> float32 "
                         f"(+{sum(p.numel() for _, p in half) * 2:,} bytes); the frozen base keeps its dtype"],
                why="fp32 master weights keep small updates and let AMP unscale gradients; the forward keeps its "
                    "compute dtype")


def apply(model, data, env=None) -> list[str]:
    import torch

    half = half_trainable(model)
    if not half:
        return []
    modules = dict(model.named_modules())
    hooked = set()
    for name, p in half:
        owner_name = name.rsplit(".", 1)[0] if "." in name else ""
        owner = modules.get(owner_name)
        old = p.dtype
        p.data = p.data.to(torch.float32)
        if owner is None or owner_name in hooked:
            continue
        # the tuner layer above an adapter weight (lora_A.default -> the LoRA layer) casts for itself
        lineage = [modules.get(a) for a in _lineage(owner_name)]
        if any(m is not None and _casts_itself(m) for m in lineage):
            continue
        if not any(getattr(h, "__name__", "") == "keep_output_dtype" for h in owner._forward_hooks.values()):
            owner.register_forward_hook(make_keep_output_dtype(old))
        hooked.add(owner_name)
    note = f"; output dtype kept by a hook on {len(hooked)} module{'s' if len(hooked) != 1 else ''}" if hooked else ""
    return [f"{len(half)} trainable parameters cast to float32{note}"]


def _lineage(name: str):
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        yield ".".join(parts[:i])


def snippet(data) -> list[str]:
    return ["def keep_output_dtype(dtype):",
            "    return lambda module, args, out: out.to(dtype) if torch.is_tensor(out) and out.is_floating_point() "
            "else None",
            "for mname, module in model.named_modules():",
            "    own = [p for p in module.parameters(recurse=False) if p.requires_grad and p.dtype in "
            "(torch.float16, torch.bfloat16)]",
            "    if own:",
            "        dtype = own[0].dtype",
            "        for p in own:",
            "            p.data = p.data.float()",
            "        if '.lora_' not in f'.{mname}':  # LoRA layers cast to the adapter dtype and back themselves",
            "            module.register_forward_hook(keep_output_dtype(dtype))"]


FIX = Fix(id="fp32-trainable", title="Cast the trainable parameters to float32", applicability="safe",
          answers=ANSWERS, plan=plan, apply=apply, snippet=snippet, doc=__doc__)
