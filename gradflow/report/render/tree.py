"""The inspect tree: one row per module, identical repeated blocks collapsed, the first cut highlighted."""

from __future__ import annotations

import re

from rich.cells import cell_len
from rich.text import Text

from gradflow.report.render.text import findings_table, summary

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


# When a row is wider than the terminal, its parts give way in this order: details first, then names shortened in
# the middle ("-class", "-name"), then the evidence. The name, the repeat count and the cut marker never do; a cut
# row that does not fit once the details are gone puts its marker on a line of its own, right below it.
_DETAILS = ("grad_fn", "dtypes", "frozen", "quant", "hook", "not-run", "train", "-class")
_EVIDENCE = ("-name", "input-hook", "ckpt", "grads", "out", "--class")
_NAME_MIN, _CLASS_MIN = 8, 12
_MARKER_INDENT = 2  # a marker on its own line starts this far right of its row's name
_MARKER_STYLE = "bold white on red"
_GUIDES = {  # cells per level: (fork, last, continue, space); 4 is rich's Tree, the narrower ones are for small terminals
    4: ("├── ", "└── ", "│   ", "    "),
    3: ("├─ ", "└─ ", "│  ", "   "),
    2: ("├ ", "└ ", "│ ", "  "),
}


def middle(text: str, width: int) -> str:
    """`text` cut to `width` cells in the middle ('Phi3DecoderLayer' → 'Phi3De…Layer'), so both ends stay readable."""
    if cell_len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    head = width // 2
    tail = width - 1 - head
    return text[:head] + "…" + (text[-tail:] if tail else "")


class Row:
    """One tree row as parts, so that a narrow terminal drops details and shortens names, never the cut marker."""

    def __init__(self, node: Node, cut: dict[str, str], traced: bool):
        row = node.row
        self.name = node.label or "(root)"
        self.count = f" ×{node.count}" if node.count > 1 else ""
        self.cls = row["class"]
        self.marker = f"◀ {cut[row['name']]}" if row["name"] in cut else ""
        parts: list[tuple[str, str, Text]] = []  # (kind, separator, text)

        def add(kind, text, style="", sep="  "):
            parts.append((kind, sep, Text(text, style=style)))

        if row["trainable"]:
            add("train", f"train {fmt_count(row['trainable'])}", "green")
        if row["frozen"]:
            add("frozen", f"frozen {fmt_count(row['frozen'])}", "dim")
        if row["quantized"]:
            add("quant", f"quant {fmt_count(row['quantized'])}", "blue")
        if row["dtypes"]:
            add("dtypes", "/".join(row["dtypes"]), "dim")
        if row["checkpointing"] != "off":
            add("ckpt", f"ckpt:{row['checkpointing']}", "magenta")
        hooks = list(row["hooks"])
        for h in dict.fromkeys(hooks):  # the same hook registered twice shows once, with its count
            n = hooks.count(h)
            text = f"hook:{h}" + (f" ×{n}" if n > 1 else "")
            if "require_grad" in h:
                add("input-hook", text, "bold green")
            else:
                add("hook", text, "dim")
        if traced and "ran" in row:
            if not row["ran"]:
                if not _any_ran(node):  # containers (ModuleList) are never called themselves: only their children
                    add("not-run", "not run", "dim")
            else:
                rg = row["out_requires_grad"]
                if rg is not None:
                    out = Text("out:", style="dim")
                    out.append("grad" if rg else "no-grad", style="green" if rg else "red")
                    parts.append(("out", "  ", out))
                    if row.get("grad_fn"):
                        add("grad_fn", row["grad_fn"], "dim", sep=" ")
        grads = row.get("grads")
        if grads:
            add("grads", "grads:" + ",".join(f"{k}={v}" for k, v in sorted(grads.items())),
                "red" if grads.get("none") or grads.get("nonfinite") else "dim")
        self.parts = parts

    def min_width(self) -> int:
        """Cells this row needs however narrow the terminal: its shortened name, and its marker."""
        name = min(cell_len(self.name), _NAME_MIN) + cell_len(self.count)
        return max(name, _MARKER_INDENT + cell_len(self.marker)) if self.marker else name

    def _build(self, name: str, cls: str | None, gone: set, marker: bool) -> Text:
        t = Text(no_wrap=True, overflow="ignore")  # one module, one line: wrapped rows read as children
        t.append(name, style="bold")
        if self.count:
            t.append(self.count, style="bold magenta")
        if cls is not None:
            t.append(f" {cls}", style="dim")
        for kind, sep, part in self.parts:
            if kind not in gone and not (kind == "grad_fn" and "out" in gone):
                t.append(sep)
                t.append_text(part)
        if marker and self.marker:
            t.append("  ")
            t.append(self.marker, style=_MARKER_STYLE)
        return t

    def _fit(self, width: int | None, steps, marker: bool, state=None):
        name, cls, gone = state or (self.name, self.cls, set())
        t = self._build(name, cls, gone, marker)
        for step in steps:
            if width is None or t.cell_len <= width:
                break
            excess = t.cell_len - width
            if step == "-class":
                cls = middle(cls, max(_CLASS_MIN, cell_len(cls) - excess))
            elif step == "--class":
                cls = None
            elif step == "-name":
                if "–" not in name:  # a run 'a–b' is short and must stay whole
                    name = middle(name, max(_NAME_MIN, cell_len(name) - excess))
            else:
                gone.add(step)
            t = self._build(name, cls, gone, marker)
        return t, (name, cls, gone)

    def lines(self, width: int | None = None) -> list[Text]:
        """The row within `width` cells (None: all of it): one line, or two when its cut marker needs its own."""
        t, state = self._fit(width, _DETAILS, marker=True)
        if width is None or t.cell_len <= width or not self.marker:
            return [self._fit(width, _EVIDENCE, marker=bool(self.marker), state=state)[0]]
        main, _ = self._fit(width, _DETAILS + _EVIDENCE, marker=False)
        below = Text(" " * _MARKER_INDENT, no_wrap=True, overflow="ignore")
        below.append(self.marker, style=_MARKER_STYLE)
        return [main, below]


