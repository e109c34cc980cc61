"""Static description of a model: parameters, per-module counts, hooks and checkpointing. Runs nothing."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from gradflow.models import (gc_mode_of, has_adapter_config, is_gc_layer, is_input_grad_hook, plain_attr,
                             tuner_entries, tuner_layer_class, untrained_tuner_params, within)
from gradflow.setup.wrappers import fsdp_units
from gradflow.snapshot import ModuleState, ParamState, Snapshot, ancestors, count_into_ancestors

_QUANT_PARAM_CLASSES = ("Params4bit", "Int8Params")
_QUANT_MODULE_CLASSES = {"Linear4bit": "4bit", "Linear8bitLt": "8bit"}


def hook_names(module) -> tuple[str, ...]:
    """Names of the user-visible forward hooks on `module` (pre-hooks prefixed 'pre:')."""
    names = []
    for hook in getattr(module, "_forward_pre_hooks", {}).values():
        if not getattr(hook, "_gradflow", False):
            names.append("pre:" + _callable_name(hook))
    for hook in getattr(module, "_forward_hooks", {}).values():
        if not getattr(hook, "_gradflow", False):
            names.append(_callable_name(hook))
    return tuple(names)


def _callable_name(fn) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial
    return getattr(fn, "__name__", type(fn).__name__)


def active_adapters(model, module_names: dict) -> tuple[str, ...]:
    """The adapters active now (module_names: module -> name, as the probe walked them)."""
    return _adapters(model, [(n, m) for m, n in module_names.items()])[2]


def _adapters(model, modules):
    """(source, names, active, {weight prefix: adapter}) of the PEFT adapters in `model`.

    Adapters are found by PEFT's tuner layers (lora_A / lora_B / ... under each adapter name), not by the wrapper
    class, so those that transformers' integration (`load_adapter`, `add_adapter`, `from_pretrained` of an adapter
    dir) or `peft.inject_adapter_in_model` put into a plain model count as well.
    """
    tuner_cls = tuner_layer_class()
    wrapper = None
    hf_loaded = False
    prefixes: dict[str, str] = {}
    found: list[str] = []
    tuner_active: list[str] = []
    for name, module in modules:
        if wrapper is None and has_adapter_config(module):
            wrapper = module  # the outermost PeftModel (under a DDP wrapper too)
        hf_loaded = hf_loaded or plain_attr(module, "_hf_peft_config_loaded", False) is True
        if tuner_cls is None or not isinstance(module, tuner_cls):
            continue
        for path, key in tuner_entries(name, module):
            prefixes[path] = key
            found.append(key)
        try:
            tuner_active.extend(module.active_adapters)
        except (AttributeError, TypeError):  # a tuner layer of an older PEFT
            pass
    if wrapper is not None:
        names = tuple(getattr(wrapper, "peft_config", {}) or ())
        active = getattr(wrapper, "active_adapters", None)
        if callable(active):
            active = active()
        return "peft", names, tuple(active or [wrapper.active_adapter]), prefixes
    config = getattr(model, "peft_config", None)
    if not prefixes and not isinstance(config, dict):
        return None, (), (), prefixes
    # transformers' own active_adapters() refuses PEFT < 0.22 on 5.x: the tuner layers say which are active
    names = tuple(dict.fromkeys([*(config or {}), *found]))
    active = tuple(dict.fromkeys(tuner_active)) or names
    return ("transformers" if hf_loaded else "injected"), names, active, prefixes


def _adapter_of(name: str, prefixes: dict[str, str]) -> str | None:
    """The adapter whose tuner-layer weight `name` is, or None."""
    while name:
        if name in prefixes:
            return prefixes[name]
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return None


def _is_inference(p) -> bool:
    """Made under torch.inference_mode; still true after `p.data = p.data.clone()`, which keeps no version counter."""
    if p.is_inference():
        return True
    try:
        p._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        return True
    return False


def _ddp(modules):
    """(find_unused_parameters, static_graph) of the outermost DistributedDataParallel in `modules`, else None."""
    import torch

    ddp_cls = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    for _, module in modules:
        if ddp_cls is not None and isinstance(module, ddp_cls):
            return bool(getattr(module, "find_unused_parameters", False)), bool(getattr(module, "static_graph", False))
    return None


@dataclasses.dataclass
class Live:
    """The live objects behind a Snapshot, private to the probe: rules and reports see only the plain data."""

    module_names: dict  # module object -> its path, for the tracer
    params: list  # (name, Parameter) in named_parameters() order, shared parameters once


def describe(model, *, trainable: str | None = None, optimizer=None) -> tuple[Snapshot, Live]:
    """Parameters and modules of `model` as plain data (no forward), and the live objects the probe needs."""
    module_list = list(model.named_modules())
    source, adapters, active, tuner_prefixes = _adapters(model, module_list)
    ddp = _ddp(module_list)
    embed_ids = _embedding_ids(model, module_list)
    modules, names = _module_states(module_list)
    index = {m.name: m for m in modules}
    param_objects = _parameters(names)
    facts = _ParamFacts(adapters, tuner_prefixes, source, embed_ids, trainable, optimizer, _holders(names),
                        untrained_tuner_params(module_list))
    params = [facts.state(name, p) for name, p in param_objects]
    dtypes: dict[str, set] = {}
    for state in params:  # the counts and dtypes, rolled up to every ancestor module
        count_into_ancestors(index, state)
        for prefix in ancestors(state.module):
            if prefix in index:
                dtypes.setdefault(prefix, set()).add(state.dtype)
    for name, ds in dtypes.items():
        index[name].dtypes = tuple(sorted(ds))
    gc_modes = [m.gc for (_, module), m in zip(module_list, modules) if m.gc != "off" and is_gc_layer(module)]
    quant = [_QUANT_MODULE_CLASSES[m.cls] for m in modules if m.cls in _QUANT_MODULE_CLASSES]
    config = getattr(model, "config", None)
    snap = Snapshot(
        model_class=type(model).__name__, params=params, modules=modules, is_peft=source is not None,
        adapter_names=adapters, active_adapters=tuple(active), adapter_source=source,
        quantized=quant[-1] if quant else "none",
        input_grad_hook=any(is_input_grad_hook(h) for m in modules for h in m.hooks),
        gc_mode=gc_modes[0] if gc_modes else "off",
        use_cache=getattr(config, "use_cache", None) if config is not None else None,
        trainable_regex=trainable, optimizer_given=optimizer is not None,
        ddp_find_unused=ddp[0] if ddp else None, ddp_static_graph=ddp[1] if ddp else None,
        wrappers=fsdp_units(module_list, [n for n, _ in param_objects]),
    )
    return snap, Live(module_names=names, params=param_objects)


def _embedding_ids(model, module_list) -> set[int]:
    """The ids of the input and output embedding weights, and of every nn.Embedding's."""
    import torch

    ids = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            emb = getattr(model, getter)() if hasattr(model, getter) else None
        except (NotImplementedError, AttributeError):
            emb = None
        if emb is not None and hasattr(emb, "weight"):
            ids.add(id(emb.weight))
    ids.update(id(m.weight) for _, m in module_list if isinstance(m, torch.nn.Embedding) and hasattr(m, "weight"))
    return ids


