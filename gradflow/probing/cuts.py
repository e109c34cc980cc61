"""After the step, where a trainable parameter's gradient path ends: the probe replays the step's forward with the ops
that cut the graph watched (`Tracer(watch_cuts=True)`), only when some trainable parameter got no gradient, and walks
the autograd graph from each module's inputs and outputs to the parameters' AccumulateGrad nodes (or to the tensor a
distributed wrapper ran in a parameter's place)."""

from __future__ import annotations

import contextlib
import contextvars
import sys

from gradflow.forward import call_model, extract_loss, fresh
from gradflow.model_state import ModelState
from gradflow.probing.trace import Tracer
from gradflow.probing.unreached import note_unused
from gradflow.snapshot import Snapshot, ancestors
from gradflow.world import agree_min, is_multi_process

# set by gradflow.distributed.probe: every rank probes the same batch at the same point, so the replay can be
# decided together (one rank's forward alone would leave a wrapper's collectives unmatched)
_LOCKSTEP = contextvars.ContextVar("gradflow_probe_lockstep", default=False)


@contextlib.contextmanager
def in_lockstep():
    """Within: this process's probes run on every rank at once (probe-backward --ddp/--fsdp under torchrun)."""
    token = _LOCKSTEP.set(True)
    try:
        yield
    finally:
        _LOCKSTEP.reset(token)


def should_replay(lost: list) -> bool:
    """Whether to replay the forward: some parameter lost its gradient here, or, in lockstep, on any rank."""
    if _LOCKSTEP.get() and is_multi_process():
        return agree_min(0 if lost else None) is not None  # a collective: every rank replays, or none
    return bool(lost)


def release(tracer) -> None:
    """Drop the autograd nodes and tensors a tracer holds (an unused branch's nodes keep its activations alive)."""
    tracer.records.clear()
    tracer.used.clear()
    tracer.cut_sources.clear()
    tracer.loss_node = None


def replay(model, batch, loss_fn, names, state, trainable_modules, lost):
    """The step's forward again, from the state and RNG streams it started from, with the ops that cut the graph
    watched (Tracer's watch_cuts): the tracer, or None when the replay fails. Only when a trainable parameter got no
    gradient, so a healthy probe pays nothing for the watch. A forward that takes another path for reasons beyond
    the RNG streams (a Python counter, a data-dependent branch on state the step changed) is analysed as replayed."""
    state.restore()  # flags, hooks and RNG as before the step (the user's own gradients come back; none is taken)
    # buffers as the step left them (a BatchNorm's statistics, a step counter): the replay adds nothing to them
    buffers = ModelState(model, modules=(), params=(), buffers=True)
    model.train()
    # a forward with no backward after it: DistributedDataParallel must not wait for one to reduce
    no_sync = getattr(model, "no_sync", None)
    quiet = no_sync() if callable(no_sync) else contextlib.nullcontext()
    try:
        watch: dict[str, list] = {}
        for param, _ in lost:
            # its path below the module that runs it: "weight", or "ia3_l.default" for a ParameterDict's entry
            attr = param.name[len(param.module) + 1:] if param.module else param.name
            watch.setdefault(param.module, []).append((attr, param.name))
        with quiet, Tracer(model, names, trainable_modules=trainable_modules, watch_cuts=True,
                           watch_params=watch) as tracer:
            out = loss_fn(model, fresh(batch)) if loss_fn is not None else call_model(model, fresh(batch))
            tracer.phase = "backward"
            tracer.loss_node = extract_loss(out).grad_fn
    except Exception:  # the first pass ran this step: a replay that differs tells nothing new
        return None
    finally:
        _reshard(names)
        buffers.rewind()
        state.restore()
    del out
    tracer.output = tracer.main_output = None
    tracer.output_fns.clear()
    return tracer


def _reshard(names) -> None:
    """FSDP2 keeps the root's parameters gathered after a forward until its backward; the replay has none, so they
    are sharded again here, as the optimizer and the next step expect them."""
    fsdp_module = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if fsdp_module is None:
        return
    for module in names:
        if isinstance(module, fsdp_module):
            module.reshard()