class ModuleTree:
    """The module tree as a renderable that fits the console: rows give way (see _DETAILS), and the guides narrow
    below 4 cells a level when a cut marker would not fit otherwise. Nothing is cut off mid-row."""

    def __init__(self, rows: list[tuple[str, Row]]):
        self.rows = rows  # (guide pattern, row): one of F(ork), L(ast), C(ontinue), S(pace) per level

    def lines(self, width: int | None) -> list[Text]:
        guide = 4
        if width is not None:
            for guide in (4, 3, 2):
                if all(len(p) * guide + row.min_width() <= width for p, row in self.rows):
                    break
        marks = dict(zip("FLCS", _GUIDES[guide]))
        out = []
        for pattern, row in self.rows:
            prefix = "".join(marks[c] for c in pattern)
            # a second line continues the row's own guide: '│' when siblings follow, blank after the last
            below = "".join(marks[c] for c in pattern[:-1] + {"F": "C", "L": "S"}.get(pattern[-1:], ""))
            for i, text in enumerate(row.lines(None if width is None else width - cell_len(prefix))):
                line = Text(prefix if i == 0 else below, no_wrap=True, overflow="ignore")
                line.append_text(text)
                out.append(line)
        return out

    def __rich_console__(self, console, options):
        joined = Text("\n").join(self.lines(options.max_width))
        joined.no_wrap, joined.overflow = True, "ignore"
        yield joined

    def __str__(self) -> str:
        return "\n".join(t.plain for t in self.lines(None))


def render_tree(report, depth: int | None = 4) -> ModuleTree:
    rows = report.modules
    cut = {}
    for f in report.findings:
        if f.location and f.severity in ("error", "warning") and f.location not in cut:
            cut[f.location] = f"{f.code} {f.slug}"
    root = build_nodes(rows)
    collapse(root, set(cut))
    traced = _traced(report)
    out: list[tuple[str, Row]] = [("", Row(root, cut, traced))]

    def level_below(node, level):
        # single-child wrappers (PeftModel → LoraModel → the transformers model) cost no depth, so --depth N
        # shows the same modules with or without an adapter
        return level + 1 if node.fanout > 1 else level

    def add(node, level, pattern):
        """List node's children at `level`, and recurse while within --depth."""
        for i, child in enumerate(node.children):
            last = i == len(node.children) - 1
            out.append((pattern + ("L" if last else "F"), Row(child, cut, traced)))
            nxt = level_below(child, level)
            below = pattern + ("S" if last else "C")
            if depth is None or nxt <= depth:
                add(child, nxt, below)
            elif any(_subtree_has(c, cut) for c in child.children):
                add(child, nxt, below)  # past --depth, expand only on the way down to a highlighted cut

    add(root, level_below(root, 0), "")
    return ModuleTree(out)


def inspect_text(report, *, depth: int | None = 4, static: bool | None = None):
    """What `gradflow inspect` prints: the summary, the module tree, the findings."""
    from rich.console import Group

    if static is None:
        static = not _traced(report)
    # inspect runs no backward, so an empty list proves less than probe-backward's does
    empty = ("no findings (static: the model was not run)" if static
             else "no findings in the forward trace; run probe-backward to check every gradient")
    return Group(summary(report), render_tree(report, depth=depth), findings_table(report.findings, empty=empty))


def _traced(report) -> bool:
    if report.snapshot is not None:
        return bool(report.snapshot.traced)
    return any("ran" in row for row in report.modules)  # a Report without its Snapshot: the rows tell


def _any_ran(node: Node) -> bool:
    return bool(node.row.get("ran")) or any(_any_ran(c) for c in node.children)


def _subtree_has(node: Node, cut) -> bool:
    return node.row["name"] in cut or any(_subtree_has(c, cut) for c in node.children)
