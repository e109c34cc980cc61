"""Findings the training watch raises while a run is in progress.

Where a probe-time slug names the state (nonfinite-grad, no-supervised-tokens), that slug and its code are used.
Two states exist only during training and get their own codes here, in the GF4xx range.
"""

from __future__ import annotations

from gradflow.report import Finding, Fix

# code: (slug, severity, fix title)
TRAINING_CODES = {
    "GF401": ("grad-missing-in-training", "error",
              "Run 'gradflow probe-backward' on this setup to see where the gradient stops"),
    "GF402": ("adapter-not-updated", "error",
              "Check that the optimizer holds the adapter parameters and that the learning rate is not zero"),
}
_BY_SLUG = {slug: (code, sev, fix) for code, (slug, sev, fix) in TRAINING_CODES.items()}


def finding(slug: str, message: str, *, location: str | None = None, params: list[str] | None = None) -> Finding:
    """A Finding for a training-time state, with the code the central table (or TRAINING_CODES) gives it."""
    if slug in _BY_SLUG:
        code, severity, fix_title = _BY_SLUG[slug]
        return Finding(code=code, slug=slug, severity=severity, message=message, location=location,
                       fix=Fix(title=fix_title, applicability="display-only"), params=list(params or []))
    from gradflow.rules import load
    from gradflow.rules.codes import SLUGS

    rule = load(SLUGS[slug])
    fix = Fix(title=rule.fix_title, applicability=rule.applicability) if getattr(rule, "fix_title", None) else None
    return Finding(code=rule.code, slug=slug, severity=rule.severity, message=message, location=location,
                   fix=fix, params=list(params or []))
