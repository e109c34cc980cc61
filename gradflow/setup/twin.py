"""A toy-width twin of a real config, for the dry run: the same architecture class built from the same config, with
the same module tree, parameter names and layer count, at toy width (few heads of a few dimensions, the same
query/key-value grouping, a small MLP and vocab, 2 experts per MoE layer, toy-width vision towers), random init.
Parameter counts and bytes come from the full-size config, built on the meta device (no memory, no weights), with
the real expert count and names restored (gradflow.setup.twin_size, twin_experts). gradflow.dryrun probes the twin
and judges the result.
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
from gradflow.setup.build import (_from_pretrained, _no_progress_bars, _quant_config, read_json, resolve_device,
                                  resolve_dtype)
from gradflow.setup.options import resolved_lora
from gradflow.setup.presets import preset_config
from gradflow.setup.sources import Kind, _first_line, names_code, resolve
from gradflow.setup.twin_experts import TWIN_EXPERTS, expert_count, with_experts
from gradflow.setup.twin_size import FullSize, causal_lm, measure

TWIN_VOCAB = 256
_TOWERS = ("vision_config", "audio_config")  # a multimodal config's encoders, shrunk like the text model
_HEAD_DIMS = range(4, 130, 2)
# per-layer widths that scale with the hidden size: set to a small multiple of the twin's hidden size
_FFN_FIELDS = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "ffn_dim",
               "n_inner", "decoder_ffn_dim", "encoder_ffn_dim")


@dataclasses.dataclass
class Twin:
    """A config and its toy-width twin: what the dry run builds and what it reports."""

    config: Any  # the real config
    twin_config: Any
    kind: Kind  # PRESET, DIR, CONFIG or HUB
    source: str
    size: FullSize  # the real model's parameter counts and LoRA shapes, keyed by the twin's names


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
    """The toy-width twin's config: same class and layer count; few heads of a few dims, small MLP and vocab, at most
    TWIN_EXPERTS experts per layer; a multimodal config's text and vision towers both at toy width."""
    many = (expert_count(config) or 0) > TWIN_EXPERTS
    cfg = with_experts(config, TWIN_EXPERTS) if many else copy.deepcopy(config)
    text = _text(cfg)
    _shrink_widths(text, min_hidden, type(config).__name__)
    for name in _TOWERS:
        tower = getattr(cfg, name, None)
        if tower is not None and tower is not text and _int_attr(tower, "hidden_size"):
            _shrink_widths(tower, min_hidden, type(config).__name__)
    vocab = _int_attr(text, "vocab_size")
    if vocab is not None and vocab > TWIN_VOCAB:
        text.vocab_size = TWIN_VOCAB
        for c in {id(cfg): cfg, id(text): text}.values():
            _remap_token_ids(c, TWIN_VOCAB)
    return cfg


def _text(cfg):
    """The config that holds the language model's widths: `cfg`, or a multimodal config's text_config."""
    text = getattr(cfg, "text_config", None)
    return text if _int_attr(cfg, "hidden_size") is None and text is not None else cfg


def _shrink_widths(cfg, min_hidden: int, what: str) -> None:
    n_q = _int_attr(cfg, "num_attention_heads")
    if n_q is None or _int_attr(cfg, "hidden_size") is None:
        raise GradflowError(f"{what} has no hidden_size / num_attention_heads to shrink",
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
    if _int_attr(cfg, "kv_lora_rank") is not None:  # DeepSeek's multi-head latent attention
        for name in ("q_lora_rank", "kv_lora_rank"):
            if _int_attr(cfg, name) is not None:
                setattr(cfg, name, hidden)
        for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            setattr(cfg, name, head_dim)
        if _int_attr(cfg, "qk_head_dim") is not None:
            cfg.qk_head_dim = 2 * head_dim
    _shrink_rope_factors(cfg, int(head_dim * factor) // 2)


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
    names = [k for k in cfg.to_dict() if k.endswith(("_token_id", "_token_ids", "_token_index"))]
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
    size = measure(config, trust_remote_code=opts.trust_remote_code)
    rank = resolved_lora(opts.lora_r, opts.lora_alpha, opts.lora_targets)[0]
    full_hidden = _int_attr(_text(config), "hidden_size")
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
                model = causal_lm(twin_config, trust_remote_code=opts.trust_remote_code, dtype=dtype)
        else:  # bitsandbytes quantizes while loading: the twin takes the real load path through a temp dir
            base = causal_lm(twin_config, trust_remote_code=opts.trust_remote_code, dtype=torch.float32)
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
    _check_same_tree(size.model, model)
    size.model = None  # the names are checked; the sizes are kept
    twin = Twin(config=config, twin_config=twin_config, kind=kind, source=spec, size=size)
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


def twin_shape(cfg) -> dict:
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "moe_intermediate_size", "vocab_size")
    text = _text(cfg)
    shape = {k: getattr(text, k) for k in keys if _int_attr(text, k) is not None}
    if expert_count(cfg):
        shape["experts"] = expert_count(cfg)
    for name in _TOWERS:
        tower = getattr(cfg, name, None)
        if tower is not None and _int_attr(tower, "hidden_size"):
            shape[name.replace("_config", "_hidden_size")] = tower.hidden_size
    return shape
