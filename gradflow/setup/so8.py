"""SO(8) rotation adapters on the attention output, before `o_proj`.

`theta` has shape [dim/8, 8, 8] and starts at zero. Each 8×8 block's rotation is `R = matrix_exp(theta − thetaᵀ)`:
the exponential of a skew-symmetric matrix is exactly in SO(8), so no orthogonality penalty is needed, and at
init R = I, so the model starts as the base model.

Placement: the rotation lives at `self_attn.so8` (so PEFT's `modules_to_save=["so8"]` trains and saves it), and a
forward pre-hook on whatever module sits at `self_attn.o_proj` (plain Linear, LoRA wrapper, bitsandbytes linear)
rotates its input. The hook is attached after PEFT has wrapped `o_proj`, so LoRA on o_proj sees the rotated input
too, and `o_proj(R x) = W·blockdiag(R) x` is what `fold_into_o_proj` bakes in.
"""

from __future__ import annotations

import json
import os
import pickle

import torch

from gradflow.errors import GradflowError
from gradflow.models import layer_index
from gradflow.noise import refusing_pickles

MODULE_NAME = "so8"
META_FILE = "gradflow_so8.json"
# beside a PEFT adapter: the trainable tensors save_pretrained leaves out (not adapter weights, not modules_to_save,
# e.g. an embedding unfrozen by hand), so a gradflow run loses none of what it trained; load_adapter restores them
OUTSIDE_FILE = "trainable_state.pt"


class SO8Rotation(torch.nn.Module):
    """Block-diagonal rotation of the last dimension by dim/8 learned SO(8) matrices."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 8:
            raise GradflowError(f"SO(8) rotation needs a dimension divisible by 8, got {dim}",
                                "Pick layers whose attention output width is a multiple of 8")
        self.dim = dim
        self.theta = torch.nn.Parameter(torch.zeros(dim // 8, 8, 8))

    def rotation(self) -> torch.Tensor:
        """R per block, [dim/8, 8, 8], computed in fp32."""
        theta = self.theta.float()
        return torch.linalg.matrix_exp(theta - theta.transpose(-1, -2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rot = self.rotation().to(x.dtype)
        blocks = x.unflatten(-1, (-1, 8))
        # y_b = R_b x_b for every block b
        return torch.einsum("bji,...bi->...bj", rot, blocks).flatten(-2)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, blocks={self.dim // 8}"


def attention_modules(model) -> list[tuple[int, str, torch.nn.Module]]:
    """(layer index, name, module) for every attention module with an `o_proj`."""
    found = []
    for name, module in model.named_modules():
        if not hasattr(module, "o_proj") or isinstance(module, torch.nn.Linear):
            continue
        index = layer_index(name)
        if index is not None:
            found.append((index, name, module))
    return found


def parse_layers(spec: str | None) -> list[int]:
    """'4,5,7' → [4, 5, 7]."""
    if spec is None or not str(spec).strip():
        return []
    try:
        layers = sorted({int(part) for part in str(spec).split(",") if part.strip()})
    except ValueError as exc:
        raise GradflowError(f"--so8-layers {spec!r} is not a comma-separated list of layer indices",
                            "Write it like --so8-layers 2,3") from exc
    if any(i < 0 for i in layers):
        raise GradflowError(f"--so8-layers {spec!r} has a negative index", "Use layer indices from 0")
    return layers


def install(model, layers: list[int]) -> list[str]:
    """Add an identity-initialised SO8Rotation at `self_attn.so8` of each layer; the names of those modules."""
    attn = {i: (name, m) for i, name, m in attention_modules(model)}
    if not attn:
        raise GradflowError(f"--so8-layers: {type(model).__name__} has no attention module with an o_proj",
                            "SO(8) adapters need Llama/Phi-3/Mistral-style attention (self_attn.o_proj)")
    missing = [i for i in layers if i not in attn]
    if missing:
        raise GradflowError(f"--so8-layers {','.join(map(str, missing))}: no such layer "
                            f"(the model has layers {min(attn)}..{max(attn)})", "Pick layers inside that range")
    names = []
    for i in layers:
        name, module = attn[i]
        o_proj = module.o_proj
        dim = getattr(o_proj, "in_features", None)
        if dim is None:
            raise GradflowError(f"{name}.o_proj has no in_features", "SO(8) adapters need a linear o_proj")
        weight = getattr(o_proj, "weight", None)
        device = weight.device if weight is not None and weight.device.type != "meta" else None
        rot = SO8Rotation(int(dim))
        if device is not None:
            rot.to(device)
        setattr(module, MODULE_NAME, rot)
        names.append(f"{name}.{MODULE_NAME}")
    return names


def _pre_hook(attention):
    def rotate_input(_module, args):
        if not args:
            return None
        return (getattr(attention, MODULE_NAME)(args[0]),) + tuple(args[1:])

    return rotate_input


def attach_hooks(model) -> int:
    """Make the current `o_proj` of every attention with an `so8` rotate its input (idempotent). How many."""
    count = 0
    for _, _, attention in attention_modules(model):
        if not hasattr(attention, MODULE_NAME):
            continue
        o_proj = attention.o_proj
        if getattr(o_proj, "_gradflow_so8_hook", None) is None:
            # the rotation is looked up at call time, so PEFT's modules_to_save wrapper is what runs
            o_proj._gradflow_so8_hook = o_proj.register_forward_pre_hook(_pre_hook(attention))
        count += 1
    return count


def detach_hooks(model) -> None:
    for _, _, attention in attention_modules(model):
        handle = getattr(attention.o_proj, "_gradflow_so8_hook", None)
        if handle is not None:
            handle.remove()
            attention.o_proj._gradflow_so8_hook = None


def _active_rotation(module) -> SO8Rotation:
    """The SO8Rotation that runs: PEFT's trained copy when wrapped, else the module itself."""
    if isinstance(module, SO8Rotation):
        return module
    copies = getattr(module, "modules_to_save", None)
    if copies is not None:
        active = getattr(module, "active_adapter", None)
        active = active[0] if isinstance(active, (list, tuple)) else active
        if active in copies:
            return copies[active]
    original = getattr(module, "original_module", None)
    if isinstance(original, SO8Rotation):
        return original
    raise TypeError(f"not an SO8Rotation: {type(module).__name__}")


