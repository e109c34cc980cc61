"""Lazy attributes for packages whose public names live in heavy modules (torch, transformers)."""

from __future__ import annotations

import importlib


def lazy_getattr(package: str, table: dict[str, tuple[str, str]]):
    """A module-level `__getattr__` that imports `table[name] = (module, attr)` on first use and caches it."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name):
        if name in table:
            module, attr = table[name]
            value = getattr(importlib.import_module(module), attr)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
