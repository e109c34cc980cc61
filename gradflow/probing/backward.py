"""Backward probe: one forward and backward in train mode, each trainable parameter's gradient classified."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any, Callable

from gradflow.data.packing import is_packed
from gradflow.forward import batch_or_synthetic, call_model, extract_loss, fresh
from gradflow.model_state import kept, set_rng_state
from gradflow.probing.cuts import fill_cuts, flat_zeros_missing, lost_params, release, replay, should_replay
from gradflow.probing.describe import active_adapters, describe
from gradflow.probing.leak import measure
from gradflow.probing.loss_terms import LossTerms
from gradflow.probing.trace import Tracer
from gradflow.probing.unreached import note_flips
from gradflow.snapshot import LossState, Snapshot


def _graph_reaches(root_fn, targets: dict, limit: int = 2_000_000) -> bool:
    """Whether the autograd graph below `root_fn` contains any node whose id is in `targets`."""
    seen = set()
    stack = [root_fn]
    while stack and len(seen) < limit:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        if id(fn) in targets:
            return True
        seen.add(id(fn))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return False


def probe(model, batch: Any = None, *, loss_fn: Callable | None = None, optimizer=None,
          trainable: str | None = None, backward: bool = True, static: bool = False) -> Snapshot:
    """Describe `model`, trace one train-mode forward, run backward, and classify every trainable gradient."""
    snap, live = describe(model, trainable=trainable, optimizer=optimizer)
    if static:
        return snap
    names = live.module_names
    batch = batch_or_synthetic(model, batch, loss_fn)
    _note_batch(snap, batch)
    loss_state = LossState()
    trainable_params = [(n, p) for n, p in live.params if p.requires_grad]
    # left as found: flags, gradients, hooks, modes, RNG streams (parameter data is held by reference, not copied)
    with kept(model, modules=names, params=[p for _, p in live.params], clear_grads=True) as state:
        model.train()
        trainable_modules = {m.name for m in snap.modules if m.trainable}
        flagged = trainable_params if backward else None  # flags matter only to a backward
        with Tracer(model, names, trainable_modules=trainable_modules, flag_params=flagged) as tracer:
            flags_loss = _step(model, batch, loss_fn, snap, loss_state, tracer, backward=backward)
        _fill_trace(snap, tracer)
        # off after the loss, or off after the forward and on again by the end of the loss (toggled)
        off = flags_loss is not None and not (all(flags_loss) and all(tracer.flags_forward or ()))
        if backward and off:
            note_flips(snap, tracer, trainable_params, flags_loss, active_adapters(model, names))
        if backward:  # inspect runs no backward: it knows nothing about gradients
            _fill_grads(snap, trainable_params)
            _note_zero_valued(snap, trainable_params)
        release(tracer)
        lost = lost_params(snap, trainable_params) if backward and loss_state.error is None else []
        # after an exception the missing gradients say nothing; in lockstep a rank with none lost replays too
        if backward and loss_state.error is None and should_replay(lost):
            again = replay(model, batch, loss_fn, names, state, trainable_modules, lost)
            if again is not None:
                if lost:
                    fill_cuts(snap, again, lost)
                release(again)
        if backward and loss_state.error is None:
            flat_zeros_missing(snap)
        loss_bad = loss_state.value is not None and not math.isfinite(loss_state.value)
        if loss_bad or any(p.grad == "nonfinite" for p in snap.params):
            # the streams the forward started from, to replay it
            snap.forward_nonfinite_at = _locate_nonfinite(model, batch, loss_fn, names, state.rng)
            snap.nonfinite_weights = _nonfinite_weights(model, snap.forward_nonfinite_at)
        if backward and isinstance(batch, Mapping) and is_packed(batch):
            snap.packed_leak = measure(model, batch)  # several samples per row: does attention keep them apart?
    snap.loss = loss_state
    snap.traced = True
    snap.probed = backward
    return snap


def _note_batch(snap: Snapshot, batch) -> None:
    """What the batch itself says: embeddings given, a legacy cache, every label masked."""
    import torch

    if not isinstance(batch, Mapping):
        return
    snap.inputs_embeds_given = batch.get("inputs_embeds") is not None
    snap.legacy_cache_in_batch = isinstance(batch.get("past_key_values"), (tuple, list))
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor):
        supervised = labels[..., 1:] if labels.dim() > 1 and labels.shape[-1] > 1 else labels
        snap.labels_all_masked = bool((supervised == -100).all())


def _step(model, batch, loss_fn, snap: Snapshot, loss_state: LossState, tracer, *, backward: bool):
    """The traced forward, the loss, and (unless inspecting) the backward; a failure in any is recorded as data.
    Returns the trainable parameters' requires_grad flags as the loss left them (None when not tracked)."""
    loss = None
    # terms added to the loss without a gradient; a model's own loss is computed inside its forward, out of sight
    watch = LossTerms() if loss_fn is not None else contextlib.nullcontext()
    try:
        with watch:
            out = loss_fn(model, fresh(batch)) if loss_fn is not None else call_model(model, fresh(batch))
    except Exception as exc:  # the user's forward failing is data, not a crash
        loss_state.error, loss_state.error_phase = _describe_exc(exc), "forward"
        out = None
    if out is not None:
        try:
            loss = extract_loss(out)
        except TypeError as exc:
            loss_state.error, loss_state.error_phase = str(exc), "loss"
    tracer.phase = "backward"
    flags_loss = tracer.flags() if backward else None  # a list of bools: cheap beside the step
    model_out = tracer.main_output
    if model_out is not None:
        snap.output_requires_grad = bool(model_out.requires_grad)
    snap.loss_terms = watch.terms(loss) if loss_fn is not None else []
    if loss is not None:
        _note_loss(loss, loss_state, tracer)
        if backward and loss.requires_grad:
            try:
                loss.backward()
            except Exception as exc:
                loss_state.error, loss_state.error_phase = _describe_exc(exc), "backward"
    del loss, out, model_out
    tracer.output = tracer.main_output = None
    tracer.output_fns.clear()  # release the graph nodes as soon as the walk is done
    return flags_loss


