"""`probe-backward --ddp|--fsdp` under torchrun: every rank probes, rank 0 prints one gathered report.

Launch with the engines users already run (no launcher of gradflow's own)::

    torchrun --nproc-per-node 2 -m gradflow probe-backward tiny-llama --ddp
    torchrun --nproc-per-node 2 -m gradflow probe-backward tiny-llama --fsdp   # FSDP2 fully_shard

How it works:
- `start()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), initialises the default process group
  (nccl on CUDA, one GPU per local rank; gloo on CPU) before the model is built, so a factory may wrap the model
  itself. On every rank but 0, stdout is sent to /dev/null: rank 0 speaks for the run.
- `probe()` wraps the built model (DDP, or FSDP2 `fully_shard` per decoder layer and at the root) unless the factory
  already returned a `DistributedDataParallel`, then runs gradflow's ordinary probe on the unwrapped module with the
  forward going through the wrapper, so DDP's gradient all-reduce (or FSDP's reduce-scatter) happens as in training.
  Parameter names are those of the unwrapped model.
- Every rank gets the SAME batch (the one `--seed` makes). DDP then averages identical gradients, so the gathered
  report equals a single-process probe of the same setup; a rank that disagrees (a parameter with a gradient on one
  rank and none on another) is listed under "distributed" in the JSON.
- Each rank sends rank 0 (all ranks, in fact: every rank then holds the same report and exit code) its per-parameter
  gradient state and norm. A sharded (DTensor) gradient's norm is the root of the sum of its shards' squared norms;
  a replicated one's is rank 0's. The state follows from the gathered norm: none (no rank holds a gradient),
  nonfinite, zero, ok. The rules then run on the gathered snapshot.

Findings gathered across ranks (train's pre-flight and watch, a Trainer factory's probe): gradflow.report.ranks.
"""

from __future__ import annotations

import math

import gradflow
from gradflow.errors import GradflowError
from gradflow.finding import with_hints
from gradflow.fixes import findings_for
from gradflow.forward import call_model
from gradflow.models import decoder_layers, unwrap
from gradflow.probing.cuts import in_lockstep
from gradflow.report import SECTIONS, build_report
from gradflow.setup.sources import Kind
from gradflow.setup.wrappers import fsdp1_numels, is_fsdp1, unwrap_fsdp1
from gradflow.world import Launch


def is_ddp(model) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def adopt(setup, launch: Launch) -> None:
    """A factory's DDP or FSDP1 wrapper is set aside (the setup holds the module under it); a Trainer is refused."""
    if setup.kind == Kind.TRAINER:
        raise GradflowError(f"--{launch.wrapper} wraps a model, and {setup.source} returns a Trainer",
                            "Return the model (or {'model': ..., 'batch': ...}) from the factory")

    if is_fsdp1(setup.model):
        fsdp1_numels(setup.model)  # refuses use_orig_params=False (and sharding it cannot combine) before the batch
    if is_ddp(setup.model) or is_fsdp1(setup.model):
        launch.wrapped, setup.model = setup.model, unwrap(setup.model)


def wrap(model, launch: Launch):
    """(wrapper to run the forward through, unwrapped module to probe). A DDP or FSDP1 model from a factory is kept."""
    if is_ddp(model) or is_fsdp1(model):
        return model, unwrap(model)
    if launch.wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [launch.local_rank] if launch.device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=ids), model
    from torch.distributed.fsdp import fully_shard

    for module in decoder_layers(model):  # the usual FSDP2 units
        fully_shard(module)
    fully_shard(model)
    return model, model  # FSDP2 shards in place: the module keeps its class and its parameter names


def probe(setup, batch, launch: Launch, *, trainable=None):
    """Probe on every rank, gather the gradient states by parameter name, and return the same Report on all ranks."""
    wrapped, inner = wrap(launch.wrapped if launch.wrapped is not None else setup.model, launch)
    user_loss = setup.loss_fn

    def through_wrapper(_model, b):  # the forward goes through DDP / FSDP so their backward hooks run
        return user_loss(wrapped, b) if user_loss is not None else call_model(wrapped, b)

    numels = fsdp1_numels(wrapped) if is_fsdp1(wrapped) else None  # FSDP1: each rank holds 1-D slices
    # FSDP1 is probed whole, as gradflow.probe does it in one process: its units are known before the step (their
    # zero-filled flat gradients are then checked by the replay); the names are the unwrapped model's afterwards
    trainable = trainable if trainable is not None else setup.trainable
    with in_lockstep():  # every rank probes this batch now: the replay is decided together
        report = gradflow.probe(inner if numels is None else wrapped, batch, loss_fn=through_wrapper,
                                optimizer=setup.optimizer, trainable=trainable)
    if numels is not None:
        unwrap_fsdp1(report.snapshot, wrapped, numels)
    return gather(report, inner, launch, hints=getattr(setup, "hints", None))


