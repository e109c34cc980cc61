"""Report and Finding: what gradflow hands back, and exactly the JSON the CLI prints."""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any
from gradflow.errors import GradflowError
from gradflow.report.render import renderable, to_text
from gradflow.report.render.json_report import COMPACT_DEPTH, COMPACT_FINDING_PARAMS, module_rows, params_section

SCHEMA_VERSION = 1
SEVERITIES = ("info", "warning", "error")


class Applicability(str, enum.Enum):
    """How a fix may be applied: the one definition rules, fixes and reports use (it compares equal to its value)."""

    SAFE = "safe"  # applied by default: it changes no training outcome the user chose
    UNSAFE = "unsafe"  # applied only with --unsafe-fixes: it can change what the model learns
    DISPLAY_ONLY = "display-only"  # printed as code to paste: the cause is in the user's own code

    def __str__(self) -> str:
        return self.value


class Detail(str, enum.Enum):
    """How much a report's JSON holds (`--detail`); see gradflow.report.render.json_report."""

    COMPACT = "compact"  # counts, findings, per-layer gradients, module rows down to each decoder layer
    PARAMS = "params"  # also every module row and every trainable parameter's gradient

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value) -> "Detail":
        try:
            return cls(value)
        except ValueError:
            raise GradflowError(f"--detail {value!r} is not one of compact, params", "Pick one of those") from None


@dataclasses.dataclass
class Fix:
    title: str
    applicability: Applicability


@dataclasses.dataclass
class Finding:
    code: str
    slug: str
    severity: str
    message: str
    location: str | None = None
    fix: Fix | None = None
    params: list[str] = dataclasses.field(default_factory=list)  # the parameters it concerns

    def to_dict(self, limit: int | None = 50) -> dict:
        """The finding as JSON: the first `limit` parameter names it concerns (None: all), and how many there are."""
        return {"code": self.code, "slug": self.slug, "severity": self.severity, "message": self.message,
                "location": self.location,
                "fix": {"title": self.fix.title, "applicability": str(self.fix.applicability)} if self.fix else None,
                "params": self.params[:limit], "params_count": len(self.params)}


def severity_rank(severity: str) -> int:
    return SEVERITIES.index(severity)


@dataclasses.dataclass
class Report:
    """The outcome of inspect / probe / patch. `to_dict()` is the CLI's JSON."""

    command: str
    model: dict
    loss: dict | None
    params: dict
    modules: list[dict]
    findings: list[Finding]
    snapshot: Any = dataclasses.field(default=None, repr=False)  # the Snapshot it came from (not serialised)
    before: "Report | None" = None
    after: "Report | None" = None
    fixes_applied: list[dict] = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)

    def worst(self) -> str | None:
        ranks = [severity_rank(f.severity) for f in self.findings]
        return SEVERITIES[max(ranks)] if ranks else None

    def fails(self, fail_on: str) -> bool:
        """True when some finding is at or above `fail_on` (error | warning | never). Info never fails."""
        if fail_on == "never":
            return False
        floor = severity_rank(fail_on)
        return any(severity_rank(f.severity) >= floor and f.severity != "info" for f in self.findings)

    def slugs(self) -> list[str]:
        return [f.slug for f in self.findings]

    def render(self, *, width: int | None = None, color: bool | None = None, depth: int | None = 4) -> str:
        """The text the CLI prints for this report's command (inspect tree, probe summary, patch before/after).

        Args:
            width: columns to fit; by default $COLUMNS, else the terminal's width, else 80.
            color: ANSI styles; by default only when stdout is a terminal (and NO_COLOR is unset).
            depth: module-tree depth for an inspect report, as `inspect --depth`.

        Returns:
            The report as text, one line per row, ending in a newline.
        """
        return to_text(self, width=width, color=color, depth=depth)

    def __str__(self) -> str:
        return self.render()

    def __rich__(self):
        # rich.print(report) and rich consoles get the styled renderable itself, fitted to their width

        return renderable(self)

    def to_dict(self, detail: "Detail | str" = "compact") -> dict:
        """The CLI's JSON (docs/report.schema.json).

        Args:
            detail: "compact" (default): counts, findings, a per-layer gradient roll-up, and the module rows down to
                each decoder layer (plus the way to every finding's location). "params": every module row and
                every trainable parameter's gradient too (`--detail params`).
        """
        from gradflow import __version__

        detail = Detail.parse(detail)
        full = detail is Detail.PARAMS
        data = {
            "schema_version": SCHEMA_VERSION, "gradflow_version": __version__, "command": self.command,
            "detail": detail.value, "model": self.model, "loss": self.loss,
            "params": params_section(self.params, full=full),
            "modules": module_rows(self.modules, [f.location for f in self.findings if f.location],
                                   depth=None if full else COMPACT_DEPTH),
            "modules_total": len(self.modules),
            "findings": [f.to_dict(limit=None if full else COMPACT_FINDING_PARAMS) for f in self.findings],
        }
        if self.before is not None or self.after is not None:
            data["before"] = self.before.to_dict(detail) if self.before else None
            data["after"] = self.after.to_dict(detail) if self.after else None
            data["fixes_applied"] = self.fixes_applied
        data.update(self.extra)
        return data


