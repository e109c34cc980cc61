"""Rule selection, as ruff does it: `select` / `ignore` by code, code prefix (GF1, GF20), slug or ALL.

Selections come in layers (`[tool.gradflow]` first, then the command line). A layer with `select` starts afresh:
only what it selects is on; its `ignore` then turns rules off; a layer with only `ignore` narrows what the layer
before left on. Within a layer, the more specific selector wins (a code beats its prefix, a prefix beats ALL), and
on a tie `ignore` wins. A selection only hides findings from the report and the exit code: it never changes what
gradflow checks or fixes.
"""

from __future__ import annotations

import dataclasses

from gradflow.errors import GradflowError
from gradflow.rules.codes import CODES, REDIRECTS, lookup

_EXACT = 100  # a whole code or a slug: more specific than any prefix


@dataclasses.dataclass(frozen=True)
class Selector:
    text: str  # as written
    prefix: str  # the code or code prefix it stands for ("" for ALL)
    specificity: int

    def matches(self, code: str) -> bool:
        return code.upper().startswith(self.prefix) if self.specificity != _EXACT else code.upper() == self.prefix


def parse_selector(text: str, where: str) -> Selector:
    """One code, code prefix, slug or ALL; `where` names the flag or the pyproject key for the error."""
    raw = str(text).strip()
    if raw.upper() == "ALL":
        return Selector(raw, "", 0)
    code = lookup(raw)
    if code is not None:
        return Selector(raw, code, _EXACT)
    upper = raw.upper()
    if upper and any(c.startswith(upper) for c in (*CODES, *REDIRECTS)):
        return Selector(raw, upper, len(upper))
    raise GradflowError(f"{where} {raw!r} is not a finding code, code prefix (like GF1) or slug",
                        "Run 'gradflow explain' for the list")


def parse_selectors(values, where: str) -> tuple[Selector, ...]:
    """Selectors from a list whose items may themselves be comma-separated ("GF101,GF2")."""
    if isinstance(values, str):
        values = [values]
    out = []
    for value in values:
        for part in str(value).split(","):
            if part.strip():
                out.append(parse_selector(part, where))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Layer:
    select: tuple[Selector, ...] | None  # None: this layer selects nothing afresh
    ignore: tuple[Selector, ...] = ()
    source: str = ""  # "[tool.gradflow] in /x/pyproject.toml" or "the command line"


@dataclasses.dataclass(frozen=True)
class RuleSelection:
    """Which finding codes a report keeps: every code unless some layer says otherwise."""

    layers: tuple[Layer, ...] = ()

    def allows(self, code: str) -> bool:
        on = True
        for layer in self.layers:
            sel = max((s.specificity for s in layer.select or () if s.matches(code)), default=None)
            ign = max((s.specificity for s in layer.ignore if s.matches(code)), default=None)
            if layer.select is not None:
                on = False  # a select starts afresh
            if sel is not None and (ign is None or sel > ign):
                on = True
            elif ign is not None:
                on = False
        return on

    @property
    def active(self) -> bool:
        return any(layer.select is not None or layer.ignore for layer in self.layers)

    def to_dict(self) -> dict:
        return {"layers": [{"source": layer.source,
                            "select": None if layer.select is None else [s.text for s in layer.select],
                            "ignore": [s.text for s in layer.ignore]} for layer in self.layers]}


def apply_selection(report, selection: RuleSelection):
    """The report with only the findings `selection` allows (in .before / .after too); the input is unchanged."""
    if not selection.active:
        return report

    def keep(rep):
        if rep is None:
            return None
        return dataclasses.replace(rep, findings=[f for f in rep.findings if selection.allows(f.code)],
                                   before=keep(rep.before), after=keep(rep.after))

    return keep(report)