def _module_states(module_list) -> tuple[list[ModuleState], dict]:
    """A ModuleState per module, and module object -> its path."""
    names, modules = {}, []
    for name, module in module_list:
        names[module] = name
        modules.append(ModuleState(name=name, cls=type(module).__name__,
                                   depth=0 if not name else name.count(".") + 1, hooks=hook_names(module),
                                   gc=gc_mode_of(module)))
    return modules, names


def _parameters(names: dict) -> list[tuple[str, Any]]:
    """(name, Parameter) in named_parameters() order, shared parameters once: one walk over the modules already
    listed, rather than a second recursive named_parameters()."""
    out, seen = [], set()
    for module, mname in names.items():
        for pname, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            out.append((f"{mname}.{pname}" if mname else pname, p))
    return out


def _holders(names: dict) -> dict[str, str]:
    """Path of each nn.ParameterDict / nn.ParameterList -> the module that holds it. A container is never called
    (IA3's ia3_l, VeRA's vera_lambda_*, AdaLoRA's lora_E, LoRA's lora_embedding_A/B): its parameters run, are cut
    and go unused with the module whose forward reads them, so that module is theirs."""
    import torch

    kinds = (torch.nn.ParameterDict, torch.nn.ParameterList)
    containers = {path for module, path in names.items() if isinstance(module, kinds)}
    out = {}
    for path in containers:
        holder = path
        while holder in containers:
            holder = holder.rsplit(".", 1)[0] if "." in holder else ""
        out[path] = holder
    return out


@dataclasses.dataclass
class _ParamFacts:
    """What a parameter's state is judged against: the adapters, the embeddings, the intent and the optimizer."""

    adapters: tuple
    tuner_prefixes: Any
    source: str | None
    embed_ids: set
    trainable: str | None
    optimizer: Any
    holders: dict  # a parameter container's path -> the module that holds it (_holders)
    untrained: set  # what PEFT's tuner layers hold and do not train (other_param_names: AdaLoRA's ranknum)

    def __post_init__(self):
        self.intended_re = re.compile(self.trainable) if self.trainable else None
        self.in_opt = None if self.optimizer is None else {
            id(p) for group in self.optimizer.param_groups for p in group["params"]}

    def state(self, name: str, p) -> ParamState:
        import torch

        segments = name.split(".")
        in_adapter = any(a in segments for a in self.adapters)
        module = name.rsplit(".", 1)[0] if "." in name else ""
        return ParamState(
            name=name, module=self.holders.get(module, module), numel=_numel(p),
            dtype=str(p.dtype).replace("torch.", ""), requires_grad=bool(p.requires_grad),
            quantized=type(p).__name__ in _QUANT_PARAM_CLASSES or p.dtype in (torch.uint8, torch.int8),
            # PEFT's own declaration first (adapter_layer_names); else any weight under an adapter's name that
            # PEFT neither keeps frozen on purpose (other_param_names) nor copies (modules_to_save)
            adapter=(_adapter_of(name, self.tuner_prefixes) is not None
                     or (in_adapter and "modules_to_save" not in segments
                         and not within(name, self.untrained))),
            # a PeftModel's and transformers' save_pretrained keep the adapters' weights only; after
            # inject_adapter_in_model the saving is the user's own code
            saved=in_adapter if self.source in ("peft", "transformers") else None,
            embedding=id(p) in self.embed_ids,
            inference=_is_inference(p),
            # PEFT's frozen original behind a modules_to_save copy is not what anyone trains
            intended=((bool(self.intended_re.search(name)) and "original_module" not in segments)
                      if self.intended_re else None),
            in_optimizer=(id(p) in self.in_opt) if self.in_opt is not None else None,
        )


def _numel(p) -> int:
    # bitsandbytes packs two 4-bit values per byte; report the logical count when it is known
    quant_state = getattr(p, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    if shape is not None:
        n = 1
        for s in shape:
            n *= int(s)
        return n
    return p.numel()
