"""FSDP units as plain facts for the Snapshot: read from a wrapped model, or planned for one that FSDP1 will wrap.

FSDP1 (`FullyShardedDataParallel`) checks its units when it wraps: a flat parameter must hold one dtype, and one
`requires_grad` unless `use_orig_params=True`; a bad unit raises at construction. So for FSDP1 the useful facts are
the plan (`plan_fsdp1`): which original parameters each unit will flatten, before wrapping. `fully_shard` (FSDP2)
checks its group's dtypes only at the first forward, so a wrapped model is read as it is (`fsdp_units`).
"""

from __future__ import annotations

from gradflow.errors import GradflowError
from gradflow.snapshot import WrapperFact, count_into_ancestors


def _dtype(d) -> str | None:
    return str(d).replace("torch.", "") if d is not None else None


def _owned(unit: str, units: list[str], names: list[str]) -> list[str]:
    """Parameter names under `unit` and not under a deeper unit among `units`."""
    def inside(name: str, prefix: str) -> bool:
        return prefix == "" or name == prefix or name.startswith(prefix + ".")

    deeper = [u for u in units if u != unit and inside(u, unit)]
    return [n for n in names if inside(n, unit) and not any(inside(n, d) for d in deeper)]


def fsdp_units(modules, param_names: list[str]) -> list[WrapperFact]:
    """The FSDP1 and fully_shard units of an already wrapped model (`modules`: its named_modules())."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return []
    found: list[tuple[str, str, object]] = []
    for name, module in modules:
        if isinstance(module, FSDPModule):
            found.append(("fsdp2", name, module))
        elif isinstance(module, FullyShardedDataParallel):
            found.append(("fsdp1", name, module))
    units = [name for _, name, _ in found]
    facts = []
    for kind, name, module in found:
        if kind == "fsdp2":
            state = module._get_fsdp_state()
            policy = getattr(state, "_mp_policy", None)
            facts.append(WrapperFact("fsdp2", name, _owned(name, units, param_names),
                                     param_dtype=_dtype(getattr(policy, "param_dtype", None))))
        else:
            policy = getattr(module, "mixed_precision", None)
            facts.append(WrapperFact("fsdp1", name, _owned(name, units, param_names),
                                     use_orig_params=bool(getattr(module, "_use_orig_params", False)),
                                     param_dtype=_dtype(getattr(policy, "param_dtype", None))))
    return facts


def plan_fsdp1(model, *, auto_wrap_policy=None, use_orig_params: bool = False, mixed_precision=None,
               ignored_modules=()) -> list[WrapperFact]:
    """The units `FullyShardedDataParallel(model, auto_wrap_policy=..., use_orig_params=...)` would build, before
    wrapping: the root plus every module the policy picks, each owning the parameters no deeper unit takes.

    `auto_wrap_policy`: a torch wrap policy object (ModuleWrapPolicy, CustomPolicy) or a set of module classes.
    """
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy, _Policy

    policy = auto_wrap_policy
    if isinstance(policy, (set, frozenset, list, tuple)):
        policy = ModuleWrapPolicy(set(policy))
    names_of = {module: name for name, module in model.named_modules()}
    if policy is None:
        picked = {}
    elif isinstance(policy, _Policy):
        picked = policy._run_policy(model, set(ignored_modules), {})
    elif callable(policy):  # a function policy (lambda_auto_wrap_policy, peft's fsdp_auto_wrap_policy)
        picked = _run_callable(model, policy, set(ignored_modules))
    else:
        raise GradflowError(f"cannot plan FSDP units for the wrap policy {policy!r}",
                            "pass a ModuleWrapPolicy, a CustomPolicy, a policy function or a set of module classes")
    units = [""] + [names_of[m] for m in picked if m is not model and m in names_of]
    ignored = [names_of[m] for m in ignored_modules if m in names_of]
    param_names = [n for n, _ in model.named_parameters()
                   if not any(n.startswith(i + ".") for i in ignored)]
    dtype = _dtype(getattr(mixed_precision, "param_dtype", None))
    return [WrapperFact("fsdp1", u, _owned(u, units, param_names), use_orig_params=use_orig_params,
                        param_dtype=dtype, planned=True) for u in units]


def _run_callable(root, policy, ignored: set) -> list:
    """The modules torch's `_recursive_wrap` would wrap with a function policy, walked without wrapping anything."""
    ignored_params = {id(p) for m in ignored for p in m.parameters()}
    picked = []

    def walk(module, only_children: bool) -> int:
        numel = sum(p.numel() for p in module.parameters() if id(p) not in ignored_params)
        if not policy(module=module, recurse=True, nonwrapped_numel=numel):
            return 0
        wrapped = sum(walk(child, False) for child in module.children() if child not in ignored)
        if not only_children and policy(module=module, recurse=False, nonwrapped_numel=numel - wrapped):
            picked.append(module)
            return numel
        return wrapped

    walk(root, True)
    return picked


# --- a model the user wrapped in FSDP1 themselves, probed under torchrun (gradflow.distributed) -----------------------
FSDP1_SEGMENT = "_fsdp_wrapped_module"  # the attribute FSDP1 keeps the wrapped module under


