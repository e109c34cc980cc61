"""Shared pieces for rules: the Rule record and small helpers over a Snapshot."""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable

from gradflow.finding import Applicability, Finding, Fix


@dataclasses.dataclass(frozen=True)
class Rule:
    """One finding: its code, slug and severity, what it says, and the title of its fix.

    A rule owns whether a fix can exist at all (`fix_title` None: no fix) and what the user is told to do (the
    imperative `fix_title`, shown as `finding.fix.title`). How a fix may be applied is not the rule's to say: the
    `Fix` answering the slug (gradflow/fixes) declares its applicability, and gradflow.fixes.stamp copies it onto
    each finding; the rules sit a layer below the fixes and cannot see them.
    """

    code: str
    slug: str
    severity: str
    fix_title: str | None  # what to do, in the imperative; None for findings with nothing to fix
    check: Callable | None  # check(snapshot) -> list[Finding]; None for runtime findings
    doc: str = ""
    superseded_by: tuple[str, ...] = ()  # slugs that, when they fire, make this one redundant
    runtime: bool = False  # raised by GradFlowCallback during training, not by a snapshot check

    def finding(self, message: str, location: str | None = None, params: Iterable[str] = (),
                fix_title: str | None = None, advice_only: bool = False) -> Finding:
        """A Finding of this rule. `fix_title` words this finding's fix (default: the rule's); `advice_only`: no
        fix can act on this one (the cause is the user's own code), so its fix is display-only, the title advice."""
        title = fix_title or self.fix_title
        fix = Fix(title, Applicability.DISPLAY_ONLY if advice_only else None) if title else None
        return Finding(code=self.code, slug=self.slug, severity=self.severity, message=message,
                       location=location, fix=fix, params=list(params))


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def short(names: list[str], limit: int = 3) -> str:
    """A few names, then how many more."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".") or prefix == ""


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


_NUMBERED = re.compile(r"^(.*\.)(\d+)$")


def layer_span(names: list[str]) -> str:
    """'model.layers.0–3' for numbered siblings; several such runs (an encoder's and a decoder's layers) each
    spanned, up to three; else the first name."""
    if not names:
        return ""
    runs: dict[str, list[int]] = {}  # the siblings' parent path -> their numbers, in order of first appearance
    for name in names:
        hit = _NUMBERED.match(name)
        if hit is None:
            return names[0]
        runs.setdefault(hit.group(1), []).append(int(hit.group(2)))
    spans = [f"{parent}{min(idx)}–{max(idx)}" if min(idx) != max(idx) else f"{parent}{idx[0]}"
             for parent, idx in runs.items()]
    return short(spans, 3)


def owner(names) -> str:
    """The deepest module holding every parameter in `names` ("" for the root): the probe's rules and the training
    callback name a group of parameters by it alike."""
    paths = [n.split(".")[:-1] for n in names]
    common = paths[0] if paths else []
    for path in paths[1:]:
        k = 0
        while k < min(len(common), len(path)) and common[k] == path[k]:
            k += 1
        common = common[:k]
    return ".".join(common)



_EXPERT = re.compile(r"^(.*\.experts)\.\d+(\.|$)")


def unrouted_experts(snap) -> Callable[[object], bool]:
    """A test for a parameter of a mixture-of-experts expert that did not run while a sibling expert did: the router
    did not pick it in this batch, which is normal, so no rule reports it."""
    ran = {hit.group(1) for m in snap.modules if m.ran and (hit := _EXPERT.match(m.name))}

    def unrouted(p) -> bool:
        hit = _EXPERT.match(p.module)
        return p.used is False and hit is not None and hit.group(1) in ran
    return unrouted
