"""`--baseline FILE`: the expected trainable set and finding list, recorded once and compared on every run.

The file is JSON, small enough to review in a pull request: parameter names are folded by their numeric path
parts (`model.layers.{0-31}.self_attn.q_proj.lora_A.default.weight`), findings are (code, slug, location).
A finding's identity is its slug and location (slugs are the stable contract; a renamed code is not a change).

- FILE missing, or `update=True`: write it (atomically) and report "written"; the exit code follows --fail-on.
- FILE present: compare, as linters' baselines do (ruff, detekt, psalm): each finding is new, unchanged, or
  fixed (in the baseline, gone now). Only a new finding at or above --fail-on fails the run, or a change in the
  trainable set (what the baseline exists to pin) unless --fail-on is never. A fixed finding, or a new one below
  the fail level (info never fails), is reported, and `--update-baseline` records the new state.
- Rule selection (`--select` / `--ignore`, `[tool.gradflow]`): a baseline finding of a rule the run leaves out is
  not judged (never "fixed"), and an update keeps it.
- The file records the command and the MODEL (`model` as typed, `model_id` as gradflow.report.identity names it);
  a comparison with a baseline recorded for another command or MODEL says so (`BaselineResult.recorded_for`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re

from gradflow.errors import GradflowError
from gradflow.files import write_json
from gradflow.finding import fails_on
from gradflow.report.identity import model_identity
from gradflow.rules.codes import lookup

FORMAT_VERSION = 1


# ----- compact parameter names -------------------------------------------------------------------------------
def compact_names(names) -> list[str]:
    """Names folded over their numeric parts: `a.0.b`, `a.1.b`, `a.3.b` -> `a.{0-1,3}.b`. Exact: expand_names undoes it."""
    groups: dict[tuple, set[tuple]] = collections.defaultdict(set)
    for name in set(names):
        parts = name.split(".")
        shape = tuple(None if p.isdigit() else p for p in parts)
        groups[shape].add(tuple(int(p) for p in parts if p.isdigit()))
    out = []
    for shape, indices in groups.items():
        for box in _boxes(indices):
            it = iter(box)
            out.append(".".join(_ranges(next(it)) if part is None else part for part in shape))
    return sorted(out)


def _boxes(points: set[tuple]) -> list[tuple[frozenset, ...]]:
    """Cover `points` exactly with few boxes (per-position sets whose product is a subset of the points)."""
    boxes = {tuple(frozenset([v]) for v in point) for point in points}
    width = len(next(iter(points))) if points else 0
    for _ in range(2):  # a second sweep merges what the first one lined up
        for pos in range(width):
            merged: dict[tuple, set] = collections.defaultdict(set)
            for box in boxes:
                merged[box[:pos] + box[pos + 1:]] |= box[pos]
            boxes = {rest[:pos] + (frozenset(vals),) + rest[pos:] for rest, vals in merged.items()}
    return sorted(boxes, key=lambda b: tuple(min(s) for s in b))


def _ranges(values: frozenset) -> str:
    vals = sorted(values)
    if len(vals) == 1:
        return str(vals[0])
    runs, start = [], vals[0]
    for prev, cur in zip(vals, vals[1:] + [None]):
        if cur is None or cur != prev + 1:  # a run ends at prev
            runs.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return "{" + ",".join(runs) + "}"


_BRACES = re.compile(r"\{([0-9,\-]+)\}")


def expand_names(patterns) -> set[str]:
    """The names a compact list stands for."""
    out: set[str] = set()
    for pattern in patterns:
        match = _BRACES.search(pattern)
        if match is None:
            out.add(pattern)
            continue
        for value in _expand_range(match.group(1)):
            out |= expand_names([pattern[:match.start()] + str(value) + pattern[match.end():]])
    return out


def _expand_range(text: str) -> list[int]:
    values = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        values.extend(range(int(lo), int(hi or lo) + 1))
    return values


# ----- record and compare -------------------------------------------------------------------------------------
def record(report, *, command: str | None = None, model: str | None = None) -> dict:
    """The baseline of a report: its trainable parameter names and its findings."""
    snap = report.snapshot
    if snap is not None:
        names = [p.name for p in snap.trainable_params()]
    else:  # a report read back from JSON: only the detail rows name parameters
        names = [row["name"] for row in report.params.get("per_param", [])]
    findings = _sorted({"code": f.code, "slug": f.slug, "location": f.location} for f in report.findings)
    return {"gradflow_baseline": FORMAT_VERSION, "command": command or report.command, "model": model,
            "model_id": model_identity(model), "trainable": {"count": len(set(names)), "names": compact_names(names)},
            "findings": findings}


def _sorted(findings) -> list[dict]:
    return sorted(findings, key=lambda f: (f["code"], f["slug"], f["location"] or ""))


@dataclasses.dataclass
class BaselineResult:
    """What --baseline did: `status` is written | unchanged | changed.

    Findings are (code, slug, location) dicts: `findings_added` are new (not in the baseline), `findings_removed`
    fixed (in the baseline, absent now), `findings_unchanged` in both; `failing` are the new ones at or above
    `fail_on`.
    """

    path: str
    status: str
    params_added: list[str] = dataclasses.field(default_factory=list)  # compact names
    params_removed: list[str] = dataclasses.field(default_factory=list)
    findings_added: list[dict] = dataclasses.field(default_factory=list)
    findings_removed: list[dict] = dataclasses.field(default_factory=list)
    findings_unchanged: list[dict] = dataclasses.field(default_factory=list)
    failing: list[dict] = dataclasses.field(default_factory=list)
    fail_on: str = "error"
    recorded_for: str | None = None  # "COMMAND MODEL" of the baseline, when it was recorded for another setup

    @property
    def changed(self) -> bool:
        return self.status == "changed"

    @property
    def trainable_changed(self) -> bool:
        return bool(self.params_added or self.params_removed)

    @property
    def fails(self) -> bool:
        """Whether the comparison fails the run: a new finding at or above --fail-on, or a changed trainable set
        (unless --fail-on never). A written baseline never fails by itself: the exit code follows --fail-on."""
        if self.status == "written" or self.fail_on == "never":
            return False
        return bool(self.failing) or self.trainable_changed

    def to_dict(self) -> dict:
        return {"file": self.path, "status": self.status, "fails": self.fails,
                "trainable": {"added": self.params_added, "removed": self.params_removed},
                "findings": {"added": self.findings_added, "removed": self.findings_removed,
                             "unchanged": self.findings_unchanged}}

    def lines(self) -> list[str]:
        """What changed, one line each, for stderr: `+ new ...`, `- fixed ...`, `+/- trainable ...`."""
        out = [f"+ trainable {n}" for n in self.params_added] + [f"- trainable {n}" for n in self.params_removed]
        out += [f"+ new {_finding_text(f)}" for f in self.findings_added]
        out += [f"- fixed {_finding_text(f)}" for f in self.findings_removed]
        return out


def _finding_text(f: dict) -> str:
    return f"{f['code']} {f['slug']}" + (f" at {f['location']}" if f.get("location") else "")


def _key(f: dict) -> tuple:
    return f["slug"], f.get("location")


def check(report, path: str, *, update: bool = False, command: str | None = None, model: str | None = None,
          fail_on: str = "error", selection=None) -> BaselineResult:
    """Write the baseline at `path` when it is missing (or `update`), else compare the report with it.

    Args:
        report: the Report of this run (its findings as selected).
        path: the baseline file.
        update: write it even when it exists (--update-baseline).
        command, model: recorded in the file.
        fail_on: error | warning | never: which new findings fail the run (`BaselineResult.fails`).
        selection: the run's RuleSelection. A baseline finding of a rule it leaves out is neither fixed nor
            compared (this run did not look for it), and an update keeps it.
    """
    current = record(report, command=command, model=model)
    old = load(path) if os.path.exists(path) else None
    judged = _judged(selection)
    if update or old is None:
        if old is not None:  # the rules this run did not select keep what the baseline says of them
            current["findings"] = _sorted(current["findings"] + [f for f in old["findings"] if not judged(f)])
        write_json_atomic(path, current)
        return BaselineResult(path, "written", fail_on=fail_on)
    result = _compare(report, old, current, [f for f in old["findings"] if judged(f)], path, fail_on)
    if (old.get("command"), _model_id(old)) != (current["command"], current["model_id"]):
        result.recorded_for = f"{old.get('command')} {old.get('model')}"
    return result


def _judged(selection):
    """Whether this run judges a baseline finding: its rule (by slug, else by code) is selected."""
    if selection is None or not selection.active:
        return lambda f: True
    return lambda f: selection.allows(lookup(f["slug"]) or lookup(str(f.get("code") or "")) or str(f.get("code")))


def _model_id(baseline: dict) -> str:
    """The baseline's model identity; a baseline written before `model_id` was recorded: from its `model`."""
    return baseline.get("model_id") or model_identity(baseline.get("model"))


