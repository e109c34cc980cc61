"""A model's mutable state, captured and put back: the one place for what the probe, patch, --check-gc, --steps and
the Trainer source save, so that each restores the same things. No torch import at module level.

`ModelState(model)` captures, per module: its forward and backward hook dicts, its child modules, transformers'
checkpointing attributes and a dropout's `p`, and its train/eval flag; per parameter: `.data` (by reference: a dtype
cast swaps `.data`, so the old tensor is the backup, and nothing is copied), `requires_grad` and `.grad`; the root's
`config.use_cache` and PEFT adapter configs; and the RNG streams (python, numpy, torch CPU and CUDA). Copies are
opt-in, for the callers that change values in place: `buffers=True` (--check-gc resets them before each run) and
`values=` (the parameters --steps updates).

`restore()` puts all of it back. `restore(since=later)` undoes only what changed between this capture and `later`
and keeps what changed after `later` (the Trainer source undoes the trainer's preparation, not a patch's fixes).
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Mapping
from typing import Iterator

# every hook dict torch keeps on a module (the *_with_kwargs and *_always_called ones are keyed like their hooks)
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")
# what transformers' checkpointing switch and enable_input_require_grads set on a module (4.57: the single hook;
# 5.x: the list as well), and 5.x's mark that its output-capturing hooks are installed: the hooks it installs on the
# first forward are taken off with the others, so the mark goes too, or a later forward captures no hidden_states
GC_ATTRS = ("gradient_checkpointing", "_gradient_checkpointing_func", "_require_grads_hook", "_require_grads_hooks",
            "_output_capturing_hooks_installed")
_MISSING = object()
_NO_HOOKS: dict = {}  # the saved copy of every empty hook dict (read only)


def rng_state() -> tuple:
    """Every RNG stream a step may draw from: (python, numpy or None, torch CPU, CUDA per device or None)."""
    import torch

    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:
        np_state = None
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np_state, torch.get_rng_state(), cuda


def set_rng_state(state: tuple) -> None:
    """Put back what `rng_state()` returned."""
    import torch

    py, np_state, cpu, cuda = state
    random.setstate(py)
    if np_state is not None:
        import numpy as np

        np.random.set_state(np_state)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def kept_rng() -> Iterator[None]:
    """Leave every RNG stream as it was found."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


class _Module:
    __slots__ = ("module", "training", "hooks", "children", "attrs")

    def __init__(self, module, dropout_cls):
        # read from the instance dict, where nn.Module keeps all of these: the probe captures every module of a
        # model each time, and an empty hook dict (most of them) shares one empty copy, which nothing mutates
        found = module.__dict__
        self.module = module
        self.training = module.training
        self.hooks = {k: (dict(v) if v else _NO_HOOKS) for k in HOOK_DICTS if (v := found.get(k)) is not None}
        self.children = dict(module._modules)
        self.attrs = {a: found.get(a, _MISSING) for a in GC_ATTRS}
        if isinstance(module, dropout_cls):
            self.attrs["p"] = module.p


class _Param:
    __slots__ = ("param", "data", "requires_grad", "grad")

    def __init__(self, p):
        self.param, self.data, self.requires_grad, self.grad = p, p.data, p.requires_grad, p.grad


