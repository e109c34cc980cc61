"""The architecture, held: gradflow's own imports only run down the layers, and none forms a circle.

The import graph is read with `ast` (nothing is imported or run). Every import counts, at module top or inside a
function: a deferred import of our own module hides a circle, it does not remove one. docs/architecture.md explains
the order; change both together.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gradflow"

# top to bottom; a module may import from its own layer and any layer below it, never above
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("gradflow.cli", "gradflow.__main__")),
    ("training", ("gradflow.training",)),
    ("api", ("gradflow", "gradflow.entries", "gradflow.api", "gradflow.dryrun", "gradflow.distributed",
             "gradflow.testing")),
    ("fixes", ("gradflow.fixes",)),
    ("probing", ("gradflow.probing",)),
    ("rules, report", ("gradflow.rules", "gradflow.report")),
    ("setup", ("gradflow.setup", "gradflow.demos")),
    ("data", ("gradflow.data",)),
    ("base", ("gradflow.errors", "gradflow.finding", "gradflow.choices", "gradflow.limits", "gradflow.models",
              "gradflow.forward", "gradflow.snapshot", "gradflow.world", "gradflow.noise", "gradflow._lazy", "gradflow.model_state",
              "gradflow.files", "gradflow.stdio")),
]
# inside the api layer the facade (gradflow/__init__.py, lazy by name) sits above the modules it names
FACADES = {"gradflow", "gradflow.training"}


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_edges(root: Path = PACKAGE) -> list[tuple[str, str, Path, int, bool]]:
    """(importer, imported, file, line, inside a function) for every import of one of the package's own modules."""
    mods = _modules(root)
    edges = []
    for mod, path in mods.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]

        def visit(node, in_function: bool):
            for child in ast.iter_child_nodes(node):
                targets = []
                if isinstance(child, ast.ImportFrom):
                    base = ".".join(package[: len(package) - child.level + 1]) if child.level else ""
                    name = ".".join(p for p in (base, child.module or "") if p)
                    targets = [f"{name}.{a.name}" if f"{name}.{a.name}" in mods else name for a in child.names]
                elif isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                for target in targets:
                    while target and target not in mods:
                        target = target.rpartition(".")[0]
                    if target and target != mod and not (target == "gradflow" and isinstance(child, ast.ImportFrom)
                                                         and [a.name for a in child.names] == ["__version__"]):
                        edges.append((mod, target, path.relative_to(root.parent), child.lineno, in_function))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

        visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return edges


def layer_of(module: str) -> int:
    best, depth = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module == prefix or (prefix != "gradflow" and module.startswith(prefix + "."))
            if inside and len(prefix) > depth:
                best, depth = i, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return best


def upward(edges) -> list[str]:
    out = []
    for src, dst, path, line, _ in edges:
        if layer_of(dst) < layer_of(src) and src not in FACADES:
            out.append(f"{path}:{line}: {src} ({LAYERS[layer_of(src)][0]}) imports "
                       f"{dst} ({LAYERS[layer_of(dst)][0]}), a layer above it")
    return out


def circles(edges) -> list[str]:
    graph: dict[str, dict[str, str]] = {}
    for src, dst, path, line, _ in edges:
        graph.setdefault(src, {}).setdefault(dst, f"{path}:{line}")
    found, done = [], set()

    def walk(node, trail):
        for nxt, where in graph.get(node, {}).items():
            if nxt in trail:
                loop = trail[trail.index(nxt):] + [nxt]
                key = frozenset(loop)
                if key not in done:
                    done.add(key)
                    found.append(" -> ".join(f"{a} ({graph[a][b]})" for a, b in zip(loop, loop[1:])))
            elif nxt not in seen:
                seen.add(nxt)
                walk(nxt, trail + [nxt])

    for start in sorted(graph):
        seen = {start}
        walk(start, [start])
    return found


def test_every_module_has_a_layer():
    for mod in _modules():
        layer_of(mod)


def test_imports_only_run_down_the_layers():
    bad = upward(import_edges())
    assert not bad, "imports that run up the layers:\n" + "\n".join(bad)


def test_no_import_circles():
    bad = circles(import_edges())
    assert not bad, "import circles:\n" + "\n".join(bad)


def test_own_imports_at_module_top_outside_the_cli():
    # a deferred import of our own module is how circles hid; only the CLI defers (to keep --help torch-free)
    inside = [f"{path}:{line}: {src} imports {dst} inside a function"
              for src, dst, path, line, in_function in import_edges()
              if in_function and layer_of(src) != 0 and src not in FACADES]
    assert not inside, "\n".join(inside)


def test_the_check_catches_an_upward_import(tmp_path):
    """The test above can fail: a copy of the package with one import added up the layers is caught."""
    import shutil

    copy = tmp_path / "gradflow"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    errors = copy / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom gradflow.api import probe  # noqa\n")
    edges = import_edges(copy)
    assert [line for line in upward(edges) if "errors.py" in line] == [
        f"gradflow/errors.py:{len(errors.read_text().splitlines())}: gradflow.errors (base) imports gradflow.api (api), "
        "a layer above it"]
