"""`--check-gc`: one batch, run with gradient checkpointing on and off, per-parameter gradients compared.

Checkpointing is meant to be invisible to the gradients: the region's forward is recomputed during backward and
must produce the same values. It is not when the recomputation differs from the first forward: a random draw
made without the RNG being restored (`preserve_rng_state=False`), a module that mutates state in its forward
(a counter, a cache, a running statistic that feeds the output), or a forward that branches on
`torch.is_grad_enabled()` (a reentrant checkpoint runs the first forward under `no_grad`).

How "on" and "off" are obtained:
- The model already checkpoints (transformers' per-layer switch, or its own `torch.utils.checkpoint` calls):
  "on" is the model as given. "Off" runs every `torch.utils.checkpoint` call inline (the region's function is
  called directly, as it is without checkpointing); nothing in the model is changed.
- The model does not checkpoint but is a transformers model that can: "on" turns transformers' checkpointing on,
  non-reentrant (the default of transformers 5; a reentrant region would also need an input-grad hook, which is
  `reentrant-checkpoint-no-input-grad`'s concern, not this comparison's). Its checkpointing state (the per-module
  switch and function, the input-grad hooks transformers adds) is put back exactly afterwards.
- Otherwise nothing is compared and `reason` says why.

Both runs use the same batch, the same RNG state (restored before each run), the same buffers (restored before
each run), and dropout modules at p=0; everything is put back afterwards.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

from gradflow.forward import call_model, extract_loss, fresh
from gradflow.model_state import kept
from gradflow.models import base_model, set_checkpointing
from gradflow.probing.backward import _describe_exc
from gradflow.snapshot import GcEquivalence, GradDiff

# by gradient dtype: ||g_on - g_off|| <= atol * sqrt(numel) + rtol * ||g_off||. Recomputation on the same device
# is normally bit-exact; the slack covers non-deterministic kernels (atomics in embedding/scatter backward).
RTOL = {"float32": 1e-4, "float64": 1e-7, "bfloat16": 2e-2, "float16": 2e-3}
ATOL = {"float32": 1e-7, "float64": 1e-12, "bfloat16": 1e-5, "float16": 1e-6}
_DEFAULT = "float32"


def compare(model, batch: Any, *, loss_fn: Callable | None = None, snap=None) -> GcEquivalence:
    """Run `batch` through `model` with checkpointing on and off and compare every trainable gradient.

    `snap` (the probe's Snapshot) says whether the model already checkpoints; the model is left as found.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    module_of = {p.name: p.module for p in snap.params} if snap is not None else {}
    own_mode = _own_mode(snap)
    if own_mode is None:
        target = base_model(model)
        if not (getattr(target, "supports_gradient_checkpointing", False)
                and hasattr(target, "gradient_checkpointing_enable")):
            return GcEquivalence(compared=False, reason=(
                f"{type(target).__name__} does not checkpoint and has no transformers checkpointing to turn on: "
                "nothing to compare"))
    result = GcEquivalence(compared=True, mode=own_mode or "non-reentrant", enabled_for_check=own_mode is None,
                           rtol=dict(RTOL), atol=dict(ATOL))
    with _kept(model) as state:
        off_loss, off_grads, result.error_without_gc = _run(model, batch, loss_fn, trainable,
                                                            plain=own_mode is not None)
        state.rewind()
        if own_mode is None:
            try:
                set_checkpointing(model, "non-reentrant")
            except Exception as exc:  # e.g. "is not compatible with gradient checkpointing": say so, don't crash

                return GcEquivalence(compared=False, reason=f"turning checkpointing on failed: {_describe_exc(exc)}")
        on_loss, on_grads, result.error_with_gc = _run(model, batch, loss_fn, trainable, plain=False)
    result.loss_without_gc, result.loss_with_gc = off_loss, on_loss
    if result.error_with_gc or result.error_without_gc:
        return result  # a run that raised has no gradients to compare
    result.params_compared = len(trainable)
    result.diffs = _diffs(trainable, on_grads, off_grads, module_of, compute_dtype(model))
    return result


def _own_mode(snap) -> str | None:
    """The checkpointing the model already does: transformers' switch, else its own checkpoint calls; None if none."""
    if snap is None:
        return None
    if snap.gc_mode != "off":
        return snap.gc_mode
    kinds = {"reentrant" if c.reentrant else "non-reentrant" for c in snap.checkpoints if c.phase == "forward"}
    if not kinds:
        return None
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _run(model, batch, loss_fn, trainable, *, plain: bool):
    """One forward+backward from the saved RNG state: (loss, {name: grad clone or None}, error)."""
    for _, p in trainable:
        p.grad = None
    loss_value, error = None, None
    try:
        with (_inline_checkpoints() if plain else contextlib.nullcontext()):
            out = loss_fn(model, fresh(batch)) if loss_fn is not None else call_model(model, fresh(batch))
            loss = extract_loss(out)
            loss_value = float(loss.detach().float())
            if loss.requires_grad:
                loss.backward()
    except Exception as exc:  # the user's forward or backward failing is data
        error = _describe_exc(exc)
    grads = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in trainable}
    for _, p in trainable:
        p.grad = None
    return loss_value, grads, error


