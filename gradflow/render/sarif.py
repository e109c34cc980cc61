"""Findings as SARIF 2.1.0, for code-scanning dashboards in CI."""

from __future__ import annotations

_LEVEL = {"error": "error", "warning": "warning", "info": "note"}


def to_sarif(report) -> dict:
    from gradflow import __version__
    from gradflow.rules import all_rules

    rules = [{
        "id": r.code, "name": r.slug,
        "shortDescription": {"text": r.slug.replace("-", " ")},
        "fullDescription": {"text": r.doc.strip().split("\n\n")[0].replace("## What it does\n", "")},
        "defaultConfiguration": {"level": _LEVEL[r.severity]},
        "help": {"text": r.doc.strip()},
    } for r in all_rules()]
    index = {r["id"]: i for i, r in enumerate(rules)}
    results = []
    for f in report.findings:
        result = {"ruleId": f.code, "ruleIndex": index[f.code], "level": _LEVEL[f.severity],
                  "message": {"text": f.message}}
        if f.location:
            result["locations"] = [{"logicalLocations": [{"fullyQualifiedName": f.location, "kind": "module"}]}]
        if f.fix:
            result["properties"] = {"fix": f.fix.title, "applicability": f.fix.applicability, "slug": f.slug}
        results.append(result)
    return {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "gradflow", "version": __version__, "rules": rules,
                                "informationUri": "https://pypi.org/project/gradflow/"}},
            "results": results,
        }],
    }
