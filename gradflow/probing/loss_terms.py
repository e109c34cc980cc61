"""Loss terms without a gradient: a term added to the loss that was computed from the model's outputs under
`torch.no_grad()` or from a `.detach()`ed copy. Such a term changes the loss value and adds nothing to the gradients.

Autograd keeps no trace of an operand that does not require grad (an `AddBackward0` node only shows `None` for it),
and a constant (a scalar weight, `num_items_in_batch`) looks the same. So the loss computation is watched with a
`TorchFunctionMode`: the floating outputs of every top-level module call (the model, a teacher) are marked as
derived from model outputs, and so is every result computed from a marked tensor. An addition or subtraction whose
result has a gradient and one of whose operands is a marked tensor without one is a candidate; after the loss is
taken, a walk from the loss down through the arithmetic that combines terms (add, sub, mul, div, mean, sum, stack,
views) keeps the candidates that are terms of the loss itself, not a shift inside a log-softmax.

The mode is popped while a top-level module runs, so the model's own forward pays only two hook calls per module.
"""

from __future__ import annotations

import os
import sys
import weakref

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode, _get_current_function_mode, _pop_mode, _push_mode

from gradflow.probing.trace import _tensors
from gradflow.snapshot import LossTerm

# the functions that add a term to another: a no-grad operand of these adds nothing to the gradient
_ADDITIVE = {"add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "__isub__", "sub_",
             "rsub", "subtract", "stack", "cat", "concat", "concatenate"}
# autograd nodes the walk from the loss passes through: the arithmetic that combines terms, and reshapes of it
_COMBINING = ("Add", "Sub", "Rsub", "Mul", "Div", "Mean", "Sum", "Neg", "Stack", "Cat", "View", "Unsqueeze",
              "Squeeze", "Expand", "Reshape", "Clone", "ToCopy", "Select", "Index", "Permute", "Transpose")
_WALK_LIMIT = 256  # the terms sit at the top of the graph; the walk stops at the first non-arithmetic node
_SKIP = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules["gradflow"]))


