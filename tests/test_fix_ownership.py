"""Each fact about a fix has one owner, as in ruff, and the docs are held to it.

The Rule owns its message, its fix title (`finding.fix.title`) and whether a fix exists at all (`fix_title` None:
none). The Fix (gradflow/fixes) alone owns its applicability; a finding's is stamped from the fix answering its slug
(display-only when none does). The "Fix safety" sections of the rule docs and docs/findings.md restate it in
words, so they are compared with the code here.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest

from gradflow.fixes import all_fixes, applicability, fixes_for, stamp
from gradflow.report import Applicability
from gradflow.rules import all_rules
from gradflow.rules._base import Rule

ROOT = pathlib.Path(__file__).resolve().parents[1]
RULES = all_rules()


def _safety(doc: str) -> str:
    """The "## Fix safety" section of a doc, up to the next heading."""
    return doc.split("## Fix safety", 1)[1].split("\n## ", 1)[0].strip()


def _first_word(text: str) -> str:
    return text.split()[0].lower().rstrip(":.,;")


def test_the_rule_states_no_applicability():
    assert "applicability" not in {f.name for f in dataclasses.fields(Rule)}
    for path in (ROOT / "gradflow" / "rules").glob("*.py"):
        assert not re.search(r"applicability\s*=\s*[\"']", path.read_text()), f"{path.name} restates an applicability"


def test_applicability_is_ordered_and_applies_by_one_comparison():
    safe, unsafe, display = Applicability.SAFE, Applicability.UNSAFE, Applicability.DISPLAY_ONLY
    assert safe < unsafe < display and display > "unsafe" >= safe  # by rank, not alphabetically
    assert min(display, unsafe, safe) is safe and sorted([display, safe, unsafe]) == [safe, unsafe, display]
    assert [a.applies(safe) for a in Applicability] == [True, False, False]
    assert [a.applies("unsafe") for a in Applicability] == [True, True, False]
    assert safe == "safe" and str(display) == "display-only"  # still its value, in JSON and text


@pytest.mark.parametrize("rule", RULES, ids=[r.code for r in RULES])
def test_a_finding_shows_the_applicability_of_the_fix_that_answers_it(rule):
    found = stamp([rule.finding("message")])[0]
    if rule.fix_title is None:
        assert found.fix is None and applicability(rule.slug) is None
        return
    fixes = fixes_for(rule.slug)
    expected = fixes[0].applicability if fixes else Applicability.DISPLAY_ONLY
    assert found.fix.title == rule.fix_title
    assert isinstance(found.fix.applicability, Applicability) and found.fix.applicability is expected
    assert applicability(rule.slug) is expected
    # a finding the rule says no fix can act on is advice, whatever fix answers its slug
    advice = stamp([rule.finding("message", advice_only=True)])[0]
    assert advice.fix.applicability is Applicability.DISPLAY_ONLY


@pytest.mark.parametrize("rule", RULES, ids=[r.code for r in RULES])
def test_rule_doc_fix_safety_names_the_applicability_of_its_fix(rule):
    section = _safety(rule.doc)
    declared = applicability(rule.slug)
    if declared is None:
        assert section.startswith("Nothing to fix"), (rule.code, section)
    else:
        assert _first_word(section) == declared.value, (rule.code, section, declared.value)


@pytest.mark.parametrize("fix", all_fixes(), ids=[f.id for f in all_fixes()])
def test_fix_doc_fix_safety_names_its_own_applicability(fix):
    assert _first_word(_safety(fix.doc)) == fix.applicability.value, fix.id
    assert (fix.apply is None) == (fix.applicability is Applicability.DISPLAY_ONLY), fix.id


def test_findings_reference_states_the_code_titles_and_applicabilities():
    text = (ROOT / "docs" / "findings.md").read_text()
    rows = dict(re.findall(r"^\| (GF\d+) \| \[`[^`]+`\]\([^)]*\) \| \w+ \| ([^|]+) \|$", text, re.M))
    heads = {code: (fix, title) for code, fix, title in
             re.findall(r"^## (GF\d+) .*\n\nSeverity: \*\*\w+\*\*\. Fix: ([\w-]+)(?: — (.*))?\.$", text, re.M)}
    assert set(rows) == set(heads) == {r.code for r in RULES}
    for rule in RULES:
        declared = applicability(rule.slug)
        assert rows[rule.code] == (declared.value if declared else "-"), rule.code
        assert heads[rule.code] == ((declared.value, rule.fix_title) if declared else ("none", "")), rule.code
