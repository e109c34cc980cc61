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
    out, done = [], set()
    for pos, item in enumerate(items):
        hit = emap.real_indices(name_of(item))
        if hit is None:
            out.append(item)
            continue
        i, _, _ = hit
        container = ".".join(name_of(item).split(".")[:i])
        if container in done:
            continue
        done.add(container)
        block = [(it, emap.real_indices(name_of(it))) for it in items[pos:]
                 if name_of(it).startswith(container + ".")]
        for k in range(emap.real):
            out.extend(renamed(it, _with_index(name_of(it), h[0], k))
                       for it, h in block if h is not None and h[1] == k % emap.twin)
    return out


def _with_index(name: str, i: int, k: int) -> str:
    segs = name.split(".")
    segs[i] = str(k)
    return ".".join(segs)


def expand_snapshot(snap, emap: ExpertMap | None) -> None:
    """Put the real model's expert entries into `snap`'s parameters and modules (counts are the caller's to redo)."""
    if emap is None or not emap.containers or emap.real <= emap.twin:
        return
    snap.params = expand(snap.params, lambda p: p.name, lambda p, n: _param_copy(p, n, emap), emap)
    snap.modules = expand(snap.modules, lambda m: m.name, lambda m, n: _module_copy(m, n, emap), emap)
    for call in snap.checkpoints:
        call.modules = [n for m in call.modules for n in _names(m, emap)]


def _names(name: str, emap: ExpertMap) -> list[str]:
    hit = emap.real_indices(name)
    return [name] if hit is None else [_with_index(name, hit[0], k) for k in hit[2]]


def _param_copy(p, name: str, emap: ExpertMap):
    q = copy.copy(p)
    q.name = name
    q.module = _same_index(p.module, p.name, name)
    return q


def _module_copy(m, name: str, emap: ExpertMap):
    q = copy.copy(m)
    q.name = name
    q.grads = dict(m.grads)
    q.cut_params = [_same_index(c, m.name, name) for c in m.cut_params]
    return q


def _same_index(other: str, old: str, new: str) -> str:
    """`other` (a name under the same expert as `old`) moved to the expert index `new` has."""
    a, b, o = old.split("."), new.split("."), other.split(".")
    diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if diff is None or len(o) <= diff or o[:diff + 1] != a[:diff + 1]:
        return other
    o[diff] = b[diff]
    return ".".join(o)