def _note_loss(loss, loss_state: LossState, tracer) -> None:
    loss_state.value = float(loss.detach().float())  # one sync, after the forward
    loss_state.requires_grad = bool(loss.requires_grad)
    loss_state.grad_fn = type(loss.grad_fn).__name__ if loss.grad_fn is not None else None
    loss_state.is_leaf = loss.requires_grad and loss.grad_fn is None
    if tracer.output is None and not tracer.output_fns:
        loss_state.reaches_output = False  # the model never ran
    elif tracer.output_fns:
        # does the loss depend on any module's output? (the walk stops at the first hit, which for a loss
        # computed by the model is the loss node itself)
        loss_state.reaches_output = loss.grad_fn is not None and _graph_reaches(loss.grad_fn, tracer.output_fns)


def _nonfinite_weights(model, module: str | None) -> list[str]:
    """The parameters of `module` (its own, not its children's) whose values are already NaN/Inf: an earlier
    optimizer step wrote them, so the fault is upstream in time, not in this module's arithmetic."""
    import torch

    if module is None:
        return []
    try:
        owner = model.get_submodule(module)
    except AttributeError:
        return []
    prefix = f"{module}." if module else ""
    return [prefix + n for n, p in owner.named_parameters(recurse=False)
            if p.is_floating_point() and not bool(torch.isfinite(p.detach()).all())]


def _locate_nonfinite(model, batch, loss_fn, names, rng) -> str | None:
    """Re-run the forward (same RNG, no grad) with finiteness checks: the first module whose output is NaN/Inf.

    Only on the failure path, so a healthy probe pays nothing for it.
    """
    import torch

    set_rng_state(rng)
    with Tracer(model, names, finite_checks=True) as tracer, torch.no_grad():
        try:
            loss_fn(model, fresh(batch)) if loss_fn is not None else call_model(model, fresh(batch))
        except Exception:  # the first pass already recorded it
            pass
    tracer.output = tracer.main_output = None
    flagged = [(rec.order, name) for name, rec in tracer.records.items() if rec.finite is not None]
    if not flagged:
        return None
    dev = tracer.records[flagged[0][1]].finite.device
    ok = torch.stack([tracer.records[n].finite.to(dev) for _, n in flagged]).tolist()  # one transfer
    bad = sorted(order for (order, _), fine in zip(flagged, ok) if not fine)
    return next((n for o, n in flagged if o == bad[0]), None) if bad else None


