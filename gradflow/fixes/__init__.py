"""Fixes: one file per fix, each declaring its applicability and the findings (slugs) it answers.

A fix's applicability is said once, by its `Fix`; a finding's (`finding.fix.applicability`) is that of the fix
answering its slug, stamped here (`stamp`), where both the rules below and the fixes are visible.

The catalog order is the order fixes are planned and applied in: what makes parameters trainable comes first,
then their dtype, then checkpointing and the hook, then the cache; the display-only advice table (advice.py) last.
"""

from __future__ import annotations

import importlib

from gradflow.fixes.advice import FIXES
from gradflow.finding import Applicability
from gradflow.rules import load, run_rules
from gradflow.rules.codes import SLUGS

CATALOG: tuple[str, ...] = (
    "unfreeze_adapter",
    "unfreeze_intended",
    "save_trainable",
    "refreeze_embeddings",
    "freeze_unused",
    "fp32_trainable",
    "kbit_prepare",
    "inner_checkpoint_off",
    "input_grad_hook",
    "non_reentrant_checkpointing",
    "cache_off",
)


def all_fixes():
    """Every Fix, in catalog order, then the display-only advice table (gradflow/fixes/advice.py)."""
    return [importlib.import_module(f"gradflow.fixes.{name}").FIX for name in CATALOG] + list(FIXES)


def by_id(fix_id: str):
    """The Fix whose id is `fix_id`, or None."""
    for fix in all_fixes():
        if fix.id == fix_id:
            return fix
    return None


def fixes_for(slug: str):
    """The fixes answering finding `slug`, in order of preference."""
    return [fix for fix in all_fixes() if slug in fix.answers]


def applicability(slug: str) -> Applicability | None:
    """How finding `slug` is fixed, for its documentation: as `stamp` gives its findings, or None when its rule
    offers no fix at all (no fix title)."""
    return _answered(slug) if load(SLUGS[slug]).fix_title else None


def stamp(findings: list) -> list:
    """`findings`, each fix given the applicability of the fix answering its slug (a rule leaves it None; one that
    said no fix can act on its finding has made it display-only already)."""
    for finding in findings:
        if finding.fix is not None and finding.fix.applicability is None:
            finding.fix.applicability = _answered(finding.slug)
    return findings


def _answered(slug: str) -> Applicability:
    """That of the first fix answering `slug` (in order of preference), or display-only when no fix answers it and
    the finding's own advice is all there is."""
    fixes = fixes_for(slug)
    return fixes[0].applicability if fixes else Applicability.DISPLAY_ONLY


def findings_for(snap) -> list:
    """Every rule over `snap` (gradflow.rules.run_rules), each finding's fix stamped with its applicability."""
    return stamp(run_rules(snap))
