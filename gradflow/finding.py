"""What a finding is: its severities, its fix and how that fix may be applied. The vocabulary every layer shares
(rules make findings, fixes answer them, reports carry them), so it sits at the bottom."""

from __future__ import annotations

import dataclasses
import enum

SEVERITIES = ("info", "warning", "error")


class Applicability(str, enum.Enum):
    """How a fix may be applied: the one definition fixes and reports use (it compares equal to its value).

    Ordered from the most to the least applicable, safe < unsafe < display-only (as declared), so that whether a
    fix is applied at a threshold is one comparison: `applicability.applies(threshold)`. Each `Fix` in
    gradflow/fixes declares its own; a finding's is stamped from the fix that answers it (gradflow.fixes.stamp).
    """

    SAFE = "safe"  # applied by default: it changes no training outcome the user chose
    UNSAFE = "unsafe"  # applied only with --unsafe-fixes: it can change what the model learns
    DISPLAY_ONLY = "display-only"  # printed as code to paste: the cause is in the user's own code

    def __str__(self) -> str:
        return self.value

    @property
    def rank(self) -> int:
        """0 for safe, 1 for unsafe, 2 for display-only."""
        return type(self)._member_names_.index(self.name)

    def applies(self, threshold: "Applicability | str") -> bool:
        """Whether a fix of this applicability is applied at `threshold` (safe by default, unsafe with
        --unsafe-fixes); a display-only fix never is."""
        return self <= threshold

    # str's own ordering is alphabetical: compare by rank instead (a plain value such as "safe" is accepted)
    def __lt__(self, other):
        return self.rank < Applicability(other).rank if isinstance(other, str) else NotImplemented

    def __le__(self, other):
        return self.rank <= Applicability(other).rank if isinstance(other, str) else NotImplemented

    def __gt__(self, other):
        return self.rank > Applicability(other).rank if isinstance(other, str) else NotImplemented

    def __ge__(self, other):
        return self.rank >= Applicability(other).rank if isinstance(other, str) else NotImplemented


@dataclasses.dataclass
class Fix:
    """A finding's fix: the rule's title for it, and the applicability of the fix that answers it.

    A rule leaves `applicability` None (the fixes sit a layer above the rules); gradflow.fixes.stamp fills it in.
    """

    title: str
    applicability: Applicability | None = None
    # the same fix as it fits this setup, and where: a Trainer's TrainingArguments (and the factory file's line)
    here: str | None = None

    def to_dict(self) -> dict:
        data = {"title": self.title, "applicability": str(self.applicability)}
        if self.here is not None:  # only where the setup tells: other findings' JSON is unchanged
            data["here"] = self.here
        return data


@dataclasses.dataclass
class Finding:
    code: str
    slug: str
    severity: str
    message: str
    location: str | None = None
    fix: Fix | None = None
    params: list[str] = dataclasses.field(default_factory=list)  # the parameters it concerns
    params_count: int | None = None  # how many it concerns, when `params` lists fewer (read back from compact JSON)

    def to_dict(self, limit: int | None = 50) -> dict:
        """The finding as JSON: the first `limit` parameter names it concerns (None: all), and how many there are."""
        return {"code": self.code, "slug": self.slug, "severity": self.severity, "message": self.message,
                "location": self.location,
                "fix": self.fix.to_dict() if self.fix else None,
                "params": self.params[:limit],
                "params_count": self.params_count if self.params_count is not None else len(self.params)}

    @classmethod
    def from_dict(cls, data: dict) -> "Finding":
        fix = data.get("fix")
        return cls(data["code"], data["slug"], data["severity"], data["message"], data.get("location"),
                   Fix(fix["title"], Applicability(fix["applicability"]), fix.get("here")) if fix else None,
                   list(data.get("params") or []), data.get("params_count"))


def with_hints(findings: list[Finding], hints: dict[str, str] | None) -> list[Finding]:
    """Each finding's fix as it fits a Trainer's own set-up (`hints`: slug -> the TrainingArguments change, from
    gradflow.setup.trainer_source.trainer_hints), set once: checkpointing is set in TrainingArguments, and a call on
    the model beforehand is overridden by train(). The probe, the gathered torchrun report and the callback use it."""
    for f in findings:
        if hints and f.fix is not None and f.fix.here is None and f.slug in hints:
            f.fix.here = hints[f.slug]
    return findings


def severity_rank(severity: str) -> int:
    return SEVERITIES.index(severity)


def fails_on(severity: str, fail_on: str) -> bool:
    """Whether one finding of `severity` is at or above `fail_on` (error | warning | never): info never is, and
    nothing is under never."""
    if fail_on == "never" or severity == "info":
        return False
    return severity_rank(severity) >= severity_rank(fail_on)


def finding_line(f: Finding) -> str:
    """One finding as one line: code, slug, where, and the message."""
    where = f" at {f.location}" if f.location else ""
    return f"{f.code} {f.slug}{where}: {f.message}"
