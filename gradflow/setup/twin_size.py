"""The real model's sizes for the dry run's twin: parameter counts, bytes and LoRA shapes of the full-size config.

The full-width model is built on the meta device (no memory, no weights). A mixture-of-experts config is built with
the twin's few experts and one more, and every size is extrapolated to the real expert count
(gradflow.setup.twin_experts), so a 128-expert, 94-layer config costs what a 2-expert one does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gradflow.errors import GradflowError
from gradflow.setup.build import apply_lora
from gradflow.setup.options import resolved_lora
from gradflow.setup.sources import _first_line
from gradflow.setup.twin_experts import (TWIN_EXPERTS, ExpertMap, containers, expand_snapshot, expert_count,
                                         extrapolate, with_experts)
from gradflow.snapshot import count_into_ancestors

_LORA_SEGMENTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1}


def causal_lm(config, *, trust_remote_code: bool, dtype=None):
    import copy

    from transformers import AutoModelForCausalLM

    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    # from_config writes the dtype it used into the config: keep the caller's as the file had it
    return AutoModelForCausalLM.from_config(copy.deepcopy(config), **kwargs)


def meta_model(config, *, trust_remote_code: bool = False):
    """The full-width model on the meta device: its parameter names, shapes and modules, without memory."""
    import torch

    try:
        with torch.device("meta"):
            return causal_lm(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except Exception as exc:
        raise GradflowError(f"cannot build a causal LM from {type(config).__name__}: {_first_line(exc)}",
                            "A dry run supports configs that AutoModelForCausalLM.from_config accepts") from exc


@dataclasses.dataclass
class FullSize:
    """The real model's sizes, keyed by the twin's names (the twin has the same tree, with fewer experts)."""

    numel: dict[str, int]  # parameter name -> numel at full size
    dims: dict[str, tuple[int, int]]  # LoRA-able module name -> (in, out) features at full size
    experts: ExpertMap | None  # None for a dense config
    configs: tuple  # the full-width configs built (one, or the twin's expert count and one more)
    model: Any  # the full-width meta model with the twin's expert count, for the tree check


def measure(config, *, trust_remote_code: bool = False, twin_experts: int = TWIN_EXPERTS) -> FullSize:
    """Sizes of the full model `config` describes, built on the meta device with at most `twin_experts` + 1 experts."""
    real = expert_count(config)
    if not real or real <= twin_experts:
        model = meta_model(config, trust_remote_code=trust_remote_code)
        return FullSize(_numels(model), _dims(model), None, (config,), model)
    configs = (with_experts(config, twin_experts), with_experts(config, twin_experts + 1))
    model, nxt = (meta_model(c, trust_remote_code=trust_remote_code) for c in configs)
    emap = ExpertMap(real, twin_experts, containers([n for n, _ in model.named_modules()],
                                                    [n for n, _ in nxt.named_modules()], twin_experts))
    return FullSize(extrapolate(_numels(model), _numels(nxt), twin_experts, real),
                    extrapolate(_dims(model), _dims(nxt), twin_experts, real), emap, configs, model)


def _numels(model) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters()}


def _dims(model) -> dict[str, tuple[int, int]]:
    return {n: d for n, m in model.named_modules() if (d := _in_out(m)) is not None}


def _in_out(module) -> tuple[int, int] | None:
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if hasattr(module, "num_embeddings"):
        return int(module.num_embeddings), int(module.embedding_dim)
    if type(module).__name__ == "Conv1D":  # GPT-2: weight is (in, out)
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def full_numel(name: str, twin_shape, size: FullSize) -> int | None:
    """The numel of twin parameter `name` in the full-size model, or None when it cannot be mapped."""
    segments = name.split(".")
    if segments[:2] == ["base_model", "model"]:  # a PeftModel's prefix
        segments = segments[2:]
    for i, seg in enumerate(segments):
        if seg in _LORA_SEGMENTS:
            return _adapter_numel(".".join(segments[:i]), seg, twin_shape, size)
    out, skip = [], 0
    for seg in segments:
        if skip:
            skip -= 1
            continue
        if seg in ("base_layer", "original_module"):
            continue
        if seg == "modules_to_save":
            skip = 1  # the adapter name after it
            continue
        out.append(seg)
    return size.numel.get(".".join(out))


def _adapter_numel(owner: str, kind: str, twin_shape, size: FullSize) -> int | None:
    """A LoRA weight's full size: its rank (the twin's) times the full base layer's in or out features."""
    owner = ".".join(s for s in owner.split(".") if s != "base_layer")
    dims = size.dims.get(owner)
    if dims is None:
        return None
    n_in, n_out = dims
    shape = list(twin_shape)
    if kind == "lora_A":
        return shape[0] * n_in if len(shape) == 2 else None
    if kind == "lora_B":
        return n_out * shape[1] if len(shape) == 2 else n_out
    if kind == "lora_embedding_A":
        return shape[0] * n_in
    if kind == "lora_embedding_B":
        return n_out * shape[1]
    return n_out  # lora_magnitude_vector


def _meta_adapted_numel(size: FullSize, opts) -> dict[str, int]:
    """Parameter sizes of the full model with the same LoRA, built on the meta device: the slow, general way, for
    adapter weights whose shape the base layer alone does not give (e.g. LoRA on fused MoE expert parameters)."""
    import torch

    rank, alpha, targets = resolved_lora(opts.lora_r, opts.lora_alpha, opts.lora_targets)
    if rank <= 0 or opts.adapter is not None:
        return {}
    built = []
    for config in size.configs:
        model = meta_model(config, trust_remote_code=opts.trust_remote_code)
        with torch.device("meta"):
            built.append(_numels(apply_lora(model, rank, alpha, targets)))
    if len(built) == 1:
        return built[0]
    return extrapolate(built[0], built[1], size.experts.twin, size.experts.real)


def to_full_size(snap, size: FullSize, shapes: dict[str, tuple], opts) -> dict:
    """Put the full model's parameters into `snap` (every expert's, with its count; module roll-ups); returns the
    size summary."""
    unmapped = []
    weight_bytes = 0.0
    full = {p.name: full_numel(p.name, shapes.get(p.name, ()), size) for p in snap.params}
    if any(n is None for n in full.values()):
        adapted = _meta_adapted_numel(size, opts)
        full = {name: adapted.get(name) if n is None else n for name, n in full.items()}
    for p in snap.params:
        n = full[p.name]
        if n is None:
            unmapped.append(p.name)
        else:
            p.numel = n
    expand_snapshot(snap, size.experts)
    for p in snap.params:
        if p.quantized:
            weight_bytes += p.numel * (0.5 if snap.quantized == "4bit" else 1)
        else:
            weight_bytes += p.numel * _BYTES.get(p.dtype, 4)
    index = {m.name: m for m in snap.modules}
    for m in snap.modules:
        m.trainable = m.frozen = m.quantized = 0
    for p in snap.params:
        count_into_ancestors(index, p)
    trainable = [p for p in snap.params if p.requires_grad]
    return {"params_total": sum(p.numel for p in snap.params),
            "params_trainable": sum(p.numel for p in trainable),
            "weights_bytes": int(weight_bytes),
            # weights, gradients and two fp32 Adam states of what trains
            "trainable_train_bytes": int(sum(p.numel * (2 * _BYTES.get(p.dtype, 4) + 8) for p in trainable)),
            "unmapped_params": unmapped[:20], "unmapped_count": len(unmapped)}
