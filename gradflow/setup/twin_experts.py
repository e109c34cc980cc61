"""Fewer experts in the dry run's twin, and the real model's expert names and counts extrapolated back.

A mixture-of-experts config (Mixtral's num_local_experts, Qwen-MoE's num_experts, DeepSeek's n_routed_experts) builds
E experts per layer. Every expert is the same module at the same width, so the toy twin keeps TWIN_EXPERTS of them
(top-k cut to fit). What the report says is the real model's:
- sizes: the full-width model is built on the meta device with TWIN_EXPERTS and TWIN_EXPERTS + 1 experts; every
  parameter's numel (and every linear's in/out features, for LoRA shapes) is linear in the expert count, so the two
  builds give it at E experts (a fused experts tensor, the router's E outputs, a per-expert bias);
- names: where experts are a ModuleList (transformers 4.x: `experts.127.down_proj`), the twin's expert j stands for
  the real experts k with k % TWIN_EXPERTS == j. Its parameter and module entries are copied under each real index,
  in the real order, with the class of gradient the twin's expert got.
"""

from __future__ import annotations

import copy
import dataclasses

TWIN_EXPERTS = 2
# the number of routed experts per MoE layer, by config field; and top-k / group routing that must fit in them
EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOPK_FIELDS = ("num_experts_per_tok", "moe_topk")
GROUP_FIELDS = ("n_group", "topk_group")  # DeepSeek's group-limited routing: one group of the twin's experts


def _int(cfg, name):
    value = getattr(cfg, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def expert_count(cfg) -> int | None:
    """Routed experts per layer in `cfg` (or its text_config), None for a dense model."""
    for c in (cfg, getattr(cfg, "text_config", None)):
        for name in EXPERT_FIELDS:
            n = _int(c, name) if c is not None else None
            if n:
                return n
    return None


def with_experts(cfg, n: int):
    """A copy of `cfg` with `n` routed experts per layer (top-k and routing groups cut to fit); `cfg` is left as is."""
    cfg = copy.deepcopy(cfg)
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is None:
            continue
        for name in EXPERT_FIELDS:
            if _int(c, name):
                setattr(c, name, n)
        for name in TOPK_FIELDS:
            if _int(c, name):
                setattr(c, name, min(getattr(c, name), n))
        for name in GROUP_FIELDS:
            if _int(c, name):
                setattr(c, name, 1)
    return cfg


@dataclasses.dataclass
class ExpertMap:
    """How the twin's experts stand for the real model's: `real` experts per layer, `twin` kept."""

    real: int
    twin: int
    containers: frozenset[str] = frozenset()  # module paths of expert ModuleLists (their children are indexed)

    def real_indices(self, name: str) -> tuple[int, int, list[int]] | None:
        """(segment position, twin index, real indices) for a name under an expert ModuleList, else None."""
        segs = name.split(".")
        start = 2 if segs[:2] == ["base_model", "model"] else 0
        for i in range(start + 1, len(segs)):
            if segs[i].isdigit() and ".".join(segs[start:i]) in self.containers:
                j = int(segs[i])
                return i, j, list(range(j, self.real, self.twin))
        return None


def extrapolate(at_twin: dict, at_next: dict, twin: int, real: int) -> dict:
    """Values (ints or tuples of ints) linear in the expert count, known at `twin` and `twin + 1`, taken to `real`."""
    out = {}
    for key, a in at_twin.items():
        b = at_next.get(key, a)
        if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
            out[key] = tuple(x + (y - x) * (real - twin) for x, y in zip(a, b))
        elif isinstance(a, int) and isinstance(b, int):
            out[key] = a + (b - a) * (real - twin)
        else:
            out[key] = a
    return out


def containers(modules_twin: list[str], modules_next: list[str], twin: int) -> frozenset[str]:
    """Paths of expert ModuleLists: where the build with one more expert gained a child named `twin`."""
    have = set(modules_twin)
    suffix = f".{twin}"
    return frozenset(n[:-len(suffix)] for n in modules_next if n not in have and n.endswith(suffix))


def expand(items: list, name_of, renamed, emap: ExpertMap | None) -> list:
    """`items` (parameter or module states, in the twin's order) with each expert's entries repeated for every real
    expert it stands for, in the real model's order (expert 0's block, then 1's, ...)."""
    if emap is None or not emap.containers or emap.real <= emap.twin:
        return items
    out, pos = [], 0
    while pos < len(items):
        name = name_of(items[pos])
        hit = emap.real_indices(name)
        if hit is None:
            out.append(items[pos])
            pos += 1
            continue
        # the container's contiguous block: every twin expert's entries, each as (item, the name after the index)
        container = ".".join(name.split(".")[:hit[0]]) + "."
        groups: dict[int, list] = {}
        while pos < len(items) and name_of(items[pos]).startswith(container):
            index, _, rest = name_of(items[pos])[len(container):].partition(".")
            groups.setdefault(int(index), []).append((items[pos], "." + rest if rest else ""))
            pos += 1
        for k in range(emap.real):
            prefix = container + str(k)
            out.extend(renamed(item, prefix + rest, prefix) for item, rest in groups.get(k % emap.twin, ()))
    return out


def expand_snapshot(snap, emap: ExpertMap | None) -> None:
    """Put the real model's expert entries into `snap`'s parameters and modules (counts are the caller's to redo)."""
    if emap is None or not emap.containers or emap.real <= emap.twin:
        return
    snap.params = expand(snap.params, _name, _param_copy, emap)
    snap.modules = expand(snap.modules, _name, _module_copy, emap)
    for call in snap.checkpoints:
        call.modules = [n for m in call.modules for n in _names(m, emap)]


def _name(item) -> str:
    return item.name


def _names(name: str, emap: ExpertMap) -> list[str]:
    hit = emap.real_indices(name)
    if hit is None:
        return [name]
    segs = name.split(".")
    return [".".join([*segs[:hit[0]], str(k), *segs[hit[0] + 1:]]) for k in hit[2]]


def _param_copy(p, name: str, prefix: str):
    """A copy of `p` named `name`; `prefix` is the real expert's path (container.k)."""
    q = object.__new__(type(p))
    q.__dict__ = {**p.__dict__, "name": name, "module": _moved(p.module, prefix)}
    return q


def _module_copy(m, name: str, prefix: str):
    q = object.__new__(type(m))
    q.__dict__ = {**m.__dict__, "name": name, "grads": dict(m.grads),
                  "cut_params": [_moved(c, prefix) for c in m.cut_params] if m.cut_params else []}
    return q


def _moved(name: str, prefix: str) -> str:
    """`name`, under the twin's expert at the same container as `prefix` (container.j...), moved to container.k."""
    container = prefix[:prefix.rindex(".") + 1]
    if not name.startswith(container):
        return name
    _, dot, rest = name[len(container):].partition(".")
    return prefix + dot + rest
