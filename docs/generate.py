"""Regenerate docs/findings.md from the rules' own documentation: `python docs/generate.py`."""

from __future__ import annotations

import pathlib


def render() -> str:
    from gradflow.fixes import applicability
    from gradflow.rules import all_rules

    rules = all_rules()
    # how each finding is fixed is its fix's to say (gradflow/fixes), not the rule's
    fixes = {r.slug: applicability(r.slug) for r in rules}
    lines = ["# Findings reference", "",
             "Generated from the rules (`python docs/generate.py`); `gradflow explain CODE|SLUG` prints the same text.",
             "Slugs are a stable public contract; codes are never reused.", "",
             "| code | slug | severity | fix |", "|---|---|---|---|"]
    for r in rules:
        lines.append(f"| {r.code} | [`{r.slug}`](#{r.code.lower()}-{r.slug}) | {r.severity} | {fixes[r.slug] or '-'} |")
    for r in rules:
        lines += ["", f"## {r.code} {r.slug}", "", f"Severity: **{r.severity}**. Fix: {fixes[r.slug] or 'none'}"
                  + (f" — {r.fix_title}." if r.fix_title else "."), ""]
        lines.append(r.doc.strip().replace("## ", "### "))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    path = pathlib.Path(__file__).with_name("findings.md")
    path.write_text(render())
    print(f"wrote {path}")
