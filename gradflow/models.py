"""Predicates over models, in one place: is it a PeftModel, is a module a checkpointed layer, which modules are the
decoder layers, which layer a name is in, the model under its training wrappers, and how gradflow marks the hooks its
fixes install; and transformers' checkpointing switch. No torch import at module level."""

from __future__ import annotations

import re
import sys
from typing import Any

from gradflow.errors import GradflowError

# a numbered block in a name: 'model.layers.3', 'transformer.h.0', 'encoder.layer.11', 'blocks.2'
LAYER = re.compile(r"^(?P<prefix>.*?(?:^|\.)(?:layers|h|blocks|layer))\.(?P<index>\d+)(?=\.|$)")
# the wrappers PEFT and DDP put in front of a transformers model's own names
_WRAPPER_PREFIX = re.compile(r"^(?:module\.)?(?:base_model\.model\.)?(?:model\.)?")


def plain_attr(module, name: str, default: Any = None) -> Any:
    """`getattr(module, name, default)` for an attribute that is not a parameter, buffer or submodule. A miss in
    nn.Module.__getattr__ formats an error message (microseconds a module); the probe asks every module of a
    model each time, so an attribute neither on the instance nor anywhere on its class is answered without it."""
    found = module.__dict__.get(name, _ABSENT)
    if found is not _ABSENT:
        return found
    return getattr(module, name, default) if hasattr(type(module), name) else default


_ABSENT = object()


def is_peft_model(model) -> bool:
    """A PeftModel (or a subclass): it wraps a base model that `get_base_model()` returns."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def has_adapter_config(module) -> bool:
    """A module that carries PEFT adapter configs: a PeftModel, or a transformers model after `load_adapter`."""
    return plain_attr(module, "peft_config", _ABSENT) is not _ABSENT and \
        plain_attr(module, "active_adapter", _ABSENT) is not _ABSENT


def base_model(model):
    """The model inside a PeftModel, else `model` itself."""
    return model.get_base_model() if is_peft_model(model) else model


def tuner_layer_class():
    """peft's BaseTunerLayer if peft is loaded (a model holding adapters has loaded it), else None."""
    return getattr(sys.modules.get("peft.tuners.tuners_utils"), "BaseTunerLayer", None)


def tuner_entries(name: str, module, declared: str = "adapter_layer_names"):
    """(path, adapter name) of each entry a PEFT tuner layer at `name` keeps under the attributes its class declares
    in `declared`: "adapter_layer_names", its adapter weights (lora_A, ia3_l, vera_lambda_b, lora_E ...), or
    "other_param_names", the rest, which PEFT does not train (AdaLoRA's ranknum, VeRA's shared vera_A / vera_B)."""
    for attr in getattr(module, declared, ()):
        container = getattr(module, attr, None)
        for key in (container.keys() if hasattr(container, "keys") else ()):
            yield (f"{name}.{attr}.{key}" if name else f"{attr}.{key}"), key


def untrained_tuner_params(named_modules) -> set[str]:
    """Paths (a parameter's, or a container's above it) that PEFT's tuner layers hold without training them: their
    other_param_names (AdaLoRA's ranknum, frozen by PEFT on purpose), as opposed to their adapter weights."""
    tuner_cls = tuner_layer_class()
    if tuner_cls is None:
        return set()
    return {path for name, module in named_modules if isinstance(module, tuner_cls)
            for path, _ in tuner_entries(name, module, "other_param_names")}


def within(name: str, paths: set) -> bool:
    """`name` is one of `paths` or sits below one."""
    while paths:
        if name in paths:
            return True
        if "." not in name:
            return False
        name = name.rsplit(".", 1)[0]
    return False


def adapters_disabled(model) -> bool:
    """PEFT's adapters are off now (`with model.disable_adapter():`, `disable_adapter_layers()`): PEFT then sets their
    weights' requires_grad off too, until it enables them again."""
    tuner = tuner_layer_class()
    return tuner is not None and any(isinstance(m, tuner) and plain_attr(m, "_disable_adapters", False) is True
                                     for m in model.modules())


_GC_LAYER_CLASSES: dict[type, bool] = {}


def is_gc_layer(module) -> bool:
    """A transformers layer that can checkpoint itself (GradientCheckpointingLayer, either stack)."""
    cls = type(module)
    found = _GC_LAYER_CLASSES.get(cls)
    if found is None:
        found = _GC_LAYER_CLASSES[cls] = any(c.__name__ == "GradientCheckpointingLayer" for c in cls.__mro__)
    return found


