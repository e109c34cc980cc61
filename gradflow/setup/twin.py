"""A toy-width twin of a real config, for the dry run: the same architecture class built from the same config, with
the same module tree, parameter names and layer count, at toy width (few heads of a few dimensions, the same
query/key-value grouping, a small MLP and vocab), random init. Parameter counts and bytes come from the full-size
config, built on the meta device (no memory, no weights). gradflow.dryrun probes the twin and judges the result.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import tempfile
from typing import Any

from gradflow.errors import GradflowError
from gradflow.setup.build import (_from_pretrained, _no_progress_bars, _quant_config, apply_lora, read_json,
                                  resolve_device, resolve_dtype)
from gradflow.setup.options import resolved_lora
from gradflow.setup.presets import preset_config
from gradflow.setup.sources import Kind, _first_line, names_code, resolve
from gradflow.snapshot import count_into_ancestors

TWIN_VOCAB = 256
_HEAD_DIMS = range(4, 130, 2)
# per-layer widths that scale with the hidden size: set to a small multiple of the twin's hidden size
_FFN_FIELDS = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "ffn_dim",
               "n_inner", "decoder_ffn_dim", "encoder_ffn_dim")
_LORA_SEGMENTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


@dataclasses.dataclass
class Twin:
    """A config and its toy-width twin: what the dry run builds and what it reports."""

    config: Any  # the real config
    twin_config: Any
    kind: Kind  # PRESET, DIR, CONFIG or HUB
    source: str
    full_numel: dict[str, int]  # full-size parameter name -> numel (meta device)
    full_modules: dict[str, Any]  # full-size module name -> module (meta device), for adapter shapes


def load_config(spec: str, *, trust_remote_code: bool = False):
    """(config, kind) for a config.json path, a directory holding one, a preset or a hub id; nothing else runs."""
    if names_code(spec):
        raise GradflowError(f"--dry-run needs a config, but {spec} is a factory (Python code that builds the model)",
                            "Pass the config.json (or its directory) of the model the factory loads, or drop --dry-run")
    setup = resolve(spec, trust_remote_code=trust_remote_code)
    if setup.kind == Kind.PRESET:
        return preset_config(spec, training=True), "preset"  # as the real preset MODEL is built
    path = spec
    if setup.kind == Kind.DIR:
        if os.path.isfile(os.path.join(spec, "adapter_config.json")) and not os.path.isfile(
                os.path.join(spec, "config.json")):
            raise GradflowError(f"{spec} is a PEFT adapter directory; a dry run builds the base from its config "
                                "and cannot load the adapter's weights",
                                "Pass the base model's config.json (or its directory) with --lora-r/--lora-targets "
                                "as the adapter was made, or drop --dry-run")
        path = os.path.join(spec, "config.json")
        if not os.path.isfile(path):
            raise GradflowError(f"{spec} holds no config.json", "Pass a directory written by save_pretrained, or the "
                                "config.json itself")
    from transformers import AutoConfig

    try:
        if setup.kind in (Kind.DIR, Kind.CONFIG):
            read_json(path)  # a readable JSON object, or one line saying what is wrong
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except GradflowError:
        raise
    except Exception as exc:
        if "trust_remote_code" in str(exc):
            raise GradflowError(f"{spec} needs custom code: {_first_line(exc)}",
                                "Read that code, then pass --trust-remote-code") from exc
        raise GradflowError(f"{spec}: not a transformers model config ({_first_line(exc)})",
                            "Pass a config.json written by save_pretrained (it names model_type)") from exc
    return config, setup.kind


def shrink_config(config, *, min_hidden: int = 0):
    """The toy-width twin's config: same class and layer count; few heads of a few dims, small MLP and vocab."""
    cfg = copy.deepcopy(config)
    n_q = _int_attr(cfg, "num_attention_heads")
    if n_q is None or _int_attr(cfg, "hidden_size") is None:
        raise GradflowError(f"{type(config).__name__} has no hidden_size / num_attention_heads to shrink",
                            "A dry run supports transformer decoder configs; drop --dry-run")
    n_kv = _int_attr(cfg, "num_key_value_heads") or n_q
    group = n_q // n_kv if n_kv and n_q % n_kv == 0 else None
    kv = min(n_kv, 2) if group else n_kv
    q = group * kv if group else n_q
    factor = getattr(cfg, "partial_rotary_factor", None) or getattr(cfg, "rotary_pct", None) or 1.0
    head_dim = next((hd for hd in _HEAD_DIMS  # rotary halves its dims: they must stay even
                     if int(hd * factor) >= 2 and int(hd * factor) % 2 == 0 and q * hd >= min_hidden),
                    2 * math.ceil(min_hidden / q / 2))
    hidden = q * head_dim
    cfg.num_attention_heads = q
    if _int_attr(cfg, "num_key_value_heads") is not None:
        cfg.num_key_value_heads = kv
    cfg.hidden_size = hidden
    if _int_attr(cfg, "head_dim") is not None:
        cfg.head_dim = head_dim
    for name in _FFN_FIELDS:
        if _int_attr(cfg, name) is not None:
            setattr(cfg, name, 2 * hidden)
    _shrink_rope_factors(cfg, int(head_dim * factor) // 2)
    vocab = _int_attr(cfg, "vocab_size")
    if vocab is not None and vocab > TWIN_VOCAB:
        cfg.vocab_size = TWIN_VOCAB
        _remap_token_ids(cfg, TWIN_VOCAB)
    return cfg


def _shrink_rope_factors(cfg, half_rotary: int) -> None:
    """Per-frequency rope factors (Phi-3's longrope short_factor / long_factor) have one entry per rotary pair."""
    for attr in ("rope_scaling", "rope_parameters"):
        value = getattr(cfg, attr, None)
        if not isinstance(value, dict):
            continue
        # transformers 5 may key rope parameters by layer type; both shapes hold the factor lists in a dict
        for params in [value, *(v for v in value.values() if isinstance(v, dict))]:
            for key in ("short_factor", "long_factor"):
                if isinstance(params.get(key), list):
                    params[key] = params[key][:half_rotary]


def _int_attr(cfg, name: str) -> int | None:
    value = getattr(cfg, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _remap_token_ids(cfg, vocab: int) -> None:
    """Special token ids past the twin's vocab move to the lowest ids (a synthetic batch never uses those)."""
    names = [k for k in cfg.to_dict() if k.endswith("_token_id") or k.endswith("_token_ids")]
    mapping: dict[int, int] = {}

    def new(i):
        if not isinstance(i, int) or isinstance(i, bool) or i < vocab:
            return i
        return mapping.setdefault(i, len(mapping) % vocab)

    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, list):
            setattr(cfg, name, [new(i) for i in value])
        elif isinstance(value, int):
            setattr(cfg, name, new(value))


def _causal_lm(config, *, trust_remote_code: bool, dtype=None):
    from transformers import AutoModelForCausalLM

    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    # from_config writes the dtype it used into the config: keep the caller's as the file had it
    return AutoModelForCausalLM.from_config(copy.deepcopy(config), **kwargs)


def full_size(config, *, trust_remote_code: bool = False):
    """The full-size model on the meta device: its parameter names, shapes and modules, without memory."""
    import torch

    try:
        with torch.device("meta"):
            model = _causal_lm(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except Exception as exc:
        raise GradflowError(f"cannot build a causal LM from {type(config).__name__}: {_first_line(exc)}",
                            "A dry run supports configs that AutoModelForCausalLM.from_config accepts") from exc
    return model


def _load_dtype(config, kind: str, opts):
    """The dtype the real load would give the weights: --dtype, else what presets / from_pretrained default to."""
    import torch
    import transformers

    chosen = resolve_dtype(opts.dtype)
    if chosen is not None:
        return chosen
    # from_pretrained's default is dtype="auto" (the config's) on transformers 5, float32 before; presets float32
    if kind == "preset" or int(transformers.__version__.split(".")[0]) < 5:
        return torch.float32
    own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(own, str):
        own = getattr(torch, own, None)
    return own if isinstance(own, torch.dtype) else torch.float32


def build_twin(spec: str, opts) -> tuple[Twin, Any]:
    """The real config, its meta-device full size, and the toy-width twin loaded as the real model would be."""
    import torch

    config, kind = load_config(spec, trust_remote_code=opts.trust_remote_code)
    full = full_size(config, trust_remote_code=opts.trust_remote_code)
    rank = resolved_lora(opts.lora_r, opts.lora_alpha, opts.lora_targets)[0]
    full_hidden = _int_attr(config, "hidden_size")
    if full_hidden is not None and rank > full_hidden:  # the real run's error, before the twin's width hides it
        raise GradflowError(f"--lora-r {rank} is larger than the model's hidden size ({full_hidden}, from its config)",
                            f"Pass --lora-r {full_hidden} or less")
    twin_config = shrink_config(config, min_hidden=rank)

    device = resolve_device(opts.device)
    dtype = _load_dtype(config, kind, opts)
    torch.manual_seed(opts.seed)
    try:
        if opts.quant == "none":
            with torch.device(device):
                model = _causal_lm(twin_config, trust_remote_code=opts.trust_remote_code, dtype=dtype)
        else:  # bitsandbytes quantizes while loading: the twin takes the real load path through a temp dir
            base = _causal_lm(twin_config, trust_remote_code=opts.trust_remote_code, dtype=torch.float32)
            with tempfile.TemporaryDirectory(prefix="gradflow-dryrun-") as tmp, _no_progress_bars():
                base.save_pretrained(tmp)
                del base
                _keep_config_dtype(tmp, config, kind)
                asked = resolve_dtype(opts.dtype)  # as recipe's load: only --dtype is passed on
                model = _from_pretrained(tmp, opts, device, asked, _quant_config(opts.quant, asked or torch.float32))
    except GradflowError:
        raise
    except Exception as exc:
        raise GradflowError(f"cannot build a toy-width twin of {type(config).__name__}: {type(exc).__name__}: "
                            f"{_first_line(exc)}", "Run without --dry-run on a machine that holds the weights") from exc
    if model.generation_config is not None and getattr(twin_config, "pad_token_id", None) is not None:
        model.generation_config.pad_token_id = twin_config.pad_token_id
    _check_same_tree(full, model)
    twin = Twin(config=config, twin_config=twin_config, kind=kind, source=spec,
                full_numel={n: p.numel() for n, p in full.named_parameters()},
                full_modules=dict(full.named_modules()))
    return twin, model


def _keep_config_dtype(folder: str, config, kind: str) -> None:
    """save_pretrained wrote the twin's float32; the real config's dtype is what from_pretrained would read."""
    if kind == "preset":
        return
    own = config.to_dict()
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as fh:
        saved = json.load(fh)
    for key in ("dtype", "torch_dtype"):
        if key in saved or key in own:
            saved[key] = own.get("dtype", own.get("torch_dtype"))
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(saved, fh)


def _check_same_tree(full, twin) -> None:
    """The twin is sound only with the full model's class, module tree and parameter names."""
    if type(full) is not type(twin):
        raise GradflowError(f"the toy-width twin is a {type(twin).__name__}, the config builds a {type(full).__name__}",
                            "Run without --dry-run on a machine that holds the weights")
    full_names = {n for n, _ in full.named_parameters()}
    twin_names = {n for n, _ in twin.named_parameters()}
    # a quantized twin keeps the same names; only an architecture whose tree depends on width would differ
    if full_names != twin_names or [n for n, _ in full.named_modules()] != [n for n, _ in twin.named_modules()]:
        odd = sorted(full_names ^ twin_names)[:1] or ["(module order)"]
        raise GradflowError(f"the toy-width twin of {type(full).__name__} has a different module tree ({odd[0]}), "
                            "so a dry run would not be faithful", "Run without --dry-run on a machine that holds the "
                            "weights")


def full_numel(name: str, twin_shape, twin: Twin) -> int | None:
    """The numel of twin parameter `name` in the full-size model, or None when it cannot be mapped."""
    segments = name.split(".")
    if segments[:2] == ["base_model", "model"]:  # a PeftModel's prefix
        segments = segments[2:]
    for i, seg in enumerate(segments):
        if seg in _LORA_SEGMENTS:
            return _adapter_numel(".".join(segments[:i]), seg, twin_shape, twin)
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
    return twin.full_numel.get(".".join(out))


def _adapter_numel(owner: str, kind: str, twin_shape, twin: Twin) -> int | None:
    """A LoRA weight's full size: its rank (the twin's) times the full base layer's in or out features."""
    owner = ".".join(s for s in owner.split(".") if s != "base_layer")
    base = twin.full_modules.get(owner)
    if base is None:
        return None
    dims = _in_out(base)
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


def _in_out(module) -> tuple[int, int] | None:
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if hasattr(module, "num_embeddings"):
        return int(module.num_embeddings), int(module.embedding_dim)
    if type(module).__name__ == "Conv1D":  # GPT-2: weight is (in, out)
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1}


def _meta_adapted_numel(twin: Twin, opts) -> dict[str, int]:
    """Parameter sizes of the full model with the same LoRA, built on the meta device: the slow, general way, for
    adapter weights whose shape the base layer alone does not give (e.g. LoRA on fused MoE expert parameters)."""
    import torch

    rank, alpha, targets = resolved_lora(opts.lora_r, opts.lora_alpha, opts.lora_targets)
    if rank <= 0 or opts.adapter is not None:
        return {}
    model = full_size(twin.config, trust_remote_code=opts.trust_remote_code)
    with torch.device("meta"):
        model = apply_lora(model, rank, alpha, targets)
    return {n: p.numel() for n, p in model.named_parameters()}


def to_full_size(snap, twin: Twin, shapes: dict[str, tuple], opts) -> dict:
    """Put the full model's parameter counts into `snap` (params and module roll-ups); returns the size summary."""
    unmapped = []
    weight_bytes = 0.0
    full = {p.name: full_numel(p.name, shapes.get(p.name, ()), twin) for p in snap.params}
    if any(n is None for n in full.values()):
        adapted = _meta_adapted_numel(twin, opts)
        full = {name: adapted.get(name) if n is None else n for name, n in full.items()}
    for p in snap.params:
        n = full[p.name]
        if n is None:
            unmapped.append(p.name)
        else:
            p.numel = n
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


def twin_shape(cfg) -> dict:
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "vocab_size")
    return {k: getattr(cfg, k) for k in keys if _int_attr(cfg, k) is not None}
