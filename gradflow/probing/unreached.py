"""After the backward: trainable parameters whose module ran but whose outputs never reach the loss, and
requires_grad flags switched off during the step. Both run only when some trainable parameter got no gradient."""

from __future__ import annotations

from gradflow.snapshot import FlagFlip, Snapshot, ancestors


def nodes_below(root, budget: int) -> set[int] | None:
    """ids of the autograd nodes reachable from `root` (the loss's grad_fn); None past `budget` nodes."""
    seen: set[int] = set()
    keep = []  # hold the wrappers so that their ids are not reused during the walk
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        if len(seen) >= budget:
            return None
        seen.add(id(node))
        keep.append(node)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return seen


def note_unused(records, reach: dict, tracer, lost, bit_of: dict, modules: dict, budget: int) -> dict[int, str]:
    """unused_outputs for the tracer's cut ops and loss, each found parameter added to its module's unused_params."""
    cut_mask = 0  # the lost params whose path an op of the forward cut (.detach(), .data, a comparison)
    for source in tracer.cut_sources:
        cut_mask |= reach.get(id(source), 0) if hasattr(source, "next_functions") else bit_of.get(id(source), 0)
    unused = unused_outputs(records, reach, tracer.loss_node, lost, cut_mask, budget)
    for i, module in unused.items():
        modules[module].unused_params.append(lost[i][0].name)
    return unused


def unused_outputs(records, reach: dict, loss_node, lost, cut_mask: int, budget: int) -> dict[int, str]:
    """Index in `lost` -> the outermost module holding that parameter which ran with autograd on, whose output
    depends on it, and none of whose outputs reaches the loss: computed, then not used. Parameters whose path an
    op of the forward cut (`cut_mask`: .detach(), .data, a comparison) are left to graph-break."""
    if loss_node is None:
        return {}
    live = nodes_below(loss_node, budget)
    if live is None:
        return {}
    dead: dict[str, int] = {}  # module -> the lost params its outputs depend on
    ran = set()
    for m, rec in records:
        ran.add(m.name)
        if rec.grad_enabled and not rec.forward_grad_off and rec.out_fns and \
                not any(id(fn) in live for fn in rec.out_fns):
            mask = 0
            for fn in rec.out_fns:
                mask |= reach.get(id(fn), 0)
            dead[m.name] = mask
    # a dead module that holds a live one (an encoder whose returned output is unused, though its first layers'
    # outputs reach the loss through hidden_states) is not the unused branch: the branch ends below it
    holds_live = set()
    for name in ran - set(dead):
        holds_live.update(ancestors(name))
    found: dict[int, str] = {}
    for i, (state, _) in enumerate(lost):
        bit = 1 << i
        if cut_mask & bit:
            continue
        best = None
        for name in ancestors(state.module):
            if name in dead and name not in holds_live:
                best = name if dead[name] & bit else best
            elif name in ran:
                break  # a module that ran and reaches the loss (or holds one that does): the dead branch ends below
        if best is not None:
            found[i] = best
    return found


def note_flips(snap: Snapshot, tracer, trainable_params, flags_loss: list[bool], adapters_after) -> None:
    """Trainable parameters (on before the step) whose requires_grad was off after the forward or after the loss."""
    flags_forward = tracer.flags_forward if tracer.flags_forward is not None else flags_loss
    off_forward = [n for (n, _), on in zip(trainable_params, flags_forward) if not on]
    off_loss = [n for (n, _), on in zip(trainable_params, flags_loss) if not on]
    names = list(dict.fromkeys(off_forward + off_loss))
    if not names:
        return
    before = tuple(snap.active_adapters)
    after = tuple(adapters_after or ())
    module, via = tracer.flip_at if tracer.flip_at is not None else (None, None)
    flags_start, disabled = tracer.flags_start if tracer.flags_start is not None else (None, False)
    off_start = flags_start is not None and not all(flags_start)
    if before and after and before != after:
        via = "set_adapter"
    elif off_start and disabled:  # PEFT's disable_adapter() freezes the adapter weights while it is active
        via = "disable_adapter"
    phase = "before_forward" if off_start else "forward" if off_forward else "loss"
    snap.flips.append(FlagFlip(params=names, phase=phase, module=module, via=via,
                               adapters_before=before, adapters_after=after,
                               toggled=bool(off_forward) and not off_loss))

