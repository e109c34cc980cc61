"""The report as JSON at a chosen detail (gradflow/report/report.schema.json describes it).

`compact` (the default) keeps what a CI job or a dashboard reads: the summary counts, the findings, a per-layer
gradient roll-up, and the module rows the inspect tree shows at depth 3 (down to each decoder layer) plus the way
down to every finding's location. `params` adds every module row and one row per trainable parameter: on a
32-layer model with LoRA that is ~1,700 module rows and 256 parameter rows, most of the bytes.
"""

from __future__ import annotations

from gradflow.report.render.text import layer_groups

# root → model → layers → layers.N; single-child wrappers (PeftModel, LoraModel) cost no depth, as in inspect
COMPACT_DEPTH = 3
COMPACT_FINDING_PARAMS = 50  # parameter names a finding lists in compact JSON; params_count has them all


def module_rows(rows: list[dict], locations, depth: int | None = COMPACT_DEPTH) -> list[dict]:
    """The rows `inspect --depth depth` lists (uncollapsed), plus each location in `locations` and its ancestors.

    Rows come in named_modules order, so a parent precedes its children. A module with one child (PeftModel →
    LoraModel → the transformers model) costs no depth, as in the tree, so an adapter does not hide a level.
    """
    if depth is None or not rows:
        return list(rows)
    parent = {row["name"]: _parent(row["name"]) for row in rows}
    fanout: dict[str, int] = {}
    for name, up in parent.items():
        if up is not None:
            fanout[up] = fanout.get(up, 0) + 1
    keep = set()
    for loc in locations:
        while loc is not None and loc in parent:
            keep.add(loc)
            loc = parent[loc]
    below: dict[str, int] = {}  # the level a listed, expanded module's children are listed at
    shown = []
    for row in rows:
        name = row["name"]
        up = parent[name]
        if up is None:  # the root: always listed and expanded
            below[name] = 1 if fanout.get(name, 0) > 1 else 0
            shown.append(row)
            continue
        level = below.get(up)
        listed = level is not None  # its parent is listed and expanded
        if listed:
            nxt = level + (1 if fanout.get(name, 0) > 1 else 0)
            if nxt <= depth:
                below[name] = nxt
        if listed or name in keep:
            shown.append(row)
    return shown


def _parent(name: str) -> str | None:
    if name == "":
        return None
    return name.rsplit(".", 1)[0] if "." in name else ""


def per_layer(per_param: list[dict]) -> list[dict]:
    """Gradient norm and grad-class counts per decoder layer (or top-level module), in model order."""
    return [{"layer": key, "grad_norm": norm, "grads": dict(sorted(counts.items()))}
            for key, norm, counts in layer_groups(per_param)]


def params_section(params: dict, *, full: bool) -> dict:
    """The `params` object: counts and the per-layer roll-up; each trainable parameter's row only when `full`."""
    out = {k: v for k, v in params.items() if k != "per_param"}
    rows = params.get("per_param") or []
    if rows or "per_layer" not in out:  # a report read back from compact JSON keeps the roll-up it was given
        out["per_layer"] = per_layer(rows) if rows else []
    if full:  # NaN/Inf are not JSON: a non-finite gradient's norm is null (its grad class says nonfinite)
        out["per_param"] = [{**r, "grad_norm": r["grad_norm"] if _finite(r.get("grad_norm")) else None} for r in rows]
    return out


def _finite(value) -> bool:
    import math

    return value is not None and math.isfinite(value)
