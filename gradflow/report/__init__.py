"""Report and Finding: what gradflow hands back, and exactly the JSON the CLI prints."""

from __future__ import annotations

import dataclasses
import enum
import math
import types
from typing import Any, Mapping

from gradflow.errors import GradflowError
from gradflow.finding import (SEVERITIES, Applicability, Finding, Fix, fails_on,  # noqa: F401 (the report's API)
                              finding_line, severity_rank)
from gradflow.report.render import renderable, to_text
from gradflow.report.render.json_report import COMPACT_DEPTH, COMPACT_FINDING_PARAMS, module_rows, params_section
from gradflow.report.sections import (DataSection, DistributedSection, DryRunSection, PatchOutcome, PreflightSection,
                                      TrainSection)

SCHEMA_VERSION = 1
# the sections after the probe's fields, in the order the JSON shows them
SECTIONS = ("gc_check", "steps", "packed_check", "dry_run", "distributed", "preflight", "plan", "data", "train",
            "baseline")


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
class Report:
    """The outcome of inspect / probe / patch / train. `to_dict()` is the CLI's JSON (gradflow.schema()).

    Beyond the probe's own fields, each command fills its own sections (gradflow.report.sections); a section left
    None is not in the JSON.
    """

    command: str
    model: dict
    loss: dict | None
    params: dict
    modules: list[dict]
    findings: list[Finding]
    snapshot: Any = dataclasses.field(default=None, repr=False, compare=False)  # what it came from (not serialised)
    before: "Report | None" = None
    after: "Report | None" = None
    fixes_applied: list[dict] = dataclasses.field(default_factory=list)
    patch: PatchOutcome | None = None  # patch: plan, advice, verification, snippet (top-level keys in the JSON)
    gc_check: dict | None = None  # --check-gc
    steps: dict | None = None  # --steps
    packed_check: dict | None = None  # --packed, and train's packed pre-flight
    dry_run: DryRunSection | None = None  # probe-backward / inspect --dry-run
    distributed: DistributedSection | None = None  # under torchrun
    preflight: PreflightSection | None = None  # train
    plan: dict | None = None  # train: the memory plan
    data: DataSection | None = None  # train
    train: TrainSection | None = None  # train
    baseline: dict | None = None  # --baseline
    modules_total: int | None = None  # how many modules the model has, when `modules` lists fewer (read from JSON)
    trained_model: Any = dataclasses.field(default=None, repr=False, compare=False)  # train: the model in memory
    # one-line notes on what the report cannot see (the CLI tells them on stderr; not in the JSON)
    notes: list[str] = dataclasses.field(default_factory=list, compare=False)

    @property
    def extra(self) -> Mapping[str, Any]:
        """The sections as they appear in the JSON, read-only (set the typed fields instead)."""
        return types.MappingProxyType(self._sections())

    def _sections(self) -> dict[str, Any]:
        out = dict(self.patch.to_dict()) if self.patch is not None else {}
        for name in SECTIONS:
            value = getattr(self, name)
            if value is not None:
                if name in out:
                    raise ValueError(f"a {self.command} report holds {name!r} twice (a patch key and a section)")
                out[name] = value
        return out

    def worst(self) -> str | None:
        ranks = [severity_rank(f.severity) for f in self.findings]
        return SEVERITIES[max(ranks)] if ranks else None

    def fails(self, fail_on: str) -> bool:
        """True when some finding is at or above `fail_on` (error | warning | never). Info never fails."""
        return any(fails_on(f.severity, fail_on) for f in self.findings)

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
        """The CLI's JSON (gradflow.schema(): gradflow/report/report.schema.json).

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
            "modules_total": self.modules_total if self.modules_total is not None else len(self.modules),
            "findings": [f.to_dict(limit=None if full else COMPACT_FINDING_PARAMS) for f in self.findings],
        }
        if self.before is not None or self.after is not None:
            data["before"] = self.before.to_dict(detail) if self.before else None
            data["after"] = self.after.to_dict(detail) if self.after else None
            data["fixes_applied"] = self.fixes_applied
        data.update(self._sections())
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        """A Report from its JSON (`to_dict()`, or a run's report.json): the inverse of to_dict, less the Snapshot
        and the per-parameter rows that a compact JSON leaves out."""
        def sub(key):
            return cls.from_dict(data[key]) if isinstance(data.get(key), dict) else None

        patch_keys = {f.name for f in dataclasses.fields(PatchOutcome)}
        is_patch = data.get("command") == "patch" and "unsafe_fixes" in data
        sections = {name: data.get(name) for name in SECTIONS if not (is_patch and name in patch_keys)}
        return cls(command=data["command"], model=data.get("model") or {}, loss=data.get("loss"),
                   params=data.get("params") or {}, modules=list(data.get("modules") or []),
                   modules_total=data.get("modules_total"),
                   findings=[Finding.from_dict(f) for f in data.get("findings") or []], before=sub("before"),
                   after=sub("after"), fixes_applied=list(data.get("fixes_applied") or []),
                   patch=PatchOutcome.from_dict(data) if is_patch else None, **sections)


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
                  findings=findings, snapshot=snap, **_measured(snap))


def _measured(snap) -> dict:
    """The opt-in measurements (--check-gc, --steps) as JSON: "gc_check" and "steps", when they ran."""
    measured = {}
    gc = getattr(snap, "gc_equivalence", None)
    if gc is not None:
        data = {**dataclasses.asdict(gc), "diffs": [dataclasses.asdict(d) for d in gc.diffs[:50]],
                "diffs_count": len(gc.diffs)}
        for key in ("loss_with_gc", "loss_without_gc"):
            data[key] = _finite(data[key])
        for d in data["diffs"]:
            d["rel_diff"], d["max_abs_diff"] = _finite(d["rel_diff"]), _finite(d["max_abs_diff"])
        measured["gc_check"] = data
    run = getattr(snap, "steps", None)
    if run is not None:
        data = {k: v for k, v in dataclasses.asdict(run).items() if k != "params"}
        data["losses"] = [_finite(v) for v in run.losses]
        stale = [p for p in run.params if not p.changed]
        data.update(params_tracked=len(run.params), params_changed=len(run.params) - len(stale),
                    not_changed=[dataclasses.asdict(p) for p in stale[:50]], not_changed_count=len(stale))
        measured["steps"] = data
    return measured


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
