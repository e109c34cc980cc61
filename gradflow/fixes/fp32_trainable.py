"""## What it does
Casts trainable parameters stored in float16/bfloat16 to float32. Adapter layers already cast their inputs to
their own dtype and their result back. Other modules get hooks: a leaf module (a Linear, an Embedding or norm, e.g.
a `modules_to_save` copy of the head) gets a forward pre-hook (`cast_inputs_float32`) that casts its half-precision
floating inputs to float32, since `F.linear` refuses mixed dtypes; and every such module gets a forward hook
(`keep_output_dtype`) that casts its output back to the dtype it produced before, so the half-precision base
around it still gets the dtype it expects.

## Why this fix
Master weights belong in fp32: with fp16 AMP, `GradScaler.unscale_` refuses fp16 gradients, and without it small
updates round away in half precision. The frozen base stays in its dtype, so memory barely changes.

## Fix safety
Safe: the stored weights (and so their updates) gain precision; the module's own math runs in float32 as PEFT's
adapter layers do, and what the rest of the model sees keeps its dtype.
"""

from __future__ import annotations

from gradflow.fixes._base import Fix, Plan
from gradflow.models import has_hook, is_peft_model, mark_hook
from gradflow.rules._base import plural

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
    return mark_hook(keep_output_dtype, "keep-output-dtype")


def _to_float32(obj, depth: int = 0):
    """`obj` with its float16/bfloat16 tensors (inside tuples, lists and dicts) cast to float32."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.dtype in (torch.float16, torch.bfloat16) else obj
    if depth < 3 and isinstance(obj, (tuple, list)):
        return type(obj)(_to_float32(t, depth + 1) for t in obj)
    if depth < 3 and type(obj) is dict:
        return {k: _to_float32(v, depth + 1) for k, v in obj.items()}
    return obj


def cast_inputs_float32(module, args, kwargs):
    """A forward pre-hook (with_kwargs) casting half-precision floating inputs to float32, the weights' dtype."""
    return _to_float32(args), _to_float32(kwargs)


mark_hook(cast_inputs_float32, "cast-inputs-float32")


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
    return Plan(fix=FIX, data={"params": "trainable", "peft": is_peft_model(ctx.model)}, answers=[finding.slug],
                location=finding.location,
                changes=[f"{plural(len(half), 'trainable parameter')} {dtypes} -> float32 "
                         f"(+{sum(p.numel() for _, p in half) * 2:,} bytes); the frozen base keeps its dtype"],
                why="fp32 master weights keep small updates and let AMP unscale gradients; hooks cast the inputs of "
                    "a cast layer to float32 and its output back, so the rest of the model keeps its dtype")


def apply(model, data, env=None) -> list[str]:
    import torch

    half = half_trainable(model)
    if not half:
        return []
    modules = dict(model.named_modules())
    hooked, leaves = set(), set()
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
        # only a leaf computes with nothing but its inputs and its own weights: a module with children may pass its
        # inputs on to frozen half-precision children, which would then get float32 inputs
        leaf = next(owner.children(), None) is None
        if leaf:
            leaves.add(owner_name)
            if not has_hook(owner._forward_pre_hooks, "cast-inputs-float32"):
                owner.register_forward_pre_hook(cast_inputs_float32, with_kwargs=True)
        if not has_hook(owner._forward_hooks, "keep-output-dtype"):
            owner.register_forward_hook(make_keep_output_dtype(old))
        hooked.add(owner_name)
    note = f"; output dtype kept by a hook on {plural(len(hooked), 'module')}" if hooked else ""
    if leaves:
        note += f", inputs cast to float32 on {plural(len(leaves), 'leaf module')}"
    return [f"{plural(len(half), 'trainable parameter')} cast to float32{note}"]


def _lineage(name: str):
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        yield ".".join(parts[:i])


def snippet(data) -> list[str]:
    return ["def keep_output_dtype(dtype):",
            "    def hook(module, args, out):",
            "        if torch.is_tensor(out) and out.is_floating_point():",
            "            return out.to(dtype)",
            "    return hook",
            "def cast_inputs_float32(module, args):",
            "    # F.linear refuses a float16 input with float32 weights",
            "    half = (torch.float16, torch.bfloat16)",
            "    return tuple(a.float() if torch.is_tensor(a) and a.dtype in half else a",
            "                 for a in args)",
            "for mname, module in model.named_modules():",
            "    own = [p for p in module.parameters(recurse=False)",
            "           if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16)]",
            "    if own:",
            "        dtype = own[0].dtype",
            "        for p in own:",
            "            p.data = p.data.float()",
            "        # LoRA layers cast to the adapter dtype and back themselves",
            "        if '.lora_' not in f'.{mname}':",
            "            if next(module.children(), None) is None:",
            "                # a leaf computes only with its inputs",
            "                module.register_forward_pre_hook(cast_inputs_float32)",
            "            module.register_forward_hook(keep_output_dtype(dtype))"]

FIX = Fix(id="fp32-trainable", title="Cast the trainable parameters to float32", applicability="safe",
          answers=ANSWERS, plan=plan, apply=apply, snippet=snippet, doc=__doc__)