@torch.no_grad()
def fold_into_o_proj(model) -> int:
    """Bake each rotation into its o_proj (W ← W·blockdiag(R)), remove the rotation and its hook. How many."""
    detach_hooks(model)
    folded = 0
    for _, name, attention in attention_modules(model):
        if not hasattr(attention, MODULE_NAME):
            continue
        rot = _active_rotation(getattr(attention, MODULE_NAME))
        o_proj = attention.o_proj
        if type(o_proj) is not torch.nn.Linear:  # bitsandbytes linears subclass Linear: not foldable
            raise GradflowError(f"{name}.o_proj is {type(o_proj).__name__}, not a plain Linear",
                                "Merge LoRA first and load the base unquantized before folding SO(8) rotations")
        big = torch.block_diag(*rot.rotation().to(o_proj.weight.device))
        o_proj.weight.copy_((o_proj.weight.float() @ big).to(o_proj.weight.dtype))
        delattr(attention, MODULE_NAME)
        folded += 1
    return folded


def rotations(model) -> dict[str, torch.Tensor]:
    """Layer name → the R blocks that run now (for tests and reports)."""
    out = {}
    for _, name, attention in attention_modules(model):
        if hasattr(attention, MODULE_NAME):
            out[name] = _active_rotation(getattr(attention, MODULE_NAME)).rotation().detach()
    return out


def write_meta(directory: str, layers: list[int]) -> None:
    with open(os.path.join(directory, META_FILE), "w") as fh:
        json.dump({"layers": layers, "module": MODULE_NAME, "placement": "self_attn.o_proj input"}, fh, indent=2)


def read_meta(directory: str) -> list[int]:
    path = os.path.join(directory, META_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        return [int(i) for i in json.load(fh).get("layers", [])]


def load_adapter(base, adapter_dir: str, *, is_trainable: bool = False):
    """PeftModel.from_pretrained, after installing the SO(8) rotations the adapter was trained with.

    Plain `PeftModel.from_pretrained` loads the LoRA weights of any gradflow adapter; this also restores the
    SO(8) rotations (saved through modules_to_save) and the hooks that apply them, and the trainable tensors
    save_pretrained left out (OUTSIDE_FILE, written by gradflow train).
    """
    from peft import PeftModel

    layers = read_meta(adapter_dir)
    if layers:
        install(base, layers)
    try:
        with refusing_pickles():
            model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=is_trainable)
    except pickle.UnpicklingError as exc:  # nothing in it ran: torch's weights-only loader refused it
        raise GradflowError(f"{adapter_dir} holds an adapter file that is not plain tensors (torch refused to "
                            "unpickle it)", "Save the adapter again with save_pretrained (safetensors) from code "
                            "you trust") from exc
    if layers:
        attach_hooks(model)
    _restore_outside(model, adapter_dir)
    return model


def outside_adapter(model, full: dict | None = None) -> dict:
    """name -> CPU copy of each trainable tensor that save_pretrained leaves out: not under an adapter's name (its
    weights, its modules_to_save copies). `full`: the gathered (unsharded) tensors to take them from, where the
    model's own are FSDP shards."""
    adapters = set(getattr(model, "peft_config", {}) or {})
    names = [n for n, p in model.named_parameters() if p.requires_grad and not adapters & set(n.split("."))]
    if full is not None:
        return {n: full[n].detach().cpu() for n in names if n in full}
    params = dict(model.named_parameters())
    return {n: params[n].detach().cpu() for n in names}


def _restore_outside(model, adapter_dir: str) -> None:
    path = os.path.join(adapter_dir, OUTSIDE_FILE)
    if not os.path.isfile(path):
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise GradflowError(f"{path} is not plain tensors (torch refused to unpickle it)",
                            "Remove it, or write it again with gradflow train") from exc
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise GradflowError(f"{path} holds {len(missing)} tensor(s) this model does not have, first {missing[0]}",
                            "Load it onto the base model it was trained from")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
