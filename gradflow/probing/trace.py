"""Forward trace: per-module output requires_grad / grad_fn, and every torch.utils.checkpoint call."""

from __future__ import annotations

import dataclasses
import inspect
import itertools

import torch
import torch.utils.checkpoint as tuc
from torch.overrides import TorchFunctionMode

from gradflow.models import adapters_disabled, is_gc_layer, plain_attr
from gradflow.snapshot import CheckpointCall


def _tensors(obj, depth: int = 0):
    """Tensors inside args/kwargs/outputs (tuples, lists, dicts, ModelOutput), a few levels deep."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 3 and isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item, depth + 1)
    elif depth < 3 and isinstance(obj, dict):  # ModelOutput is a dict too
        for item in obj.values():
            yield from _tensors(item, depth + 1)


def _floating(tensors):
    return [t for t in tensors if t.is_floating_point() or t.is_complex()]


def main_output(out):
    """The tensor a loss is normally built from: logits, else the first floating tensor."""
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):  # a custom model's {"loss": ..., "logits": ...}
        logits = out.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    for t in _tensors(out):
        if t.is_floating_point():
            return t
    return None


_GRAD_OFF_FORWARD: dict[type, str | None] = {}


def grad_off_forward(module) -> str | None:
    """'no_grad' / 'inference_mode' / 'set_grad_enabled(False)' when the class's forward carries that decorator.

    Module hooks run outside the forward, so they see autograd still on; the decorator is read from the wrapper torch
    builds (a closure over the context manager's bound `clone`), down the `__wrapped__` chain of other decorators.
    """
    cls = type(module)
    if cls in _GRAD_OFF_FORWARD:
        return _GRAD_OFF_FORWARD[cls]
    found = None
    fn = getattr(cls, "forward", None)
    for _ in range(8):
        if fn is None or found is not None:
            break
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                ctx = getattr(cell.cell_contents, "__self__", None)
            except ValueError:  # an empty cell
                continue
            if isinstance(ctx, torch.no_grad):
                found = "no_grad"
            elif isinstance(ctx, torch.inference_mode) and getattr(ctx, "mode", True):
                found = "inference_mode"
            elif isinstance(ctx, torch.set_grad_enabled) and getattr(ctx, "mode", True) is False:
                found = "set_grad_enabled(False)"
        fn = getattr(fn, "__wrapped__", None)
    _GRAD_OFF_FORWARD[cls] = found
    return found


class _Record:
    __slots__ = ("calls", "order", "in_rg", "out_rg", "grad_fn", "finite", "grad_enabled", "in_reentrant",
                 "detached", "no_grad_call", "no_grad_root", "caller", "forward_grad_off", "in_fns", "out_fns",
                 "keeps_shape", "pending")

    def __init__(self):
        self.calls = 0
        self.order = None
        self.in_rg = None
        self.out_rg = None
        self.grad_fn = None
        self.finite = None  # a 0-dim bool tensor, read once after the forward (no per-module sync)
        self.grad_enabled = None
        self.in_reentrant = False
        self.detached = False
        self.no_grad_call = False  # autograd was off at its first call while it held or received what trains
        self.no_grad_root = False  # autograd was off at its first call, and on for the traced module that called it
        self.caller = None  # the traced module running when it was first called; None: outside the model's forward
        self.forward_grad_off = None  # its forward turns autograd off itself (a @torch.no_grad() decorator)
        # autograd nodes of the first call's floating inputs and outputs: after backward, the probe walks them to
        # find where a parameter's gradient path ends (references only; the probe drops them)
        self.in_fns = ()
        self.out_fns = ()
        self.keeps_shape = False  # some output has the shape of some input (it transforms the stream)
        self.pending = None  # inputs of the first call, until the module's own forward hooks have run


class _CutOps(TorchFunctionMode):
    """Ops of the forward that take a tensor carrying gradient and return one that carries none: `.detach()`,
    `.data`, a comparison, an integer cast, any op under torch.no_grad(). Their input's autograd node is where the
    graph was cut."""

    def __init__(self, tracer):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # one attribute read per op in the common case: the result carries gradient
        if isinstance(out, torch.Tensor) and not out.requires_grad and self.tracer.phase == "forward":
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    # a leaf (a parameter .detach()ed itself) is its own node: the walk keys it by the tensor
                    self.tracer.cut_sources.append(a.grad_fn if a.grad_fn is not None else a)
                    break
        return out


class Tracer:
    """Context manager that watches one forward (and the recomputations of its backward)."""

    def __init__(self, model, module_names: dict, *, finite_checks: bool = False, trainable_modules=None,
                 flag_params=None, watch_cuts: bool = False, watch_params=None):
        self.model = model
        self.names = module_names
        self.records: dict[str, _Record] = {}
        self.checkpoints: list[CheckpointCall] = []
        self.phase = "forward"
        self.output = None  # the last top-level call's output
        self.main_output = None  # its logits (see main_output)
        self._finite_checks = finite_checks
        self._stack: list[str] = []
        self._stack_gc: list[bool] = []  # whether each module on the stack has transformers checkpointing on
        self._regions: list[tuple[CheckpointCall, int]] = []
        self._order = itertools.count()
        self._handles = []
        self._saved = {}
        self._leaf = {m for m in module_names if not any(True for _ in m.children())}
        if trainable_modules is None:
            trainable_modules = {n for m, n in module_names.items() if any(p.requires_grad for p in m.parameters())}
        self._trainable_modules = trainable_modules
        self.output_fns: dict[int, object] = {}  # id -> grad_fn of every traced module output (kept alive here)
        # with flag_params (the trainable (name, tensor) pairs before the step): requires_grad as the model's
        # forward left it, and where it first went off. With watch_cuts, also the ops that cut the graph (_CutOps):
        # a Python call per torch op, so only the probe's replay of a failing step watches them
        self._flag_params = list(flag_params or ())
        self._watch_cuts = watch_cuts
        # watch_params: {module path: [(attribute path, parameter path)]}: the tensor each of those modules holds under
        # that name while it runs (a wrapper's stand-in: FSDP2's unsharded parameter, FSDP1's view of its flat
        # parameter), which is what the autograd graph reaches instead of the registered parameter
        self._watch_params = watch_params or {}
        self.used: dict[str, object] = {}  # parameter path -> the tensor its module ran with
        self.cut_sources: list = []
        self.flags_forward: list[bool] | None = None
        # (flags, PEFT's adapters disabled) when the first top-level call began: the loss may switch flags first
        self.flags_start: tuple[list[bool], bool] | None = None
        self.flip_at: tuple[str, str] | None = None  # (module, forward hook | forward pre-hook)
        self.loss_node = None  # the loss's grad_fn, set by the probe for the walk after backward
        self._pre_flags: dict[str, list[bool]] = {}  # flags at the global pre-hook of modules with pre-hooks

    # --- installation -------------------------------------------------------------------------
    def __enter__(self):
        # Two global hooks rather than two per module: registering thousands of per-module hooks costs more
        # than the forward itself on a 3.8B model. Modules of other models are ignored by name lookup.
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._handles.append(register_module_forward_pre_hook(self._pre_hook))
        self._handles.append(register_module_forward_hook(self._post_hook, with_kwargs=True, always_call=True))
        # Global hooks run before a module's own forward hooks, which may replace the output (a hook returning
        # out.detach(), the input-grad hook's requires_grad_): modules with hooks of their own get one more hook,
        # registered last, that records the output the rest of the model sees.
        self._late = {m for m in self.names if m._forward_hooks}
        for module in self._late:
            self._handles.append(module.register_forward_hook(self._late_hook, with_kwargs=True, always_call=True))
        self._patch_checkpoint()
        if self._watch_cuts:
            self._mode = _CutOps(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        mode, self._mode = getattr(self, "_mode", None), None
        if mode is not None:
            mode.__exit__(None, None, None)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name, value in self._saved.items():
            setattr(tuc, name, value)
        self._saved.clear()
        return False

    def _patch_checkpoint(self):
        # Both checkpoint variants look these names up in torch.utils.checkpoint at call time, so patching
        # them sees every region: transformers' bound partials, user wrappers and checkpoint_sequential alike.
        tracer = self
        orig_cf = tuc.CheckpointFunction
        orig_gen = tuc._checkpoint_without_reentrant_generator
        fixed = 0
        for param in inspect.signature(orig_gen).parameters.values():
            if param.kind is inspect.Parameter.VAR_POSITIONAL:
                break
            fixed += 1

        class _RecordingCheckpointFunction:
            @staticmethod
            def apply(function, preserve, *args):
                call = tracer._enter_region(True, args, {})
                try:
                    return orig_cf.apply(tracer._recomputing(function, call), preserve, *args)
                finally:
                    tracer._exit_region(call)

        def _recording_generator(*args, **kwargs):
            call = tracer._enter_region(False, args[fixed:], kwargs)
            if args:  # the generator calls its fn only to recompute; the forward calls the function itself
                args = (tracer._recomputing(args[0], call),) + tuple(args[1:])
            try:
                yield from orig_gen(*args, **kwargs)
            finally:
                tracer._exit_region(call)

        self._saved = {"CheckpointFunction": orig_cf, "_checkpoint_without_reentrant_generator": orig_gen}
        tuc.CheckpointFunction = _RecordingCheckpointFunction
        tuc._checkpoint_without_reentrant_generator = _recording_generator

    # --- checkpoint regions ---------------------------------------------------------------------
    def _enter_region(self, reentrant: bool, args, kwargs) -> CheckpointCall:
        tensors = list(_tensors(tuple(args))) + list(_tensors(dict(kwargs)))
        call = CheckpointCall(
            reentrant=reentrant, tensor_args=len(tensors), grad_args=sum(t.requires_grad for t in tensors),
            depth=len(self._regions), location=self._stack[-1] if self._stack else None, phase=self.phase,
            caller=self._stack[-1] if self._stack else None,
        )
        # transformers >= 5 checkpoints from inside the layer's own call: the enclosing layer is the region.
        # Otherwise (4.x, user wrappers) the first module run inside names it.
        call.modules = [call.location] if self._stack and self._stack_gc[-1] else []
        self.checkpoints.append(call)
        self._regions.append((call, len(self._stack)))
        return call

    def _recomputing(self, function, call: CheckpointCall):
        """Wrap a region's function so that its recomputation in backward runs inside the region again.

        Without this, a checkpoint nested in another one (transformers >= 5 only checkpoints a layer when grad is
        on, so only in the outer region's recomputation) would look like an outermost region.
        """
        tracer = self

        def run(*args, **kwargs):
            # in the forward, and in a region first entered during backward, the call is already on the stack
            if tracer.phase != "backward" or any(c is call for c, _ in tracer._regions):
                return function(*args, **kwargs)
            again = dataclasses.replace(call, modules=[], phase="backward")  # not a new call: not recorded
            tracer._regions.append((again, len(tracer._stack)))
            try:
                return function(*args, **kwargs)
            finally:
                tracer._exit_region(again)

        return run

    def _exit_region(self, call):
        while self._regions:
            top, _ = self._regions.pop()
            if top is call:
                break

    def _inside_reentrant(self) -> bool:
        return any(c.reentrant for c, _ in self._regions)

    # --- module hooks ---------------------------------------------------------------------------
    def _pre_hook(self, module, args):
        name = self.names.get(module)
        if name is None:
            return None
        if self._regions:
            call, level = self._regions[-1]
            if len(self._stack) == level and not (level and self._stack_gc[level - 1]):
                if not call.modules:
                    call.location = name
                call.modules.append(name)
        caller_name = self._stack[-1] if self._stack else None
        caller = self.records.get(caller_name) if caller_name is not None else None
        if self._flag_params and self.phase == "forward" and module._forward_pre_hooks and self.flip_at is None:
            self._pre_flags[name] = self.flags()  # global pre-hooks run before the module's own
        if self._flag_params and not self._stack and self.flags_start is None and self.phase == "forward":
            flags = self.flags()
            self.flags_start = flags, not all(flags) and adapters_disabled(self.model)
        self._stack.append(name)
        self._stack_gc.append(plain_attr(module, "gradient_checkpointing", False) is True and is_gc_layer(module))
        if self.phase == "forward":
            rec = self.records.get(name)
            if rec is None:
                rec = self.records[name] = _Record()
            if rec.calls == 0:
                rec.grad_enabled = torch.is_grad_enabled()
                rec.in_reentrant = self._inside_reentrant()
                rec.caller = caller_name
                if rec.grad_enabled:
                    rec.forward_grad_off = grad_off_forward(module)
                else:  # where autograd went off: the module called from code that still had it on
                    rec.no_grad_root = caller is None or bool(caller.grad_enabled)
            rec.calls += 1
        return None

    def _post_hook(self, module, args, *rest):
        # (kwargs, output); torch calls a global always_call hook as (module, args, None) when the forward raised
        kwargs, output = rest if len(rest) == 2 else ({}, rest[0])
        name = self.names.get(module)
        if name is None:
            return None
        if self._stack and self._stack[-1] == name:
            self._stack.pop()
            self._stack_gc.pop()
        if self.phase != "forward":
            return None
        rec = self.records.get(name)
        if rec is None or rec.order is not None:
            return None
        rec.order = next(self._order)
        for attr, path in self._watch_params.get(name, ()):
            held = module
            for part in attr.split("."):  # a ParameterDict's entry sits one attribute further down
                held = getattr(held, part, None)
            if isinstance(held, torch.Tensor):
                self.used.setdefault(path, held)
        if self._flag_params and self.flip_at is None:
            self._note_flip(name, module)
        inputs = _floating(list(_tensors(args)) + list(_tensors(kwargs)))
        rec.in_rg = any(t.requires_grad for t in inputs)
        rec.in_fns = tuple(t.grad_fn for t in inputs if t.grad_fn is not None)
        if module in self._late:
            rec.pending = inputs
        else:
            self._record_output(rec, name, module, inputs, output)
        if not self._stack:
            self.output, self.main_output = output, main_output(output)
            if self._flag_params and self.flags_forward is None:
                self.flags_forward = self.flags()
        return None

    def _late_hook(self, module, args, kwargs, output):
        rec = self.records.get(self.names.get(module)) if self.phase == "forward" else None
        if rec is None or rec.pending is None:
            return None
        inputs, rec.pending = rec.pending, None
        self._record_output(rec, self.names[module], module, inputs, output)
        if self._flag_params and self.flip_at is None and self._post_flags is not None \
                and self._post_flags != self.flags():
            self.flip_at = (self.names[module], "forward hook")  # its own forward hooks ran since the global one
        return None

    # --- requires_grad flags ------------------------------------------------------------------------
    _post_flags = None

    def flags(self) -> list[bool]:
        return [p.requires_grad for _, p in self._flag_params]

    def _note_flip(self, name, module):
        """At a module's global post-hook: did its own pre-hooks (or its forward) switch a flag off? Modules with
        forward hooks of their own are looked at again after those hooks (_late_hook)."""
        pre = self._pre_flags.pop(name, None)
        if pre is not None and pre != self.flags():
            self.flip_at = (name, "forward pre-hook")
        self._post_flags = self.flags() if module in self._late else None

    def _record_output(self, rec, name, module, inputs, output):
        outs = _floating(list(_tensors(output)))
        if outs:
            rec.out_fns = tuple(t.grad_fn for t in outs if t.grad_fn is not None)
            in_shapes = {tuple(t.shape) for t in inputs}
            rec.keeps_shape = any(tuple(t.shape) in in_shapes for t in outs)
            rec.out_rg = any(t.requires_grad for t in outs)
            fn = next((t.grad_fn for t in outs if t.grad_fn is not None), None)
            rec.grad_fn = type(fn).__name__ if fn is not None else None
            if fn is not None:
                self.output_fns[id(fn)] = fn
            if self._finite_checks and module in self._leaf:
                # no_grad: isfinite is composite (abs) and would save tensors, which non-reentrant
                # checkpointing counts and compares on recomputation
                with torch.no_grad():
                    rec.finite = torch.stack([torch.isfinite(t.detach()).all() for t in outs]).all()
        if rec.grad_enabled and not rec.in_reentrant:
            trainable = name in self._trainable_modules
            if outs and not rec.out_rg and (rec.in_rg or trainable):
                # parameter-free helpers whose output is a new quantity (rotary cos/sin) are not breaks
                if trainable or rec.keeps_shape:
                    rec.detached = True
        elif not rec.grad_enabled and not rec.in_reentrant and (name in self._trainable_modules or rec.in_rg):
            rec.no_grad_call = True
