"""The training setup from options (gradflow.setup.options): LoRA, adapters, SO(8) rotations, quantization,
checkpointing, dtype and device."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import tempfile

from gradflow.errors import GradflowError
from gradflow.models import is_peft_model, set_checkpointing
from gradflow.setup import so8
from gradflow.setup.options import DEFAULT_LORA_R, DTYPES, SetupOptions, resolved_lora
from gradflow.setup.presets import build_preset, build_tokenizer
from gradflow.setup.sources import Kind, Setup, _first_line, resolve

def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GradflowError("--device cuda was asked for, but no CUDA GPU is visible", "Use --device cpu or --device auto")
    return device


def resolve_dtype(name: str | None):
    import torch

    if name is None or name == "auto":
        return None
    return getattr(torch, DTYPES[name])


def build(setup: Setup, opts: SetupOptions) -> Setup:
    """Load or adapt the model in `setup` as `opts` say, in the order careful users follow."""
    if setup.kind == Kind.TRAINER:
        return _trainer_setup(setup, opts)
    if opts.so8_layers and (setup.kind not in (Kind.PRESET, Kind.DIR, Kind.HUB) or _is_adapter_dir(setup)):
        raise GradflowError("--so8-layers needs a base model that gradflow adds LoRA to (a preset, directory or hub "
                            "id, without --adapter)", "Drop --so8-layers, or start from the base model")
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype)
    is_factory = setup.kind == Kind.FACTORY
    if setup.model is None:
        setup.model = _load(setup, opts, device, dtype)
    elif opts.quant != "none" and not _quantized(setup.model):
        # bitsandbytes quantizes while loading; a model the factory already built cannot be quantized here
        raise GradflowError(f"--quant {opts.quant} needs gradflow to load the model, but {setup.source} built it already",
                            "Quantize inside the factory (from_pretrained with a BitsAndBytesConfig), or drop --quant")
    elif _quantized(setup.model):
        pass  # quantized while loading (the dry run's twin), on the device and in the dtype asked: it cannot be cast
    elif dtype is not None or device != "cpu":
        setup.model.to(device=device, dtype=dtype) if dtype is not None else setup.model.to(device)
    model = setup.model

    if opts.quant != "none" and _quantized(model):
        from peft import prepare_model_for_kbit_training

        gc_on = opts.gc in ("reentrant", "non-reentrant")
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc_on,
            gradient_checkpointing_kwargs={"use_reentrant": opts.gc == "reentrant"} if gc_on else None)
    elif opts.gc is not None:
        set_checkpointing(model, opts.gc)

    adapter = opts.adapter or (setup.source if _is_adapter_dir(setup) else None)
    if adapter is not None:  # with the SO(8) rotations it was trained with, if any
        model = so8.load_adapter(model, adapter, is_trainable=opts.adapter_trainable)
    else:
        _no_second_adapter(setup, model, opts)
        rank, alpha, targets = resolved_lora(opts.lora_r, opts.lora_alpha, opts.lora_targets,
                                             0 if is_factory or is_peft_model(model) else DEFAULT_LORA_R)
        if opts.so8_layers:
            so8.install(model, opts.so8_layers)
        if rank > 0:
            model = apply_lora(model, rank, alpha, targets,
                               modules_to_save=[so8.MODULE_NAME] if opts.so8_layers else None)
        if opts.so8_layers:  # after PEFT wrapped o_proj, so that LoRA on o_proj sees the rotated input
            so8.attach_hooks(model)
    setup.model = model
    if opts.trainable is not None:
        setup.trainable = opts.trainable
    return setup


def _no_second_adapter(setup: Setup, model, opts: SetupOptions) -> None:
    """LoRA flags on a model that already carries PEFT adapters would wrap it in a second PeftModel, silently."""
    given = [flag for flag, value in (("--lora-r", opts.lora_r), ("--lora-alpha", opts.lora_alpha),
                                      ("--lora-targets", opts.lora_targets)) if value is not None]
    if given and is_peft_model(model):
        raise GradflowError(f"{setup.source} already gives a {type(model).__name__} with adapters, so "
                            f"{', '.join(given)} would wrap it in a second one",
                            "Drop those flags (the model's own adapters are probed), or give the base model")


def _trainer_setup(setup: Setup, opts: SetupOptions) -> Setup:
    """A Trainer brings its own model, checkpointing and adapters: setup flags would silently disagree with it."""
    given = [flag for flag, value in (("--lora-r", opts.lora_r), ("--lora-alpha", opts.lora_alpha),
                                      ("--lora-targets", opts.lora_targets), ("--adapter", opts.adapter),
                                      ("--gc", opts.gc), ("--dtype", opts.dtype),
                                      ("--so8-layers", opts.so8_layers or None)) if value is not None]
    if opts.quant != "none":
        given.append("--quant")
    if opts.device != "auto":
        given.append("--device")
    if given:
        raise GradflowError(f"{setup.source} returns a Trainer, which sets up its own model, so {', '.join(given)} "
                            "would be ignored", "Drop those flags and set them in the Trainer's script "
                            "(TrainingArguments, peft_config, from_pretrained)")
    if opts.trainable is not None:
        setup.trainable = opts.trainable
    return setup


def _load(setup: Setup, opts: SetupOptions, device: str, dtype):
    import torch

    quant_config = _quant_config(opts.quant, dtype or torch.float32)
    if setup.kind == Kind.PRESET:
        setup.tokenizer = build_tokenizer()
        if quant_config is None:
            return build_preset(setup.preset, dtype=dtype, device=device, seed=opts.seed, training=True)
        # bitsandbytes quantizes while loading, so the preset goes through a real save/load round-trip.
        base = build_preset(setup.preset, dtype=dtype or torch.float32, device=device, seed=opts.seed,
                            training=True)
        with tempfile.TemporaryDirectory(prefix="gradflow-preset-") as tmp, _no_progress_bars():
            base.save_pretrained(tmp)
            del base
            # a transformers model sits in reference cycles: `del` alone leaves the full-precision weights alive
            # (7.1 GiB at Phi-3.5-mini in bf16) until a full collection, possibly while the 4-bit copy loads
            gc.collect()
            return _from_pretrained(tmp, opts, device, dtype, quant_config)
    if _is_adapter_dir(setup):
        return _load_adapter_dir(setup, opts, device, dtype)
    if setup.kind == Kind.DIR and not os.path.isfile(os.path.join(setup.source, "config.json")):
        raise GradflowError(f"{setup.source} has no config.json or adapter_config.json",
                            "Pass a directory written by save_pretrained")
    return _from_pretrained(setup.source, opts, device, dtype, quant_config)


@contextlib.contextmanager
def _no_progress_bars():
    """The preset's internal save/load round-trip is an implementation detail: no shard/weight bars for it."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _load_adapter_dir(setup: Setup, opts: SetupOptions, device: str, dtype):
    """A PEFT adapter directory: load its base (a preset name works too), then the adapter, frozen or not."""
    config_path = os.path.join(setup.source, "adapter_config.json")
    base_id = read_json(config_path).get("base_model_name_or_path")
    if not base_id:
        raise GradflowError(f"{config_path} names no base model",
                            "Set base_model_name_or_path, or load the base and pass --adapter DIR")
    if not isinstance(base_id, str):
        raise GradflowError(f"{config_path}: base_model_name_or_path is a {type(base_id).__name__}, not a string",
                            "Set it to a preset, model directory or hub id")
    # the config is a file someone else may have written: its base never runs code without --trust-remote-code
    base_setup = resolve(base_id, trust_remote_code=opts.trust_remote_code,
                         named_in=f"{config_path} (base_model_name_or_path)")
    if _is_adapter_dir(base_setup):
        raise GradflowError(f"{config_path} names {base_id!r} as its base model, which is itself an adapter directory",
                            "Set base_model_name_or_path to the base model: a preset, model directory or hub id")
    base = _load(base_setup, opts, device, dtype) if base_setup.model is None else base_setup.model
    setup.tokenizer = base_setup.tokenizer
    return base  # build() loads the adapter itself onto it


