"""Findings the training watch raises while a run is in progress.

Where a probe-time slug names the state (nonfinite-grad, no-supervised-tokens), that slug and its code are used.
The two states that exist only during training (GF401, GF402) are runtime rules in the same code table.
"""

from __future__ import annotations

from gradflow.fixes import stamp
from gradflow.finding import Finding
from gradflow.rules import load
from gradflow.rules.codes import SLUGS


def finding(slug: str, message: str, *, location: str | None = None, params: list[str] | None = None) -> Finding:
    """A Finding for a training-time state, with the code and fix the central table gives its slug."""
    rule = load(SLUGS[slug])
    return stamp([rule.finding(message, location=location, params=params or [])])[0]
