"""Rules: one file per finding. Each reads a Snapshot and returns Findings; none runs the model."""

from __future__ import annotations

import importlib

from gradflow.finding import severity_rank
from gradflow.rules.codes import CODES, lookup


def load(code: str):
    """The Rule object for `code`."""
    slug, module = CODES[code]
    return importlib.import_module(f"gradflow.rules.{module}").RULE


def all_rules():
    return [load(code) for code in CODES]


def run_rules(snap) -> list:
    """Every rule over `snap`, minus those superseded by a more specific finding, then the coverage fallback for
    trainable parameters without a gradient that none of them names; ordered by severity."""
    found = []
    for rule in all_rules():
        if rule.check is not None:  # runtime findings come from GradFlowCallback, not from a snapshot
            found.extend(rule.check(snap))
    fired = {f.slug for f in found}
    kept = []
    for f in found:
        rule = load(lookup(f.slug))
        if not any(s in fired for s in rule.superseded_by):
            kept.append(f)
    kept.extend(importlib.import_module("gradflow.rules.grad_missing_unexplained").cover(snap, kept))
    kept.sort(key=lambda f: (-severity_rank(f.severity), f.code))
    return kept
