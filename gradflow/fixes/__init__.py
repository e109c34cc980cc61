"""Fixes: one file per fix, each declaring its applicability and the findings (slugs) it answers.

The catalog order is the order fixes are planned and applied in: what makes parameters trainable comes first,
then their dtype, then checkpointing and the hook, then the cache; the display-only advice table (advice.py) last.
"""

from __future__ import annotations

import importlib
from gradflow.fixes.advice import FIXES

CATALOG: tuple[str, ...] = (
    "unfreeze_adapter",
    "unfreeze_intended",
    "save_trainable",
    "refreeze_embeddings",
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
