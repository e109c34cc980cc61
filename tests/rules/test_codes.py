"""The finding catalogue matches SPEC §5, and every slug has its fires-and-stays-silent test file here."""

from __future__ import annotations

import ast
import pathlib

import pytest

from gradflow.rules import all_rules
from gradflow.rules.codes import CODES, SLUGS, lookup
from tests.helpers.builders import SPEC_SEVERITY

HERE = pathlib.Path(__file__).parent


# gradflow's own slugs beyond SPEC §5: a step that raises, and the two states only training can see
EXTRA_SEVERITY = {"step-raised": "error", "grad-missing-in-training": "error", "adapter-not-updated": "error"}
RUNTIME = {"grad-missing-in-training", "adapter-not-updated"}  # tested through GradFlowCallback in tests/training


def test_catalogue_is_the_spec_plus_documented_extras():
    assert set(SLUGS) == set(SPEC_SEVERITY) | set(EXTRA_SEVERITY)
    assert len(CODES) == len(SLUGS)
    runtime = {r.slug for r in all_rules() if r.runtime}
    assert runtime == RUNTIME and all(r.check is None for r in all_rules() if r.runtime)


@pytest.mark.parametrize("slug", sorted({**SPEC_SEVERITY, **EXTRA_SEVERITY}))
def test_rule_severity_and_lookup(slug):
    code = lookup(slug)
    assert code is not None and lookup(code) == code and lookup(code.lower()) == code
    rule = next(r for r in all_rules() if r.slug == slug)
    assert rule.code == code
    assert rule.severity == {**SPEC_SEVERITY, **EXTRA_SEVERITY}[slug]
    for heading in ("## What it does", "## Why is this bad?", "## Example", "## Fix safety"):
        assert heading in rule.doc, f"{slug}: doc lacks {heading}"


@pytest.mark.parametrize("slug", sorted(set(SPEC_SEVERITY) | (set(EXTRA_SEVERITY) - RUNTIME)))
def test_each_slug_has_tests_both_ways(slug):
    path = HERE / f"test_{slug.replace('-', '_')}.py"
    assert path.exists(), f"no test file for {slug}"
    names = [n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)
             and n.name.startswith("test_")]
    silent = [n for n in names if n.startswith("test_silent")]
    fires = [n for n in names if not n.startswith("test_silent")]
    assert len(fires) >= 2, f"{slug}: fewer than two ways to build the fault"
    assert silent, f"{slug}: no stays-silent test"