class LossTerms(TorchFunctionMode):
    """Watches one loss computation (see the module doc); `terms(loss)` afterwards lists the terms without grad."""

    def __init__(self):
        super().__init__()
        self._derived: dict[int, tuple] = {}  # id(tensor) -> (weakref, (how, where, is_cut) or None)
        self._candidates: dict[int, tuple] = {}  # id(grad_fn of the sum) -> (grad_fn, LossTerm)
        self._detached_from: dict[int, int] = {}  # id(x.detach()) -> id(x.grad_fn)
        self._depth = 0
        self._paused: list[bool] = []
        self._handles = []

    def __enter__(self):
        self._handles = [register_module_forward_pre_hook(self._pre),
                         register_module_forward_hook(self._post, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        while self._paused:  # a forward that never returned: put the mode back before popping it
            if self._paused.pop():
                _push_mode(self)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._derived.clear()
        self._detached_from.clear()
        return super().__exit__(*exc)

    # --- module calls: pause inside, mark what a top-level call returns -------------------------------------
    def _pre(self, module, args):
        self._depth += 1
        if self._depth == 1:
            mine = _get_current_function_mode() is self
            if mine:
                _pop_mode()  # the model's own forward is not the loss computation
            self._paused.append(mine)
        return None

    def _post(self, module, args, output):
        self._depth -= 1
        if self._depth or not self._paused:
            return None
        paused = self._paused.pop()
        if output is not None:  # None: the forward raised
            grad_on = torch.is_grad_enabled()
            for t in _tensors(output):  # before the mode is back: these tensor calls are not the loss's
                if t.is_floating_point():
                    origin = None
                    if t.grad_fn is None and not t.requires_grad:
                        how = "made under torch.no_grad()" if not grad_on else "that has no gradient"
                        # a source, not a cut: a teacher or reference run without autograd is often meant
                        origin = (f"from a {type(module).__name__} output {how}", _user_frame(), False)
                    self._mark(t, origin)
        if paused:
            _push_mode(self)
        return None

    # --- every torch call of the loss computation ----------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        derived = [t for t in _tensors((args, kwargs)) if self._is_derived(t)]
        if not derived:
            return out
        name = getattr(func, "__name__", "")
        lost = self._lost(derived)
        for t in _tensors(out):
            origin = None
            if t.grad_fn is None and not t.requires_grad:
                origin = lost or (_how(name), _user_frame(), True)
            self._mark(t, origin)
        if name == "detach" and derived[0].grad_fn is not None and isinstance(out, torch.Tensor):
            self._detached_from[id(out)] = id(derived[0].grad_fn)
        if name in _ADDITIVE and isinstance(out, torch.Tensor) and out.grad_fn is not None:
            self._candidate(name, out, derived, list(_tensors((args, kwargs))))
        return out

    def _lost(self, derived):
        """Where the gradient was lost: None when this call cuts it (an input had one), else the inputs' origin.

        Among the inputs' origins a cut (`.detach()`, `.data`, an op under no_grad on a tensor with a gradient)
        comes before a module output made without one: the policy's `.detach()` explains a KL term, not the
        reference model run under `torch.no_grad()` on purpose.
        """
        if any(t.requires_grad for t in derived):
            return None
        origins = [self._derived[id(t)][1] for t in derived if self._derived[id(t)][1] is not None]
        return next((o for o in origins if o[2]), origins[0] if origins else None)

    def _candidate(self, name, out, derived, operands) -> None:
        with_grad = {id(t.grad_fn) for t in operands if t.grad_fn is not None}
        for t in derived:
            origin = self._derived[id(t)][1]
            if origin is None or t.requires_grad or not t.is_floating_point():
                continue
            if self._detached_from.get(id(t)) in with_grad:
                continue  # x - x.detach(): a straight-through shift, zero in value, the gradient of x
            what, where, _ = origin
            term = LossTerm(op=name.strip("_").rstrip("_"), shape=list(t.shape), how=what, computed_at=where,
                            added_at=_user_frame())
            self._candidates[id(out.grad_fn)] = (out.grad_fn, term)
            return

    def _mark(self, t, origin) -> None:
        self._derived[id(t)] = (weakref.ref(t), origin)

    def _is_derived(self, t) -> bool:
        entry = self._derived.get(id(t))
        return entry is not None and entry[0]() is t

    # --- after the loss -------------------------------------------------------------------------------------
    def terms(self, loss) -> list[LossTerm]:
        """The candidates that are terms of `loss`: reached from its grad_fn through combining arithmetic only."""
        found = []
        if loss is None or loss.grad_fn is None or not self._candidates:
            self._candidates.clear()
            return found
        stack, seen = [loss.grad_fn], set()
        while stack and len(seen) < _WALK_LIMIT:
            fn = stack.pop()
            if fn is None or id(fn) in seen:
                continue
            seen.add(id(fn))
            hit = self._candidates.get(id(fn))
            if hit is not None and hit[0] is fn:
                found.append(hit[1])
            if type(fn).__name__.startswith(_COMBINING):
                stack.extend(nxt for nxt, _ in fn.next_functions)
        self._candidates.clear()
        return found


def _how(name: str) -> str:
    if name in ("detach", "detach_", "__get__"):  # __get__: the `.data` property
        return "from a .detach()ed copy of the model output" if name != "__get__" else "from .data of the model output"
    if not torch.is_grad_enabled():
        return "under torch.no_grad() from the model output"
    return "from the model output, without a gradient"


def _user_frame() -> str | None:
    """'file.py:LINE' of the innermost caller outside torch and gradflow (None when there is none)."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(_SKIP) and not path.startswith("<") and "contextlib" not in path:
            rel = os.path.relpath(path)
            return f"{path if rel.startswith('..') else rel}:{frame.f_lineno}"
        frame = frame.f_back
    return None