def decoder_layers(model, *, checkpointable: bool = False) -> list:
    """The decoder layers of `model` (its repeated blocks), in model order.

    transformers' layers (GradientCheckpointingLayer, either stack) wherever the model has any. A model without
    them: with `checkpointable`, none; else the members that hold parameters of each outermost ModuleList of more
    than one module (any model's block list, not the experts list inside a block).

    `checkpointable` is for checkpointing and compiling, which act on the per-layer switch only transformers' layers
    read (a block of one's own model has no `gradient_checkpointing` to set); FSDP units and the FSDP layer classes
    take any model's blocks.
    """
    layers = [m for m in model.modules() if is_gc_layer(m)]
    if layers or checkpointable:
        return layers
    import torch

    lists: list = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 \
                and not any(module is m for outer in lists for m in outer.modules()):
            lists.append(module)
    return [layer for blocks in lists for layer in blocks if any(True for _ in layer.parameters())]


# the classes whose `.module` is the model they train (accelerate's extract_model_from_parallel unwraps the same)
_WRAPPERS = frozenset({"DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine"})


def unwrap(model):
    """The model under its training wrappers, however deep: DDP, DataParallel, FSDP1 and DeepSpeed's engine (and any
    module whose one child is `.module`, with no parameters or buffers of its own), and torch.compile's `_orig_mod`;
    anything else as it is."""
    import torch

    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and _is_wrapper(model):
            inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _is_wrapper(module) -> bool:
    if any(c.__name__ in _WRAPPERS for c in type(module).__mro__):
        return True
    children = getattr(module, "_modules", None)
    return (children is not None and list(children) == ["module"] and not getattr(module, "_parameters", None)
            and not getattr(module, "_buffers", None))


def gc_mode_of(module) -> str:
    """transformers' per-module checkpointing state: off, reentrant or non-reentrant."""
    if plain_attr(module, "gradient_checkpointing", False) is not True:
        return "off"
    func = plain_attr(module, "_gradient_checkpointing_func")
    keywords = getattr(func, "keywords", None) or {}
    # torch falls back to reentrant when use_reentrant is not given (with a warning).
    return "non-reentrant" if keywords.get("use_reentrant", True) is False else "reentrant"


def layer_index(name: str) -> int | None:
    """The block number in a module or parameter name ('model.layers.3.mlp' -> 3), or None."""
    match = LAYER.match(name)
    return int(match.group("index")) if match else None


def layer_key(name: str) -> str:
    """Group a parameter name into its layer: 'layers.3', 'h.0', or the top-level module ('lm_head')."""
    bare = _WRAPPER_PREFIX.sub("", name)
    match = LAYER.match(bare)
    if match:
        return f"{match.group('prefix').rsplit('.', 1)[-1]}.{match.group('index')}"
    return bare.split(".")[0] if "." in bare else bare


_INPUT_GRAD_HOOK = re.compile(r"inputs?_require_grads?")


def is_input_grad_hook(name: str) -> bool:
    """transformers' `make_inputs_require_grads` (from enable_input_require_grads) or gradflow's own, by name:
    transformers' hook is a closure with nothing else to recognise it by."""
    return bool(_INPUT_GRAD_HOOK.search(name))


# gradflow's fix hooks carry this attribute (the hook's kind), so a second patch recognises them whatever
# their function is called; the tracer's own, invisible hooks carry `_gradflow` instead
_FIX_MARK = "_gradflow_fix"


def mark_hook(fn, kind: str):
    """Mark `fn` as gradflow's fix hook of `kind`; returns `fn`."""
    setattr(fn, _FIX_MARK, kind)
    return fn


def has_hook(hooks: dict, kind: str) -> bool:
    """Whether a module's hook dict (`_forward_hooks`, `_forward_pre_hooks`) holds gradflow's hook of `kind`."""
    return any(getattr(h, _FIX_MARK, None) == kind for h in hooks.values())


def transformers_model(model):
    """The transformers PreTrainedModel inside `model` (PEFT wraps it), or None."""
    target = model.get_base_model() if is_peft_model(model) else model
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return target if isinstance(target, PreTrainedModel) else None


def is_trainer(obj: Any) -> bool:
    """Whether `obj` is a transformers Trainer (any subclass); never imports transformers itself."""
    if "transformers" not in sys.modules:
        return False  # nothing can be a Trainer before transformers is imported
    from transformers import Trainer

    return isinstance(obj, Trainer)


def set_checkpointing(model, mode: str) -> None:
    """Turn transformers' gradient checkpointing off, reentrant or non-reentrant, on either stack."""
    target = model.get_base_model() if is_peft_model(model) else model
    if not hasattr(target, "gradient_checkpointing_enable"):
        if mode == "off":
            return
        raise GradflowError(f"--gc {mode}: {type(target).__name__} is not a transformers model with checkpointing",
                            "Use --gc off, or checkpoint inside your factory")
    if mode == "off":
        disable = getattr(target, "activation_checkpointing_disable", None) or target.gradient_checkpointing_disable
        disable()
        return
    kwargs = {"use_reentrant": mode == "reentrant"}
    enable = getattr(target, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.x; gradient_checkpointing_enable is a deprecated alias there
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
