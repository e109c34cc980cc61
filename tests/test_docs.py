"""The findings reference in docs/ is generated from the rules and must not drift from them."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_findings_reference_is_up_to_date():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    assert (ROOT / "docs" / "findings.md").read_text() == generate.render(), "run: python docs/generate.py"


def test_every_rule_documents_the_four_sections():
    from gradflow.rules import all_rules

    for rule in all_rules():
        for section in ("## What it does", "## Why is this bad?", "## Example", "## Fix safety"):
            assert section in rule.doc, f"{rule.code} lacks {section}"