def _diffs(trainable, on: dict, off: dict, module_of: dict, compute: str = _DEFAULT) -> list[GradDiff]:
    import torch

    out = []
    for name, p in trainable:
        g_on, g_off = on.get(name), off.get(name)
        module = module_of.get(name, name.rsplit(".", 1)[0] if "." in name else "")
        if g_on is None and g_off is None:
            continue
        if g_on is None or g_off is None:
            out.append(GradDiff(name, module, "none-with-gc" if g_on is None else "none-without-gc"))
            continue
        zero_on, zero_off = not bool(g_on.any()), not bool(g_off.any())
        if zero_on != zero_off:
            out.append(GradDiff(name, module, "zero-with-gc" if zero_on else "zero-without-gc"))
            continue
        if zero_on:
            continue
        dtype = _loosest(str(g_off.dtype).replace("torch.", ""), compute)
        rtol, atol = RTOL.get(dtype, RTOL[_DEFAULT]), ATOL.get(dtype, ATOL[_DEFAULT])
        diff = (g_on.float() - g_off.float())
        dnorm = float(torch.linalg.vector_norm(diff))
        ref = float(torch.linalg.vector_norm(g_off.float()))
        finite = math.isfinite(dnorm) and math.isfinite(ref)
        if finite and dnorm <= atol * math.sqrt(g_off.numel()) + rtol * ref:
            continue
        if not finite and torch.equal(g_on, g_off):
            continue  # the same NaN/Inf pattern is nonfinite-grad's business, not checkpointing's
        out.append(GradDiff(name, module, "differs", rel_diff=dnorm / ref if ref else float("inf"),
                            max_abs_diff=float(diff.abs().max())))
    return out


@contextlib.contextmanager
def _inline_checkpoints():
    """Every torch.utils.checkpoint call runs its function directly: the forward without checkpointing."""
    import torch.utils.checkpoint as tuc

    saved = {"CheckpointFunction": tuc.CheckpointFunction,
             "_checkpoint_without_reentrant_generator": tuc._checkpoint_without_reentrant_generator}

    class _Inline:
        @staticmethod
        def apply(function, preserve, *args):
            return function(*args)

    def _no_checkpoint(*args, **kwargs):
        # checkpoint() calls the function itself between two next() calls; the second ends the generator
        yield

    tuc.CheckpointFunction = _Inline
    tuc._checkpoint_without_reentrant_generator = _no_checkpoint
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(tuc, name, value)


@contextlib.contextmanager
def _kept(model):
    """Train mode with dropout at p=0, RNG and buffers reset before each run; the model left as found (its
    checkpointing switches and hooks, dropout p, buffers, RNG, gradients and modes)."""
    with kept(model, clear_grads=True, buffers=True) as state:
        model.train()
        for m in state.dropouts:
            m.p = 0.0
        state.rewind()
        yield state


def compute_dtype(model) -> str:
    """The least precise floating dtype among the model's parameters: an fp32 LoRA weight on a bf16 (or 4-bit with
    bf16 compute) base gets a gradient computed in bf16, so the bf16 tolerance applies to it (measured on an H200:
    up to 1.1% relative difference between recomputed and stored bf16 activations' gradients)."""
    import torch

    dtypes = {str(p.dtype).replace("torch.", "") for p in model.parameters() if p.is_floating_point()}
    # prepare_model_for_kbit_training upcasts every float parameter to fp32, yet bitsandbytes layers compute in
    # their compute_dtype (bf16 for a bf16 QLoRA)
    dtypes |= {str(m.compute_dtype).replace("torch.", "") for m in model.modules()
               if isinstance(getattr(m, "compute_dtype", None), torch.dtype)}
    return max(dtypes, key=lambda d: RTOL.get(d, 0.0), default=_DEFAULT)


def _loosest(a: str, b: str) -> str:
    return max((a, b), key=lambda d: RTOL.get(d, 0.0))