class ModelState:
    """What a model is now, to be put back later (see the module's docstring for what is captured).

    Args:
        model: the nn.Module.
        modules, params: the modules and parameters to capture, when the caller has walked the model already
            (default: all of `model.modules()` and `model.parameters()`).
        batch: a dict batch the caller may change (patch's cache fix pops `past_key_values`): put back too.
        buffers: also copy every buffer's value (`rewind()` and `restore()` copy them back).
        values: parameters whose values are copied (`value(p)` returns the copy; `restore()` copies it back).
    """

    def __init__(self, model, *, modules=None, params=None, batch=None, buffers: bool = False, values=()):
        import torch

        self.model = model
        dropout = torch.nn.modules.dropout._DropoutNd
        self.modules = [_Module(m, dropout) for m in (modules if modules is not None else model.modules())]
        self.params = [_Param(p) for p in (params if params is not None else model.parameters())]
        config = getattr(model, "config", None)
        self.config = config
        self.use_cache = getattr(config, "use_cache", _MISSING) if config is not None else _MISSING
        self.peft_config = copy.deepcopy(dict(getattr(model, "peft_config", None) or {}))
        self.rng = rng_state()
        self.batch = dict(batch) if isinstance(batch, Mapping) else None
        self.batch_obj = batch
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()] if buffers else []
        self.values = {id(p): (p, p.detach().clone()) for p in values}

    @property
    def dropouts(self) -> list:
        """The dropout modules captured."""
        return [r.module for r in self.modules if "p" in r.attrs]

    def value(self, p):
        """The copy of `p`'s value taken at capture (`values=`)."""
        return self.values[id(p)][1]

    def clear_grads(self) -> None:
        for r in self.params:
            r.param.grad = None

    def rewind(self) -> None:
        """Buffers (when copied) and the RNG streams as captured: the same starting point for another run."""
        import torch

        with torch.no_grad():
            for b, value in self.buffers:
                b.copy_(value)
        set_rng_state(self.rng)

    def restore(self, since: "ModelState | None" = None) -> None:
        """Put everything captured back. With `since` (a later capture of the same model), put back only what changed
        between this capture and `since` and has not changed again after it: later changes stay."""
        import torch

        later = {id(r.module): r for r in since.modules} if since is not None else None
        for r in self.modules:
            s = later.get(id(r.module)) if later is not None else r
            if s is None:
                continue  # not in the later capture: nothing to tell what changed before it
            m = r.module
            found = m.__dict__
            # what still equals the capture needs nothing, a full restore or a partial one: most of a model
            for key, saved in r.hooks.items():
                if (live := found[key]) != saved:
                    _put_dict(live, saved, s.hooks.get(key, saved), since is not None)
            if m._modules != r.children:
                _put_dict(m._modules, r.children, s.children, since is not None)
            for a, value in r.attrs.items():
                now = found.get(a, _MISSING)
                if now is not value and _undo(now, value, s.attrs.get(a, _MISSING), since, _same_attr):
                    if value is _MISSING:
                        found.pop(a, None)
                    else:
                        found[a] = value
            if _undo(m.training, r.training, s.training, since, _equal):
                m.training = r.training
        later_p = {id(p.param): p for p in since.params} if since is not None else None
        with torch.no_grad():
            for r in self.params:
                s = later_p.get(id(r.param)) if later_p is not None else r
                if s is None:
                    continue
                p = r.param
                if _undo(p.data, r.data, s.data, since, _same_data):
                    p.data = r.data
                if _undo(p.requires_grad, r.requires_grad, s.requires_grad, since, _equal):
                    p.requires_grad_(r.requires_grad)
                if _undo(p.grad, r.grad, s.grad, since, _is):
                    p.grad = r.grad
            for p, value in self.values.values():
                p.copy_(value)
            for b, value in self.buffers:
                b.copy_(value)
        self._restore_configs(since)
        if since is None or not _same_rng(since.rng, self.rng) and _same_rng(rng_state(), since.rng):
            set_rng_state(self.rng)
        if self.batch is not None:
            self.batch_obj.clear()
            self.batch_obj.update(self.batch)

    def _restore_configs(self, since) -> None:
        config = self.config
        if config is not None and self.use_cache is not _MISSING:
            later = since.use_cache if since is not None else self.use_cache
            if _undo(getattr(config, "use_cache", _MISSING), self.use_cache, later, since, _equal):
                config.use_cache = self.use_cache
        if self.peft_config:
            live = self.model.peft_config
            for name, saved in self.peft_config.items():
                later = since.peft_config.get(name, _MISSING) if since is not None else saved
                if _undo(live.get(name, _MISSING), saved, later, since, _equal):
                    live[name] = copy.deepcopy(saved)


def _undo(now, saved, later, since, same) -> bool:
    """Whether to put `saved` back: it differs from `now` (a full restore), or, undoing only up to `since`, the value
    changed between the two captures and is still the one `since` saw."""
    if since is None:
        return not same(now, saved)
    return not same(later, saved) and same(now, later)


def _put_dict(live: dict, saved: dict, later: dict, partial: bool) -> None:
    """A hook or child dict as saved (the dict object itself stays: hook handles hold it by reference)."""
    if not partial:
        if live != saved:
            live.clear()
            live.update(saved)
        return
    for key in set(saved) | set(later):
        old, new = saved.get(key, _MISSING), later.get(key, _MISSING)
        if old is not new and live.get(key, _MISSING) is new:
            if old is _MISSING:
                live.pop(key, None)
            else:
                live[key] = old


def _is(a, b) -> bool:
    return a is b


def _equal(a, b) -> bool:
    if a is b:
        return True
    if a is _MISSING or b is _MISSING:
        return False
    try:
        return bool(a == b)
    except Exception:  # values that cannot be compared as a whole (a tensor field): the same only if identical
        return False


def _same_attr(a, b) -> bool:
    # a dropout's p is a float set anew; checkpointing functions, flags and hook handles are compared by identity
    return a is b or (isinstance(a, float) and isinstance(b, float) and a == b)


def _same_data(a, b) -> bool:
    """Whether two `.data` reads are the same tensor (each read is a new Python object, so not by identity)."""
    if a is b:
        return True
    if type(a) is not type(b) or a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    try:
        return a.is_set_to(b)
    except Exception:  # no storage to compare (a DTensor shard, a meta tensor): the same dtype, shape and device
        return True


def _same_rng(a, b) -> bool:
    import torch

    py_a, np_a, cpu_a, cuda_a = a
    py_b, np_b, cpu_b, cuda_b = b
    if py_a != py_b or not torch.equal(cpu_a, cpu_b):
        return False
    if (np_a is None) != (np_b is None) or (cuda_a is None) != (cuda_b is None):
        return False
    if np_a is not None and not (np_a[0] == np_b[0] and (np_a[1] == np_b[1]).all() and np_a[2:] == np_b[2:]):
        return False
    return cuda_a is None or all(torch.equal(x, y) for x, y in zip(cuda_a, cuda_b))


@contextlib.contextmanager
def kept(model, *, clear_grads: bool = False, **capture) -> Iterator[ModelState]:
    """The model as found after the block, whatever happens in it (`capture`: ModelState's arguments).
    `clear_grads`: the block starts with no gradients (a probe measures its own)."""
    state = ModelState(model, **capture)
    try:
        if clear_grads:
            state.clear_grads()
        yield state
    finally:
        state.restore()