def build_report(snap, findings: list[Finding], command: str) -> Report:
    """Turn a Snapshot and its findings into a Report."""
    trainable = [p for p in snap.params if p.requires_grad]
    counts = {"trainable": len(trainable), "with_grad": 0, "none_grad": 0, "zero_grad": 0, "nonfinite_grad": 0}
    if snap.probed:
        for p in trainable:
            key = {"ok": "with_grad", "none": "none_grad", "zero": "zero_grad", "nonfinite": "nonfinite_grad"}[p.grad]
            counts[key] += 1
        counts["with_grad"] += counts["zero_grad"] + counts["nonfinite_grad"]  # a zero or NaN grad is still a grad
    else:
        for key in ("with_grad", "none_grad", "zero_grad", "nonfinite_grad"):
            counts[key] = None
    counts["trainable_numel"] = sum(p.numel for p in trainable)
    model = {
        "class": snap.model_class,
        "params_total": sum(p.numel for p in snap.params),
        "params_trainable": counts["trainable_numel"],
        "quantized": snap.quantized,
        "peft": snap.is_peft,
        "adapters": list(snap.adapter_names),
        "gradient_checkpointing": snap.gc_mode,
        "input_grad_hook": snap.input_grad_hook,
        "use_cache": snap.use_cache,
    }
    loss = None
    if snap.loss is not None:
        loss = dataclasses.asdict(snap.loss)
        if loss["value"] is not None and not math.isfinite(loss["value"]):
            loss["value"] = None  # NaN/Inf are not JSON; nonfinite-grad / no-supervised-tokens say why
    modules = [_module_row(m) for m in snap.modules]
    params = dict(counts)
    params["per_param"] = [
        {"name": p.name, "module": p.module, "numel": p.numel, "dtype": p.dtype, "grad": p.grad,
         "grad_norm": p.grad_norm}
        for p in trainable
    ] if snap.probed else []
    return Report(command=command, model=model, loss=loss, params=params, modules=modules,
                  findings=findings, snapshot=snap, extra=_measured(snap))


def _measured(snap) -> dict:
    """The opt-in measurements (--check-gc, --steps) as JSON: "gc_check" and "steps", when they ran."""
    extra = {}
    gc = getattr(snap, "gc_equivalence", None)
    if gc is not None:
        data = {**dataclasses.asdict(gc), "diffs": [dataclasses.asdict(d) for d in gc.diffs[:50]],
                "diffs_count": len(gc.diffs)}
        for key in ("loss_with_gc", "loss_without_gc"):
            data[key] = _finite(data[key])
        for d in data["diffs"]:
            d["rel_diff"], d["max_abs_diff"] = _finite(d["rel_diff"]), _finite(d["max_abs_diff"])
        extra["gc_check"] = data
    run = getattr(snap, "steps", None)
    if run is not None:
        data = {k: v for k, v in dataclasses.asdict(run).items() if k != "params"}
        data["losses"] = [_finite(v) for v in run.losses]
        stale = [p for p in run.params if not p.changed]
        data.update(params_tracked=len(run.params), params_changed=len(run.params) - len(stale),
                    not_changed=[dataclasses.asdict(p) for p in stale[:50]], not_changed_count=len(stale))
        extra["steps"] = data
    return extra


def _finite(value):
    """NaN/Inf are not JSON: None instead."""
    return value if value is None or math.isfinite(value) else None


def _module_row(m) -> dict:
    row = {"name": m.name, "class": m.cls, "trainable": m.trainable, "frozen": m.frozen, "quantized": m.quantized,
           "dtypes": list(m.dtypes), "hooks": list(m.hooks), "checkpointing": m.gc}
    if m.ran is not None:
        row.update({"ran": m.ran, "in_requires_grad": m.in_requires_grad, "out_requires_grad": m.out_requires_grad,
                    "grad_fn": m.out_grad_fn, "grad_enabled": m.grad_enabled, "in_reentrant_checkpoint": m.in_reentrant})
    if m.grads:
        row["grads"] = dict(m.grads)
        row["grad_norm"] = m.grad_norm
    return row


def finding_line(f: Finding) -> str:
    """One finding as one line: code, slug, where, and the message."""
    where = f" at {f.location}" if f.location else ""
    return f"{f.code} {f.slug}{where}: {f.message}"
