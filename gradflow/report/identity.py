"""A MODEL's identity: one name for the same setup however MODEL is spelled and wherever in the repository gradflow
runs (`sub/setup.py:build`, `./sub/setup.py:build`, its absolute path, or `setup.py:build` from `sub/`).

SARIF fingerprints and baselines identify a finding by its slug, its module and this name, never by the text
typed, so a renamed code or another spelling of the same factory changes nothing.

- a preset: `preset:tiny-llama`; a hub id: `hub:org/name`;
- a factory: `file:<path relative to the repository root>:<function>` when its file is in the repository,
  `installed:<path inside site-packages>:<function>` for an installed package's file (a venv inside the
  repository included), `external:<file name>:<function>` for a file elsewhere, `factory:<as typed>` when it
  cannot be found;
- a directory or config.json: `path:<relative path>` inside the repository, `external:<folder>/<file>` outside;
- no MODEL (a report read back from JSON): `model:<class>`.
"""

from __future__ import annotations

import os

from gradflow.report.render.source_lines import installed_path, module_file, relative_uri
from gradflow.setup.presets import PRESETS


def repository_root(start: str | None = None) -> str:
    """The git top level holding `start` (default: the working directory), else `start` itself."""
    folder = os.path.abspath(start or os.getcwd())
    probe = folder
    while True:
        if os.path.exists(os.path.join(probe, ".git")):  # a folder, or a file in a worktree or submodule
            return probe
        parent = os.path.dirname(probe)
        if parent == probe:
            return folder
        probe = parent


def model_identity(source: str | None, *, root: str | None = None, model_class: str | None = None) -> str:
    """The name of MODEL `source` for identities (see the module docstring); `root`: the repository root."""
    if not source:
        return f"model:{model_class or 'unknown'}"
    if source in PRESETS:
        return f"preset:{source}"
    root = os.path.abspath(root or repository_root())
    if os.path.exists(source):  # a directory or a config file
        return _file_identity(os.path.abspath(source), root, "path")
    target, sep, name = source.rpartition(":")
    if sep and target:
        path = target if target.endswith(".py") else module_file(target)
        if path and os.path.isfile(path):
            return f"{_file_identity(os.path.abspath(path), root, 'file')}:{name}"
        return f"factory:{source}"
    return f"hub:{source}"


def _file_identity(path: str, root: str, kind: str) -> str:
    inside = relative_uri(path, root)
    if inside is not None:
        return f"{kind}:{inside}"
    package = installed_path(path)
    if package is not None:
        return f"installed:{package}"
    name = os.path.basename(path)
    if kind == "path" and not os.path.isdir(path):  # a config file: with its folder's name (`model/config.json`)
        name = f"{os.path.basename(os.path.dirname(path))}/{name}"
    return f"external:{name}"