def fill_cuts(snap: Snapshot, tracer, lost: list, budget: int = 3_000_000) -> None:
    """For each trainable param that ran yet got no gradient, the first module whose outputs lost it.

    A module cuts a parameter when the parameter sits inside it or reaches its inputs through autograd, but none
    of its outputs does: `.detach()`, `.data`, an integer cast or a comparison inside its forward. Params inside
    a reentrant checkpoint's no-grad forward are left to that rule.
    """
    modules = {m.name: m for m in snap.modules}
    bit_of = {id(tensor): 1 << i for i, (_, tensor) in enumerate(lost)}
    stand_ins = []  # what the forward used in a parameter's place (a wrapper's), held while their ids are keys
    for i, (state, _) in enumerate(lost):
        used = tracer.used.get(state.name)
        if used is not None:
            node = used.grad_fn if used.grad_fn is not None else used  # a view's node, or a leaf's AccumulateGrad
            stand_ins.append(node)
            bit_of[id(node)] = bit_of.get(id(node), 0) | 1 << i
    inside: dict[str, int] = {}
    for i, (state, _) in enumerate(lost):
        for prefix in ancestors(state.module):
            inside[prefix] = inside.get(prefix, 0) | (1 << i)
    # modules that ran with autograd on, and those where it went off (a frozen layer run under torch.no_grad cuts
    # what reaches its input); the modules run inside those had no graph to cut
    records = [(modules[name], rec) for name, rec in tracer.records.items()
               if name in modules and not rec.in_reentrant and (rec.grad_enabled or rec.no_grad_root)]
    cut_ops = [s for s in tracer.cut_sources if hasattr(s, "next_functions")]  # autograd nodes, not leaves
    roots = [fn for _, rec in records for fn in rec.in_fns + rec.out_fns] + cut_ops
    barriers: set[str] = set()
    reach = _reachable_params(roots, bit_of, budget, barriers)
    if reach is None:
        return  # too large a graph to walk; the rule falls back to modules whose output has no grad_fn
    unused = note_unused(records, reach, tracer, lost, bit_of, modules, budget)
    first: dict[int, tuple] = {}  # param bit -> (order, module) of the earliest module that cuts it
    for m, rec in records:
        if rec.order is None:
            continue
        out_reach = 0
        for fn in rec.out_fns:
            out_reach |= reach.get(id(fn), 0)
        in_reach = 0
        # parameter-free helpers may drop their input (rotary cos/sin, even under @torch.no_grad); a module with
        # weights that runs with autograd off does cut it
        grad_off = not rec.grad_enabled or rec.forward_grad_off
        if m.trainable or rec.keeps_shape or (grad_off and (m.frozen or m.quantized)):
            for fn in rec.in_fns:
                in_reach |= reach.get(id(fn), 0)
        cut = (in_reach | inside.get(m.name, 0)) & ~out_reach
        while cut:
            low = cut & -cut
            cut ^= low
            if low not in first or rec.order < first[low][0]:
                first[low] = (rec.order, m)
    for i, (state, _) in enumerate(lost):
        hit = None if i in unused else first.get(1 << i)
        if hit is not None:
            hit[1].cut_params.append(state.name)
    if any(state.grad == "zero" for m in snap.modules for state, _ in lost if state.name in m.cut_params):
        snap.zero_derivative_ops = sorted(barriers)


def lost_params(snap: Snapshot, trainable_params) -> list:
    """(state, tensor) of the parameters `Snapshot.without_grad` names, unexplained zero gradients (FSDP1's zero
    entries, a zero-derivative op on the way) included. Among several processes a zero is judged on this rank's
    shard, so zeros count only in lockstep (should_replay agrees across ranks); otherwise a rank would replay alone."""
    tensors = dict(trainable_params)
    zeros = _LOCKSTEP.get() or not is_multi_process()
    return [(state, tensors[state.name]) for state in snap.without_grad(flat_zeros=zeros, zeros=zeros)
            if state.name in tensors]


def flat_zeros_missing(snap: Snapshot) -> None:
    """FSDP1's zeros that are missing gradients (the module never ran, or the replay found the graph cut before them
    or their output unused) are classed as none, as they would be without the flat gradient; the others stay zero
    (lora_A at step 0)."""
    flat = snap.flat_params()
    if not flat:
        return
    cut = {n for m in snap.modules for n in (*m.cut_params, *m.unused_params)}
    modules = {m.name: m for m in snap.modules}
    for state in snap.params:
        if state.name in flat and state.grad == "zero" and (state.name in cut or not state.used):
            state.grad, state.grad_norm = "none", None
            owner = modules.get(state.module)
            if owner is not None:
                owner.grads["zero"] -= 1
                owner.grads["none"] = owner.grads.get("none", 0) + 1


# autograd nodes of ops whose derivative is zero wherever it exists: no gradient passes them (fake quantization or
# binarisation without a straight-through estimator), so the walk stops there as at a .detach()
_ZERO_DERIVATIVE = {"RoundBackward0": "round", "RoundBackward1": "round", "FloorBackward0": "floor",
                    "CeilBackward0": "ceil", "TruncBackward0": "trunc", "SignBackward0": "sign", "SgnBackward0": "sgn"}


def _reachable_params(roots, bit_of: dict, budget: int, barriers: set | None = None) -> dict | None:
    """id(autograd node) -> bitmask of the params (by bit_of) whose AccumulateGrad it reaches, through nodes that
    pass gradient (a zero-derivative op's node reaches nothing; its op name goes into `barriers`); None past
    budget."""
    reach: dict[int, int] = {}
    keep = []  # hold the node wrappers so their ids are not reused during the walk
    visits = 0
    for root in roots:
        if id(root) in reach:
            continue
        stack = [(root, False)]
        while stack:
            node, done = stack.pop()
            key = id(node)
            if done:
                value = bit_of.get(id(getattr(node, "variable", None)), 0) | bit_of.get(key, 0)
                for nxt, _ in node.next_functions:
                    if nxt is not None:
                        value |= reach.get(id(nxt), 0)
                reach[key] = value
                continue
            if key in reach:
                continue
            zero_op = _ZERO_DERIVATIVE.get(type(node).__name__)
            if zero_op is not None:
                reach[key] = 0
                if barriers is not None:
                    barriers.add(zero_op)
                continue
            visits += 1
            if visits > budget:
                return None
            reach[key] = 0  # provisional; the graph is acyclic, so no parent reads it before it is final
            keep.append(node)
            stack.append((node, True))
            for nxt, _ in node.next_functions:
                if nxt is not None and id(nxt) not in reach:
                    stack.append((nxt, False))
    return reach