def read_json(path: str) -> dict:
    """A JSON object from a file gradflow did not necessarily write; GradflowError when it is not one."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise GradflowError(f"{path} is not readable JSON ({_first_line(exc)})",
                            "Write it again (save_pretrained / gradflow train), or fix it by hand") from exc
    if not isinstance(data, dict):
        raise GradflowError(f"{path} holds a JSON {type(data).__name__}, not an object",
                            "Write it again (save_pretrained / gradflow train), or fix it by hand")
    return data


def _is_adapter_dir(setup: Setup) -> bool:
    return setup.kind == Kind.DIR and os.path.isfile(os.path.join(setup.source, "adapter_config.json"))


def _from_pretrained(path: str, opts: SetupOptions, device: str, dtype, quant_config):
    from transformers import AutoModelForCausalLM

    kwargs = {"trust_remote_code": opts.trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if quant_config is not None:
        kwargs["quantization_config"] = quant_config
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        first = _first_line(exc)
        if "trust_remote_code" in str(exc):
            raise GradflowError(f"{path} needs custom code: {first}",
                                "Read that code, then pass --trust-remote-code") from exc
        todo = ("Check that it holds a complete save_pretrained output (config.json and weights)"
                if os.path.isdir(path) else "Check the hub id, your network access and HF_TOKEN, or pass a local directory")
        raise GradflowError(f"could not load {path}: {first}", todo) from exc
    if quant_config is None:
        model.to(device)
    return model


def _quant_config(quant: str, compute_dtype):
    if quant == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise GradflowError(f"--quant {quant} needs bitsandbytes, which is not installed",
                            "Run: pip install 'bitsandbytes>=0.45'") from exc
    from transformers import BitsAndBytesConfig

    if quant == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def _quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def hidden_size(model) -> int | None:
    """The model's hidden size from its transformers config (GPT-2's n_embd too), or None when it has none."""
    value = getattr(getattr(model, "config", None), "hidden_size", None)
    return value if isinstance(value, int) and value > 0 else None


def linear_module_names(model) -> set[str]:
    """Last name segments of modules LoRA can target (Linear, Conv1D, bitsandbytes linears)."""
    import torch

    names = set()
    for name, module in model.named_modules():
        cls = type(module).__name__
        if isinstance(module, torch.nn.Linear) or cls in ("Conv1D", "Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return names


def apply_lora(model, rank: int, alpha: int, targets: str, modules_to_save: list[str] | None = None):
    from peft import LoraConfig, get_peft_model

    hidden = hidden_size(model)
    if hidden is not None and rank > hidden:
        # every transformer linear has the hidden size on one side, so a higher rank adds parameters, not capacity
        raise GradflowError(f"--lora-r {rank} is larger than the model's hidden size ({hidden}, from its config)",
                            f"Pass --lora-r {hidden} or less")

    if targets == "all-linear":
        target_modules = "all-linear"
    else:
        target_modules = [t.strip() for t in targets.split(",") if t.strip()]
        available = linear_module_names(model)
        missing = [t for t in target_modules if t not in available]
        if not target_modules or missing:
            raise GradflowError(f"--lora-targets {', '.join(missing) or targets!r}: no such linear module in "
                                f"{type(model).__name__}", f"Use all-linear or some of: {', '.join(sorted(available))}")
    # a plain nn.Module (from a factory) is neither a causal LM nor a PreTrainedModel, which PEFT's "all-linear" needs
    causal_lm = hasattr(model, "prepare_inputs_for_generation")
    if not causal_lm and target_modules == "all-linear":
        target_modules = sorted(linear_module_names(model))
        if not target_modules:
            raise GradflowError(f"--lora-r {rank}: {type(model).__name__} has no linear layer for LoRA",
                                "Use --lora-r 0, or add LoRA inside the factory")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0,
                        task_type="CAUSAL_LM" if causal_lm else None, modules_to_save=modules_to_save)
    return get_peft_model(model, config)