def is_fsdp1(model) -> bool:
    """Whether `model` is a `FullyShardedDataParallel` (FSDP1) wrapper."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return False
    return isinstance(model, FullyShardedDataParallel)


def clean_name(name: str) -> str:
    """A module or parameter name under FSDP1 wrappers as the unwrapped model spells it."""
    if FSDP1_SEGMENT not in name:
        return name
    return ".".join(s for s in name.split(".") if s != FSDP1_SEGMENT)


def fsdp1_numels(wrapped) -> dict[int, int]:
    """id(original parameter) -> its full numel, for a model FSDP1 wrapped with `use_orig_params=True`.

    Each rank's original parameters are then 1-D views of its own slice of the flat parameter (possibly empty), so
    their numel is the slice's; the flat parameter keeps the original shapes. Refuses what the gathered report
    cannot combine: a wrapper without `use_orig_params` (per-parameter gradients exist only inside the flat
    gradient), and sharding that does not split each parameter once across all ranks (NO_SHARD, or hybrid sharding
    over more than one replica group), whose slices' norms would be counted several times.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    world = dist.get_world_size() if dist.is_initialized() else 1
    numels: dict[int, int] = {}
    for module in wrapped.modules():
        if not isinstance(module, FullyShardedDataParallel):
            continue
        if not getattr(module, "_use_orig_params", False):
            raise GradflowError("the factory's FullyShardedDataParallel has use_orig_params=False: each unit's "
                                "gradients live in one flat parameter, not per original parameter",
                                "Wrap with FullyShardedDataParallel(..., use_orig_params=True), or use fully_shard "
                                "(FSDP2), to probe it under torchrun")
        strategy = getattr(module, "sharding_strategy", None)
        if world > 1 and (strategy == ShardingStrategy.NO_SHARD or getattr(module, "world_size", world) != world):
            raise GradflowError(f"the factory's FullyShardedDataParallel uses {getattr(strategy, 'name', strategy)}, "
                                "which does not split each parameter once across all ranks",
                                "Probe with sharding_strategy FULL_SHARD or SHARD_GRAD_OP (or with --ddp for "
                                "NO_SHARD)")
        handle = getattr(module, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        if flat is None:  # a unit with no parameters of its own
            continue
        for p, shape in zip(flat._params or [], flat._shapes):
            n = 1
            for s in shape:
                n *= int(s)
            numels[id(p)] = n
    return numels


def unwrap_fsdp1(snap, wrapped, numels: dict[int, int]) -> None:
    """Make the snapshot of `wrapped` (a model under FSDP1 with use_orig_params) read as the unwrapped model's.

    Names lose FSDP1's `_fsdp_wrapped_module` segment and the wrapper modules' own rows go (the module they wrap
    keeps its row); each parameter's numel is the full one, not this rank's slice; module counts and depths follow;
    the first-call order is re-ranked without the wrappers. The FSDP1 units are read off `wrapped` (the root
    included). The probe ran through the root unit (`wrapped` itself), so its replay knew the units and placed the
    cuts; they are renamed like the rest.
    """
    live = {clean_name(n): p for n, p in wrapped.named_parameters(remove_duplicate=False)}
    kept = [m for m in snap.modules if m.cls != "FullyShardedDataParallel"]
    ranked = sorted((m.order, i) for i, m in enumerate(kept) if m.order is not None)
    rank_of = {i: r for r, (_, i) in enumerate(ranked)}
    by_name = {}
    for i, m in enumerate(kept):
        m.name = clean_name(m.name)
        m.depth = 0 if not m.name else m.name.count(".") + 1
        m.order = rank_of.get(i)
        m.trainable = m.frozen = m.quantized = 0
        m.cut_params = [clean_name(n) for n in m.cut_params]
        m.unused_params = [clean_name(n) for n in m.unused_params]
        by_name[m.name] = m
    snap.modules = kept
    if snap.model_class == type(wrapped).__name__:  # the probe ran through the root unit: the model's own class
        snap.model_class = type(wrapped.module).__name__
    for p in snap.params:
        p.name, p.module = clean_name(p.name), clean_name(p.module)
        obj = live.get(p.name)
        if obj is not None and id(obj) in numels:
            p.numel = numels[id(obj)]
        count_into_ancestors(by_name, p)  # the counts rolled up to every ancestor module, as describe does
    snap.no_grad_modules = [clean_name(n) for n in snap.no_grad_modules]
    snap.no_grad_callers = {clean_name(k): clean_name(v) if v is not None else None
                            for k, v in snap.no_grad_callers.items()}
    snap.grad_off_forward = {clean_name(k): v for k, v in snap.grad_off_forward.items()}
    if snap.forward_nonfinite_at is not None:
        snap.forward_nonfinite_at = clean_name(snap.forward_nonfinite_at)
    snap.zero_valued = [clean_name(n) for n in snap.zero_valued]
    snap.nonfinite_weights = [clean_name(n) for n in snap.nonfinite_weights]
    for flip in snap.flips:
        flip.params = [clean_name(n) for n in flip.params]
        flip.module = clean_name(flip.module) if flip.module is not None else None
    for call in snap.checkpoints:
        call.location = clean_name(call.location) if call.location is not None else None
        call.caller = clean_name(call.caller) if call.caller is not None else None
        call.modules = [clean_name(n) for n in call.modules]
    units = fsdp_units(list(wrapped.named_modules()), [n for n, _ in wrapped.named_parameters()])
    for unit in units:
        unit.module, unit.params = clean_name(unit.module), [clean_name(n) for n in unit.params]
    snap.wrappers = units
