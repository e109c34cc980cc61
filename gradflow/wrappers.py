"""FSDP units as plain facts for the Snapshot: read from a wrapped model, or planned for one that FSDP1 will wrap.

FSDP1 (`FullyShardedDataParallel`) checks its units when it wraps: a flat parameter must hold one dtype, and one
`requires_grad` unless `use_orig_params=True`; a bad unit raises at construction. So for FSDP1 the useful facts are
the plan (`plan_fsdp1`): which original parameters each unit will flatten, before wrapping. `fully_shard` (FSDP2)
checks its group's dtypes only at the first forward, so a wrapped model is read as it is (`fsdp_units`).
"""

from __future__ import annotations

from gradflow.errors import GradflowError
from gradflow.snapshot import WrapperFact


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