def _local_states(report, inner) -> dict:
    """name -> (state, squared norm or None, sharded) for this rank's trainable parameters."""
    sharded = {name: _is_sharded(p) for name, p in inner.named_parameters()}
    # FSDP1 (use_orig_params): every rank holds a slice of each original parameter, and its gradient's slice
    flat = report.snapshot.flat_params()
    out = {}
    for row in report.snapshot.params:
        if not row.requires_grad:
            continue
        sq = None if row.grad_norm is None or not math.isfinite(row.grad_norm) else row.grad_norm ** 2
        out[row.name] = (row.grad, sq, sharded.get(row.name, False) or row.name in flat)
    return out


def _is_sharded(p) -> bool:
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # an older torch: no DTensor
        return False
    return isinstance(p, DTensor) and any(isinstance(pl, Shard) for pl in p.placements)


def merge(per_rank: list[dict]) -> tuple[dict, list[str]]:
    """Per-rank {name: (state, sq_norm, sharded)} -> ({name: (state, norm)}, names whose ranks disagree)."""
    merged, disagree = {}, []
    names = list(per_rank[0])
    for extra in per_rank[1:]:
        names += [n for n in extra if n not in per_rank[0]]
    for name in names:
        rows = [r.get(name) for r in per_rank]
        present = [row for row in rows if row is not None]
        states = [row[0] for row in present]
        sharded = any(row[2] for row in present)
        if not sharded and len(set(states)) > 1:
            disagree.append(name)
        if all(s == "none" for s in states):
            merged[name] = ("none", None)
        elif any(s == "nonfinite" for s in states):
            merged[name] = ("nonfinite", float("nan"))
        else:
            sqs = [row[1] for row in present if row[0] != "none" and row[1] is not None]
            norm = math.sqrt(sum(sqs)) if sharded else math.sqrt(sqs[0])
            merged[name] = ("zero" if norm == 0 else "ok", norm)
    return merged, disagree


def gather(report, inner, launch: Launch, *, hints: dict[str, str] | None = None):
    """All ranks' states -> the gathered Report (rules re-run on it, with a Trainer's `hints`), identical on every
    rank."""
    import torch.distributed as dist

    mine = _local_states(report, inner)
    everyone = [None] * launch.world_size
    dist.all_gather_object(everyone, mine)
    merged, disagree = merge(everyone)
    snap = report.snapshot
    modules = {m.name: m for m in snap.modules}
    for m in modules.values():
        m.grads, m.grad_norm = {}, None
    for row in snap.params:
        if not row.requires_grad or row.name not in merged:
            continue
        row.grad, row.grad_norm = merged[row.name]
        m = modules.get(row.module)
        if m is not None:
            m.grads[row.grad] = m.grads.get(row.grad, 0) + 1
            if row.grad_norm is not None and row.grad != "nonfinite":
                m.grad_norm = ((m.grad_norm or 0.0) ** 2 + row.grad_norm ** 2) ** 0.5
    _unshard_class_names(snap, inner)
    gathered = build_report(snap, with_hints(findings_for(snap), hints), report.command)
    for name in SECTIONS:  # what this rank's probe measured beyond the gradients (none is gathered)
        if getattr(gathered, name) is None:
            setattr(gathered, name, getattr(report, name))
    gathered.distributed = {
        "wrapper": "fsdp1" if is_fsdp1(launch.wrapped) else launch.wrapper,
        "world_size": launch.world_size, "backend": launch.backend,
        "batch": "the same on every rank", "ranks_disagree": disagree[:50], "ranks_disagree_count": len(disagree),
    }
    return gathered


def _unshard_class_names(snap, inner) -> None:
    """FSDP2 swaps each sharded module's class for `FSDP<Class>`: report the model's own class names."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    renamed = {}
    for module in inner.modules():
        if isinstance(module, FSDPModule):
            own = next((c for c in type(module).__mro__[1:] if not issubclass(c, FSDPModule)), None)
            if own is not None:
                renamed[type(module).__name__] = own.__name__
    if not renamed:
        return
    snap.model_class = renamed.get(snap.model_class, snap.model_class)
    for m in snap.modules:
        m.cls = renamed.get(m.cls, m.cls)
