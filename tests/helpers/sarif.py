"""SARIF checks: the OASIS 2.1.0 schema (vendored in tests/data) and what GitHub code scanning documents on top of it.

GitHub's checks, from "SARIF support for code scanning" and "SARIF results exceed limits" (docs.github.com), and
the upload errors users meet ("expected at least one location", "expected a physical location", "expected artifact
location"; github/codeql-action#1738, #2459); Microsoft's sarif-sdk encodes the same as its GH10xx rules:

- `version` is "2.1.0", `$schema` is given, `runs` is an array of at most 20 runs;
- each run has `tool.driver.name`; rule ids are unique, at most 25,000 rules; a rule has `id`,
  `shortDescription.text`, `fullDescription.text`, `help.text`, at most 20 tags;
- at most 25,000 results per run; each has a `ruleId`, one of the driver's rules when it lists rules (with
  `ruleIndex` pointing at that rule when given), a non-empty `message.text`, a valid `level` (`none` when its
  `kind` is not `fail`), a valid `baselineState`, `partialFingerprints` (GitHub's alert identity across runs);
- each result has 1 to 1,000 locations (10 shown), and every one a `physicalLocation` with a non-empty
  `artifactLocation.uri` that is relative (no scheme, no leading '/', no '..': GitHub reads it from the repository
  root and ignores `originalUriBaseIds`) and a `region.startLine` >= 1;
- a `uriBaseId` is declared in `originalUriBaseIds` as an absolute `file:` URI ending in '/';
- the file is under 10 MB (GitHub's limit on an upload, gzip or not).
"""

from __future__ import annotations

import json
from pathlib import Path

OASIS = json.loads((Path(__file__).resolve().parents[1] / "data" / "sarif-schema-2.1.0.json").read_text())
LEVELS = {"none", "note", "warning", "error"}
BASELINE_STATES = {"new", "unchanged", "updated", "absent"}


def oasis_problems(log: dict) -> list:
    import jsonschema

    return [(list(e.absolute_path), e.message[:300]) for e in jsonschema.Draft4Validator(OASIS).iter_errors(log)]


def github_problems(log: dict) -> list[str]:
    """What GitHub code scanning would reject or mis-file in `log`, one line each (empty: none)."""
    out = []
    if log.get("version") != "2.1.0" or not log.get("$schema"):
        out.append("version 2.1.0 and $schema")
    runs = log.get("runs")
    if not isinstance(runs, list) or len(runs) > 20:
        out.append("runs: an array of at most 20")
        return out
    if len(json.dumps(log).encode()) > 10 * 1024 * 1024:
        out.append("size: over 10 MB")
    for r, run in enumerate(runs):
        out += [f"runs[{r}].{p}" for p in _run_problems(run)]
    return out


def _run_problems(run: dict) -> list[str]:
    out = []
    driver = run.get("tool", {}).get("driver", {})
    if not driver.get("name"):
        out.append("tool.driver.name")
    rules = driver.get("rules", [])
    ids = [rule.get("id") for rule in rules]
    if len(set(ids)) != len(ids) or None in ids or len(rules) > 25_000:
        out.append("tool.driver.rules: unique ids, at most 25,000")
    for rule in rules:
        if not all((rule.get(k) or {}).get("text") for k in ("shortDescription", "fullDescription", "help")):
            out.append(f"rule {rule.get('id')}: shortDescription, fullDescription and help texts")
        if len(rule.get("properties", {}).get("tags", [])) > 20:
            out.append(f"rule {rule.get('id')}: at most 20 tags")
    bases = run.get("originalUriBaseIds", {})
    for name, base in bases.items():
        if not (base.get("uri", "").startswith("file:///") and base["uri"].endswith("/")):
            out.append(f"originalUriBaseIds.{name}: an absolute file URI ending in '/'")
    results = run.get("results", [])
    if len(results) > 25_000:
        out.append("results: at most 25,000")
    for i, result in enumerate(results):
        out += [f"results[{i}] {p}" for p in _result_problems(result, ids, bases)]
    return out


def _result_problems(result: dict, ids: list, bases: dict) -> list[str]:
    out = []
    if not result.get("ruleId"):
        out.append("ruleId")
    elif ids and result["ruleId"] not in ids:
        out.append(f"ruleId {result['ruleId']!r} is not a rule of the driver")
    if "ruleIndex" in result and (result["ruleIndex"] >= len(ids) or ids[result["ruleIndex"]] != result.get("ruleId")):
        out.append("ruleIndex does not point at ruleId")
    if not result.get("message", {}).get("text"):
        out.append("message.text")
    level = result.get("level", "warning")
    if level not in LEVELS or (result.get("kind", "fail") != "fail" and level != "none"):
        out.append(f"level {level!r} (kind {result.get('kind', 'fail')!r})")
    if "baselineState" in result and result["baselineState"] not in BASELINE_STATES:
        out.append(f"baselineState {result['baselineState']!r}")
    if not result.get("partialFingerprints"):
        out.append("partialFingerprints")
    locations = result.get("locations") or []
    if not 1 <= len(locations) <= 1000:
        out.append("locations: 1 to 1,000")
    for location in locations:
        out += _location_problems(location, bases)
    return out


def _location_problems(location: dict, bases: dict) -> list[str]:
    physical = location.get("physicalLocation")
    if not physical:
        return ["a location without physicalLocation"]
    artifact, out = physical.get("artifactLocation") or {}, []
    uri = artifact.get("uri") or ""
    if not uri:
        out.append("artifactLocation.uri empty")
    elif ":" in uri.split("/")[0] or uri.startswith("/") or ".." in uri.split("/"):
        out.append(f"artifactLocation.uri {uri!r} is not relative to the repository root")
    if "uriBaseId" in artifact and artifact["uriBaseId"] not in bases:
        out.append(f"uriBaseId {artifact['uriBaseId']!r} not in originalUriBaseIds")
    line = physical.get("region", {}).get("startLine")
    if not isinstance(line, int) or line < 1:
        out.append(f"region.startLine {line!r}")
    return out


def assert_uploadable(log: dict) -> dict:
    """`log` is valid OASIS SARIF 2.1.0 and passes GitHub's checks; returns it."""
    problems = oasis_problems(log)
    assert not problems, problems[:5]
    problems = github_problems(log)
    assert not problems, problems[:10]
    return log
