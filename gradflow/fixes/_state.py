"""Capture and restore what fixes touch, so a patch that makes things worse can be rolled back."""

from __future__ import annotations

from collections.abc import Mapping

import copy

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")
_GC_ATTRS = ("gradient_checkpointing", "_gradient_checkpointing_func")
_MISSING = object()


class ModelState:
    """Hooks, child modules, checkpointing flags, parameter data/requires_grad and adapter configs of a model.

    Parameter data is held by reference (a dtype cast swaps `.data`, so the old tensor is the backup): no copy of
    the weights is made.
    """

    def __init__(self, model, batch=None):
        self.model = model
        self.modules = []
        for module in model.modules():
            hooks = {k: dict(getattr(module, k)) for k in _HOOK_DICTS if hasattr(module, k)}
            attrs = {k: module.__dict__.get(k, _MISSING) for k in _GC_ATTRS}
            self.modules.append((module, hooks, dict(module._modules), attrs))
        self.params = [(p, p.data, p.requires_grad) for p in model.parameters()]
        self.peft_config = copy.deepcopy(dict(getattr(model, "peft_config", {}) or {}))
        config = getattr(model, "config", None)
        self.use_cache = getattr(config, "use_cache", _MISSING) if config is not None else _MISSING
        self.batch = dict(batch) if isinstance(batch, Mapping) else None
        self.batch_obj = batch

    def restore(self) -> None:
        for module, hooks, children, attrs in self.modules:
            for key, saved in hooks.items():
                live = getattr(module, key)
                live.clear()
                live.update(saved)
            module._modules.clear()
            module._modules.update(children)
            for key, value in attrs.items():
                if value is _MISSING:
                    module.__dict__.pop(key, None)
                else:
                    module.__dict__[key] = value
        for p, data, flag in self.params:
            if p.data is not data:
                p.data = data
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        if self.peft_config:
            live = self.model.peft_config
            for name, cfg in self.peft_config.items():
                live[name] = cfg
        config = getattr(self.model, "config", None)
        if config is not None and self.use_cache is not _MISSING:
            config.use_cache = self.use_cache
        if self.batch is not None:
            self.batch_obj.clear()
            self.batch_obj.update(self.batch)