def _describe_exc(exc: BaseException) -> str:
    """One line: the exception's first line, or, where the message opens with a module's multi-line repr
    ("PeftModel(\n  (base_model): ...\n) argument after ** must be a mapping"), the repr folded to its class."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(text) > 1 and first.endswith("(") and text[-1].startswith(")"):
        first = f"{first}...{text[-1]}"
    return f"{type(exc).__name__}: {first}".rstrip(": ")


def _fill_trace(snap: Snapshot, tracer) -> None:
    for m in snap.modules:
        rec = tracer.records.get(m.name)
        m.ran = rec is not None and rec.calls > 0
        if not m.ran:
            continue
        m.calls, m.order = rec.calls, rec.order
        m.in_requires_grad, m.out_requires_grad, m.out_grad_fn = rec.in_rg, rec.out_rg, rec.grad_fn
        m.grad_enabled, m.in_reentrant, m.detached_output = rec.grad_enabled, rec.in_reentrant, rec.detached
        if rec.no_grad_call and rec.no_grad_root:  # where autograd went off, not every module run after it
            snap.no_grad_modules.append(m.name)
            snap.no_grad_callers[m.name] = rec.caller
        if rec.forward_grad_off and not rec.in_reentrant:
            snap.grad_off_forward[m.name] = rec.forward_grad_off
    snap.checkpoints = tracer.checkpoints
    ran = {m.name for m in snap.modules if m.ran}
    for p in snap.params:
        p.used = p.module in ran


def _fill_grads(snap: Snapshot, trainable_params) -> None:
    import torch

    by_name = {p.name: p for p in snap.params}
    # a sharded (FSDP2 DTensor) gradient: this rank's shard; gradflow.distributed combines the shards' norms
    with_grad = [(n, _local(p.grad)) for n, p in trainable_params if p.grad is not None]
    norms = []
    if with_grad:
        dev = with_grad[0][1].device
        # stacked on the device and read back once: a per-parameter .item() would sync hundreds of times
        norms = torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float32).to(dev)
                             if g.is_floating_point() else torch.tensor(float("nan"), device=dev)
                             for _, g in with_grad]).tolist()
    norm_of = {n: v for (n, _), v in zip(with_grad, norms)}
    modules = {m.name: m for m in snap.modules}
    for name, _ in trainable_params:
        state = by_name.get(name)
        if state is None:
            continue
        if name not in norm_of:
            state.grad = "none"
        else:
            v = norm_of[name]
            state.grad_norm = v
            state.grad = "nonfinite" if v != v or v in (float("inf"), float("-inf")) else ("zero" if v == 0 else "ok")
        m = modules.get(state.module)
        if m is not None:
            m.grads[state.grad] = m.grads.get(state.grad, 0) + 1
            if state.grad_norm is not None and state.grad != "nonfinite":
                m.grad_norm = ((m.grad_norm or 0.0) ** 2 + state.grad_norm ** 2) ** 0.5


def _note_zero_valued(snap: Snapshot, trainable_params) -> None:
    """The trainable parameters that are exactly zero and got a nonzero gradient (a gate that starts at zero), read
    only when some zero gradient is not one of LoRA's expected ones: a healthy probe reads no values."""
    import torch

    expected = {p.name for _, _, hit in snap.lora_start_zeros() for p in hit}
    if not any(p.requires_grad and p.grad == "zero" and p.name not in expected for p in snap.params):
        return
    ok = {p.name for p in snap.params if p.grad == "ok"}
    candidates = [(n, _local(t)) for n, t in trainable_params if n in ok and t.is_floating_point()]
    if not candidates:
        return
    dev = candidates[0][1].device
    # stacked and read back once, as the norms are
    zero = torch.stack([(torch.count_nonzero(t.detach()) == 0).to(dev) for _, t in candidates]).tolist()
    snap.zero_valued = [n for (n, _), z in zip(candidates, zero) if z]


def _local(t):
    to_local = getattr(t, "to_local", None)  # torch.distributed.tensor.DTensor
    return to_local() if callable(to_local) else t