def _compare(report, old: dict, current: dict, old_findings: list[dict], path: str, fail_on: str) -> BaselineResult:
    old_names, new_names = expand_names(old["trainable"]["names"]), expand_names(current["trainable"]["names"])
    old_f = collections.Counter(_key(f) for f in old_findings)
    new_f = collections.Counter(_key(f) for f in current["findings"])
    by_key = {_key(f): f for f in (*old_findings, *current["findings"])}
    ordered = lambda counter: [by_key[k] for k in sorted(counter.elements(), key=str)]  # noqa: E731
    result = BaselineResult(
        path, "unchanged", fail_on=fail_on,
        params_added=compact_names(new_names - old_names), params_removed=compact_names(old_names - new_names),
        findings_added=ordered(new_f - old_f), findings_removed=ordered(old_f - new_f),
        findings_unchanged=ordered(new_f & old_f))
    known = old_f.copy()
    for f, state in zip(report.findings, states(report.findings, known)):
        if state == "new" and fails_on(f.severity, fail_on):
            result.failing.append({"code": f.code, "slug": f.slug, "location": f.location})
    if result.trainable_changed or result.findings_added or result.findings_removed:
        result.status = "changed"
    return result


def states(findings, known: collections.Counter) -> list[str]:
    """Each finding's baseline state, in order: "unchanged" while `known` (a Counter of (slug, location), used up
    as it goes) still holds its key, else "new"."""
    out = []
    for f in findings:
        key = (f.slug, f.location)
        if known[key] > 0:
            known[key] -= 1
            out.append("unchanged")
        else:
            out.append("new")
    return out


