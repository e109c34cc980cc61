"""`--steps K`: K real optimizer steps on the probe batch, then every parameter and the optimizer put back.

A gradient reaching a parameter does not prove that it trains: the optimizer may not hold it, its learning rate
may be zero (or scheduled to zero), or the update may be lost. This module takes K steps with the optimizer the run
will use and records, per intended-trainable parameter, whether it changed and whether the optimizer holds state
for it, and per parameter group the learning rate each step used.

Which optimizer: the one given (a factory's `optimizer`, the API's `optimizer=`), a Trainer's own (with its
scheduler), else `torch.optim.AdamW(trainable, lr=1e-3)` with torch's other defaults.

Restoring, rather than a deep copy: the steps run in place and afterwards the parameters the optimizer or the
gradients could touch are copied back from clones, and the optimizer's and scheduler's `state_dict()`s (deep
copies taken before) are loaded back. That costs one copy of the trainable parameters and of the optimizer state,
where a deep copy would cost the whole model, and works for quantized and hooked models that do not deep-copy.
"""

from __future__ import annotations

import copy
import contextlib
from typing import Any, Callable

from gradflow.errors import GradflowError
from gradflow.forward import call_model, extract_loss, fresh
from gradflow.model_state import ModelState
from gradflow.probing.backward import _describe_exc
from gradflow.snapshot import ParamStep, StepsRun

DEFAULT_LR = 1e-3
STEPS_MAX = 1000  # a pre-flight, not a training run


def check_steps(steps) -> int:
    """`steps` as an int in 0..STEPS_MAX, else GradflowError."""
    import operator

    try:
        steps = operator.index(steps)
    except TypeError:
        raise GradflowError(f"--steps must be an integer, got {steps!r}"[:200], "Pass e.g. --steps 2") from None
    if not 0 <= steps <= STEPS_MAX:
        raise GradflowError(f"--steps must be an integer from 0 (no steps) to {STEPS_MAX}, got {steps}",
                            "Pass e.g. --steps 2")
    return steps


def run_steps(model, batch: Any, *, steps: int, loss_fn: Callable | None = None, optimizer=None, lr_scheduler=None,
              snap=None, optimizer_source: str | None = None) -> StepsRun:
    """Take `steps` optimizer steps on `batch`, record what moved, and put the model and optimizer back."""
    import torch

    named = list(model.named_parameters())
    states = {p.name: p for p in snap.params} if snap is not None else {}
    if optimizer is None and lr_scheduler is not None:
        optimizer = lr_scheduler.optimizer  # a scheduler belongs to the optimizer it was built on
    source = optimizer_source or ("given" if optimizer is not None else "default")
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for _, p in named if p.requires_grad], lr=DEFAULT_LR)
    groups = optimizer.param_groups
    held = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
    intended = [(n, p) for n, p in named if _intended(states.get(n), p)]
    # what the steps can change: parameters the optimizer holds or that get gradients, plus the intended ones
    touched = {id(p): p for _, p in named if p.requires_grad or id(p) in held}
    touched.update((id(p), p) for _, p in intended)
    run = StepsRun(steps=steps, optimizer=type(optimizer).__name__, optimizer_source=source,
                   scheduler=type(lr_scheduler).__name__ if lr_scheduler is not None else None,
                   group_sizes=[sum(1 for p in g["params"] if p.requires_grad) for g in groups])
    # the model as found afterwards; the values of what the steps can change are copied (they change in place)
    kept = ModelState(model, values=touched.values())
    saved = _OptimizerState(optimizer, lr_scheduler)
    nonzero = {n: False for n, _ in intended}
    got_grad = {n: False for n, _ in intended}
    try:
        kept.clear_grads()
        model.train()
        for i in range(steps):
            run.lrs.append([float(g.get("lr", 0.0)) for g in groups])
            run.error_step = i + 1  # cleared once the steps are done
            loss = _step(model, batch, loss_fn, optimizer, lr_scheduler, intended, got_grad, nonzero, run)
            run.losses.append(loss)
        run.error_step = run.error_phase = None
        run.next_lrs = [float(g.get("lr", 0.0)) for g in groups]
        run.params = [_param_state(n, p, states, held, optimizer, nonzero, got_grad, kept) for n, p in intended]
    except Exception as exc:  # the user's forward, backward or optimizer failing is data

        run.error = _describe_exc(exc)
    finally:
        kept.restore()
        saved.restore()
        run.restored = True
    if run.error is None:
        run.zero_lr_groups = [i for i, size in enumerate(run.group_sizes)
                              if size and all(lrs[i] == 0 for lrs in run.lrs) and run.next_lrs[i] == 0]
        by_name = dict(named)
        for ps in run.params:
            i = held.get(id(by_name[ps.name]))
            ps.zero_lr = i is not None and i in run.zero_lr_groups
    return run


def _intended(state, p) -> bool:
    """Intended for training: matches the `trainable` regex when one was given, else requires grad."""
    if state is not None and state.intended is not None:
        return state.intended
    return p.requires_grad


def _step(model, batch, loss_fn, optimizer, lr_scheduler, intended, got_grad, nonzero, run) -> float | None:
    model.zero_grad(set_to_none=True)  # parameters outside the optimizer too: each step sees its own gradient
    run.error_phase = "forward"
    # each step its own copy, as the dataloader gives: a compute_loss may pop keys from its inputs
    out = loss_fn(model, fresh(batch)) if loss_fn is not None else call_model(model, fresh(batch))
    run.error_phase = "loss"
    loss = extract_loss(out)
    value = float(loss.detach().float())
    run.error_phase = "backward"
    if loss.requires_grad:
        loss.backward()
    run.error_phase = "optimizer"
    for n, p in intended:
        if p.grad is not None:
            got_grad[n] = True
            nonzero[n] = nonzero[n] or bool(p.grad.any())
    optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return value


def _param_state(name, p, states, held, optimizer, nonzero, got_grad, kept) -> ParamStep:
    import torch

    before = kept.value(p)
    state = optimizer.state.get(p) if hasattr(optimizer, "state") else None
    st = states.get(name)
    return ParamStep(name=name, module=st.module if st is not None else name.rsplit(".", 1)[0],
                     changed=not torch.equal(p.detach(), before), requires_grad=p.requires_grad,
                     in_optimizer=id(p) in held, has_state=bool(state) if optimizer.state else None,
                     grad="ok" if nonzero[name] else ("zero" if got_grad[name] else "none"))


class _OptimizerState:
    """The optimizer's and scheduler's state_dict (deep copies) and the attributes torch adds on a step."""

    def __init__(self, optimizer, lr_scheduler):
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.opt_state = copy.deepcopy(optimizer.state_dict())
        self.sched_state = copy.deepcopy(lr_scheduler.state_dict()) if lr_scheduler is not None else None
        # LRScheduler marks the optimizer on each step (`_opt_called`); put it back as found
        target = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps one
        self.target = target
        self.attrs = {k: v for k, v in vars(target).items() if k not in ("state", "param_groups")}

    def restore(self) -> None:
        if self.sched_state is not None:
            self.lr_scheduler.load_state_dict(self.sched_state)
        self.optimizer.load_state_dict(self.opt_state)  # after the scheduler: the groups' lr come back from here
        for k in set(vars(self.target)) - set(self.attrs) - {"state", "param_groups"}:
            with contextlib.suppress(AttributeError):
                delattr(self.target, k)
        for k, v in self.attrs.items():
            setattr(self.target, k, v)
