"""The inspect tree: one row per module, identical repeated blocks collapsed, the first cut highlighted."""

from __future__ import annotations

import re

from rich.text import Text
from rich.tree import Tree

_NUM = re.compile(r"^\d+$")


class Node:
    __slots__ = ("row", "children", "label", "count", "fanout")

    def __init__(self, row):
        self.row = row
        self.children: list[Node] = []
        self.label = row["name"].rsplit(".", 1)[-1] if row["name"] else ""
        self.count = 1
        self.fanout = 0  # children before collapsing: a wrapper (one child) does not use up --depth


def build_nodes(rows: list[dict]) -> Node:
    by_name = {}
    root = None
    for row in rows:
        node = Node(row)
        by_name[row["name"]] = node
        if row["name"] == "":
            root = node
            continue
        parent = row["name"].rsplit(".", 1)[0] if "." in row["name"] else ""
        by_name[parent].children.append(node)
        by_name[parent].fanout += 1
    return root


_STATE_KEYS = ("class", "trainable", "frozen", "quantized", "dtypes", "hooks", "checkpointing", "ran",
               "out_requires_grad", "grad_fn", "in_reentrant_checkpoint")


def signature(node: Node, cut: set[str]) -> tuple:
    """What must match for two sibling blocks to share one row (names excluded)."""
    own = tuple(_freeze(node.row.get(k)) for k in _STATE_KEYS)
    grads = tuple(sorted((node.row.get("grads") or {}).items()))
    return (own, grads, node.row["name"] in cut, tuple((c.label, signature(c, cut)) for c in node.children))


def _freeze(v):
    return tuple(v) if isinstance(v, list) else v


def collapse(node: Node, cut: set[str]) -> None:
    """Merge runs of numbered siblings with identical subtrees into one node 'a–b ×n'."""
    for child in node.children:
        collapse(child, cut)
    merged: list[Node] = []
    for child in node.children:
        prev = merged[-1] if merged else None
        if (prev is not None and _NUM.match(child.label) and _NUM.match(prev.label.split("–")[0])
                and signature(prev, cut) == signature(child, cut)):
            first = prev.label.split("–")[0]
            prev.count += 1
            prev.label = f"{first}–{child.label}"
        else:
            merged.append(child)
    node.children = merged


def fmt_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def label(node: Node, cut: dict[str, str], traced: bool) -> Text:
    row = node.row
    t = Text(no_wrap=True, overflow="ignore")  # one module, one line: wrapped rows read as children
    name = node.label or "(root)"
    t.append(name, style="bold")
    if node.count > 1:
        t.append(f" ×{node.count}", style="bold magenta")
    t.append(f" {row['class']}", style="dim")
    counts = []
    if row["trainable"]:
        counts.append(Text(f"train {fmt_count(row['trainable'])}", style="green"))
    if row["frozen"]:
        counts.append(Text(f"frozen {fmt_count(row['frozen'])}", style="dim"))
    if row["quantized"]:
        counts.append(Text(f"quant {fmt_count(row['quantized'])}", style="blue"))
    for c in counts:
        t.append("  ")
        t.append_text(c)
    if row["dtypes"]:
        t.append("  " + "/".join(row["dtypes"]), style="dim")
    if row["checkpointing"] != "off":
        t.append(f"  ckpt:{row['checkpointing']}", style="magenta")
    for h in row["hooks"]:
        style = "bold green" if "require_grad" in h else "dim"
        t.append(f"  hook:{h}", style=style)
    if traced and "ran" in row:
        if not row["ran"]:
            if not _any_ran(node):  # containers (ModuleList) are never called themselves: only their children
                t.append("  not run", style="dim")
        else:
            rg = row["out_requires_grad"]
            if rg is not None:
                t.append("  out:", style="dim")
                t.append("grad" if rg else "no-grad", style="green" if rg else "red")
                if row.get("grad_fn"):
                    t.append(f" {row['grad_fn']}", style="dim")
    grads = row.get("grads")
    if grads:
        t.append("  grads:" + ",".join(f"{k}={v}" for k, v in sorted(grads.items())),
                 style="red" if grads.get("none") or grads.get("nonfinite") else "dim")
    if row["name"] in cut:
        t.append(f"  ◀ {cut[row['name']]}", style="bold white on red")
    return t


def render_tree(report, depth: int | None = 4) -> Tree:
    rows = report.modules
    cut = {}
    for f in report.findings:
        if f.location and f.severity in ("error", "warning") and f.location not in cut:
            cut[f.location] = f"{f.code} {f.slug}"
    root = build_nodes(rows)
    collapse(root, set(cut))
    traced = bool(report.snapshot is not None and report.snapshot.traced)
    tree = Tree(label(root, cut, traced))

    def level_below(node, level):
        # single-child wrappers (PeftModel → LoraModel → the transformers model) cost no depth, so --depth N
        # shows the same modules with or without an adapter
        return level + 1 if node.fanout > 1 else level

    def add(parent_tree, node, level):
        """List node's children at `level`, and recurse while within --depth."""
        for child in node.children:
            branch = parent_tree.add(label(child, cut, traced))
            nxt = level_below(child, level)
            if depth is None or nxt <= depth:
                add(branch, child, nxt)
            elif any(_subtree_has(c, cut) for c in child.children):
                add(branch, child, nxt)  # past --depth, expand only on the way down to a highlighted cut

    add(tree, root, level_below(root, 0))
    return tree


def _any_ran(node: Node) -> bool:
    return bool(node.row.get("ran")) or any(_any_ran(c) for c in node.children)


def _subtree_has(node: Node, cut) -> bool:
    return node.row["name"] in cut or any(_subtree_has(c, cut) for c in node.children)
