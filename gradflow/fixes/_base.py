"""Shared pieces for fixes: the Fix record, the Plan a fix makes, the Context it plans in, and small helpers."""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, Callable

from gradflow.models import is_peft_model
from gradflow.finding import Applicability

APPLICABILITIES = tuple(a.value for a in Applicability)


@dataclasses.dataclass(frozen=True)
class Fix:
    """One fix: what it answers, how safe it is, and how it plans, applies and prints itself."""

    id: str
    title: str
    applicability: Applicability  # given as its value ("safe") or the member
    answers: tuple[str, ...]  # finding slugs it answers
    plan: Callable  # plan(ctx, finding) -> Plan | list[Plan] | None
    apply: Callable | None = None  # apply(model, data, env) -> list[str] (what changed); None when display-only
    snippet: Callable | None = None  # snippet(data) -> list[str]: the same change as code for the user's script
    doc: str = ""

    def __post_init__(self):
        object.__setattr__(self, "applicability", Applicability(self.applicability))


@dataclasses.dataclass
class Plan:
    """One change a fix proposes: as data (what apply() and the recipe file take) and in words."""

    fix: Fix
    data: dict
    changes: list[str]  # what will change, in words
    why: str  # why this fix, and not the alternative
    answers: list[str]  # slugs of the findings it answers
    location: str | None = None
    applicability: Applicability | None = None  # defaults to the fix's; display-only when it cannot act here
    key: str | None = None  # plans with one key are one change (the input-grad hook asked for by two fixes)
    snippet_lines: list[str] | None = None  # for display-only advice

    def __post_init__(self):
        self.applicability = Applicability(self.applicability or self.fix.applicability)
        if self.key is None:
            self.key = f"{self.fix.id}:{sorted(self.data.items()) if self.data else self.location}"

    def code(self) -> list[str]:
        if self.snippet_lines is not None:
            return list(self.snippet_lines)
        return self.fix.snippet(self.data) if self.fix.snippet else []

    def to_dict(self) -> dict:
        return {"id": self.fix.id, "title": self.fix.title, "applicability": self.applicability,
                "answers": list(self.answers), "location": self.location, "changes": list(self.changes),
                "why": self.why, "data": self.data if self.applicability != "display-only" else None,
                "code": self.code()}


@dataclasses.dataclass
class Env:
    """What apply() may touch besides the model: the probe batch (a cache fix drops past_key_values from it)."""

    batch: Any = None


@dataclasses.dataclass
class Context:
    """What a fix plans from: the model, the batch, the probe's snapshot and the user's intent."""

    model: Any
    batch: Any
    snap: Any  # the Snapshot of the latest probe
    findings: list
    trainable: str | None = None
    optimizer_given: bool = False
    loss_fn: Callable | None = None
    unsafe: bool = False  # unsafe fixes will be applied too

    def doomed(self) -> set[str]:
        """Parameters an unsafe fix of this patch will freeze (no point in moving them into modules_to_save)."""
        if not self.unsafe:
            return set()
        # an info finding is a deliberate modules_to_save copy, which no fix freezes
        return {n for f in self.findings if f.slug == "trainable-embeddings-costly" and f.severity != "info"
                for n in f.params}

    def module_path(self, module) -> str | None:
        for name, m in self.model.named_modules():
            if m is module:
                return name
        return None

    def module_state(self, name):
        return self.snap.module(name) if name is not None else None


# --- helpers shared by fixes ------------------------------------------------------------------------------------


def base_prefix(model) -> str:
    """The path prefix of the transformers model inside a PeftModel ('base_model.model.'), else ''."""
    if not is_peft_model(model):
        return ""
    base = model.get_base_model()
    for name, m in model.named_modules():
        if m is base:
            return name + "." if name else ""
    return ""


def under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def ancestors(name: str):
    """'a.b.c' -> 'a.b', 'a', ''."""
    while name:
        name = name.rsplit(".", 1)[0] if "." in name else ""
        yield name


def where_defined(obj) -> str | None:
    """'file.py:LINE' of a module's forward (or a function), for advice that names the place to edit."""
    target = obj
    if hasattr(obj, "forward") and not inspect.isfunction(obj):
        target = type(obj).forward
    target = inspect.unwrap(target) if callable(target) else target
    try:
        path = inspect.getsourcefile(target)
        _, line = inspect.getsourcelines(target)
    except (TypeError, OSError):
        return None
    if path is None or any(d in path for d in ("site-packages", "dist-packages")):
        return None  # library code (nn.Linear, a transformers layer) is not where the user edits
    try:
        rel = os.path.relpath(path)
        path = rel if not rel.startswith("..") else path
    except ValueError:
        pass
    return f"{path}:{line}"


def describe_module(model, name: str | None) -> str:
    """'name (Class, defined at file:line)' for advice."""
    if name is None:
        return "(unknown module)"
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return name or "the model"
    where = where_defined(module)
    label = name or "the model"
    return f"{label} ({type(module).__name__}{', forward at ' + where if where else ''})"


def bytes_per(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}.get(dtype, 4)


def training_cost(params) -> int:
    """Bytes a trainable parameter set costs: weights + gradients in their dtype, plus AdamW's two fp32 moments."""
    return sum(p.numel * (2 * bytes_per(p.dtype) + 8) for p in params)


def py(s: str) -> str:
    """A string literal for generated code."""
    return repr(s)


def submodule_expr(name: str) -> str:
    return f"model.get_submodule({py(name)})" if name else "model"