def comparison_states(findings, baseline: dict | None) -> tuple[list[str] | None, list[dict]]:
    """From a report's `baseline` section: each finding's state (new / unchanged) and the fixed findings, or
    (None, []) when no comparison was made (no --baseline, or the file was written by this run)."""
    if not baseline or baseline.get("status") == "written" or "findings" not in baseline:
        return None, []
    known = collections.Counter(_key(f) for f in baseline["findings"].get("unchanged", []))
    return states(findings, known), list(baseline["findings"].get("removed", []))


def load(path: str) -> dict:
    """A baseline file, its shape checked."""
    todo = "Pass --update-baseline to record it again, or delete the file"
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise GradflowError(f"--baseline {path} is not JSON ({exc})", todo) from None
    except OSError as exc:
        raise GradflowError(f"--baseline {path} cannot be read ({exc.strerror})", "Check the path") from None
    ok = (isinstance(data, dict) and data.get("gradflow_baseline") == FORMAT_VERSION
          and isinstance(data.get("trainable"), dict) and isinstance(data["trainable"].get("names"), list)
          and isinstance(data.get("findings"), list)
          and all(isinstance(f, dict) and "slug" in f for f in data["findings"]))
    if not ok:
        raise GradflowError(f"--baseline {path} is not a gradflow baseline (version {FORMAT_VERSION})", todo)
    return data


def write_json_atomic(path: str, data) -> None:
    """Write the baseline (gradflow.files.write_json, its folder made first); an OS error becomes a GradflowError."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_json(path, data)
    except OSError as exc:
        raise GradflowError(f"cannot write the baseline {path} ({exc.strerror})",
                            "Check that its folder is writable") from None
