"""Predicates over models, in one place: is it a PeftModel, is a module a checkpointed layer, which layer a name is
in, and how gradflow marks the hooks its fixes install. No torch import at module level."""

from __future__ import annotations

import re
import sys
from typing import Any

# a numbered block in a name: 'model.layers.3', 'transformer.h.0', 'encoder.layer.11', 'blocks.2'
LAYER = re.compile(r"^(?P<prefix>.*?(?:^|\.)(?:layers|h|blocks|layer))\.(?P<index>\d+)(?=\.|$)")
# the wrappers PEFT and DDP put in front of a transformers model's own names
_WRAPPER_PREFIX = re.compile(r"^(?:module\.)?(?:base_model\.model\.)?(?:model\.)?")


def is_peft_model(model) -> bool:
    """A PeftModel (or a subclass): it wraps a base model that `get_base_model()` returns."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def has_adapter_config(module) -> bool:
    """A module that carries PEFT adapter configs: a PeftModel, or a transformers model after `load_adapter`."""
    return hasattr(module, "peft_config") and hasattr(module, "active_adapter")


def base_model(model):
    """The model inside a PeftModel, else `model` itself."""
    return model.get_base_model() if is_peft_model(model) else model


def tuner_layer_class():
    """peft's BaseTunerLayer if peft is loaded (a model holding adapters has loaded it), else None."""
    return getattr(sys.modules.get("peft.tuners.tuners_utils"), "BaseTunerLayer", None)


def is_gc_layer(module) -> bool:
    """A transformers layer that can checkpoint itself (GradientCheckpointingLayer, either stack)."""
    return any(c.__name__ == "GradientCheckpointingLayer" for c in type(module).__mro__)


def gc_mode_of(module) -> str:
    """transformers' per-module checkpointing state: off, reentrant or non-reentrant."""
    if getattr(module, "gradient_checkpointing", False) is not True:
        return "off"
    func = getattr(module, "_gradient_checkpointing_func", None)
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
