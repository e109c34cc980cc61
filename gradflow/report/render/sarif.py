"""Findings as SARIF 2.1.0, for code-scanning dashboards in CI (GitHub code scanning among them).

GitHub rejects an upload in which a result has no physical location (a file URI and a line), and it reads URIs
relative to the repository root. gradflow's findings are about modules, not lines, so each result carries both:
the module as a logical location, and one physical location, the first of these that exists:

1. the line of the user's code that set the finding up (a factory inside the repository; see
   gradflow.report.render.source_lines), or line 1 of the factory's file when the name is imported there;
2. the `config.json` of a MODEL directory (or a config.json MODEL) inside the repository;
3. the `pyproject.toml` whose `[tool.gradflow]` configured the run, at that table's line;
4. the nearest `pyproject.toml` from the working directory up to the repository root, at line 1;
5. a stable artifact that names the MODEL, which need not exist: `gradflow/presets/<name>` for a preset,
   `gradflow/hub/<org>/<name>` for a hub id, `gradflow/external/<file name>` (with the real line) for a factory or
   directory outside the repository, `gradflow/model/<class>` when the source is unknown.

Every URI is relative to `%SRCROOT%` (`originalUriBaseIds`): the repository root, i.e. the git top level of the
working directory, else the working directory. No absolute path of the machine appears in a location.

Each result's fingerprint is its slug, module and the MODEL's identity (gradflow.report.identity), the way
baselines identify a finding: not its code, not MODEL as typed.

With `--baseline`, each result has a `baselineState` (new / unchanged), and each baseline finding that is gone is
one more result, `absent`, of kind `pass` and level `none` (fixed: nothing to do).
"""

from __future__ import annotations

import hashlib
import os
import re
from urllib.parse import quote

from gradflow.report.baseline import comparison_states
from gradflow.report.identity import model_identity, repository_root
from gradflow.report.render.source_lines import SourceLines, relative_uri, source_lines  # noqa: F401 (re-exported)
from gradflow.rules import all_rules
from gradflow.setup.presets import PRESETS

_LEVEL = {"error": "error", "warning": "warning", "info": "note"}
# v2: slug, module and the MODEL's identity (v1 hashed the code and MODEL as typed)
FINGERPRINT = "gradflowFinding/v2"


def to_sarif(report, source: str | None = None, *, root: str | None = None, config: str | None = None) -> dict:
    """The report as a SARIF 2.1.0 log.

    Args:
        report: a Report (with its `baseline` section when --baseline compared it).
        source: the MODEL argument it came from (a factory spec, directory, config.json, preset or hub id): gives
            results the physical location of the line or file that set them up.
        root: the directory URIs are relative to (default: `repository_root()` of the working directory).
        config: the pyproject.toml whose `[tool.gradflow]` configured the run, if any (a fallback location).
    """
    from gradflow import __version__

    root = os.path.abspath(root or repository_root())
    found_states, fixed = comparison_states(report.findings, report.baseline)
    rules = _rules(fixed)
    index = {r["id"]: i for i, r in enumerate(rules)}
    by_slug = {r["name"]: r["id"] for r in rules}
    model_class = (report.model or {}).get("class")
    where = locate(source, root=root, config=config, model_class=model_class)
    model = model_identity(source, root=root, model_class=model_class)
    results = []
    for i, f in enumerate(report.findings):
        result = _result(f.code, index[f.code], _LEVEL[f.severity], f.message, f.slug, f.location, where, model)
        if f.fix:
            result["properties"].update(fix=f.fix.title, applicability=str(f.fix.applicability))
        if found_states is not None:
            result["baselineState"] = found_states[i]
        results.append(result)
    for f in fixed:  # in the baseline, gone now: reported as fixed, never as a problem
        message = f"Fixed: {f['slug']}" + (f" at {f['location']}" if f.get("location") else "") + \
            f" is in the baseline {report.baseline['file']} but no longer found."
        # slugs outlive codes; a retired slug has a rule of its own (_rules)
        code = by_slug.get(f["slug"]) or (f["code"] if f["code"] in index else f"gradflow/{f['slug']}")
        result = _result(code, index[code], "none", message, f["slug"], f.get("location"), where, model,
                         identity="absent")
        results.append(dict(result, kind="pass", baselineState="absent"))
    run = {
        "tool": {"driver": {"name": "gradflow", "version": __version__, "rules": rules,
                            "informationUri": "https://github.com/gradflow/gradflow"}},
        "originalUriBaseIds": {"%SRCROOT%": {"uri": _dir_uri(root)}},
        "results": results,
    }
    return {"$schema": "https://json.schemastore.org/sarif-2.1.0.json", "version": "2.1.0", "runs": [run]}


def _rules(fixed: list[dict]) -> list[dict]:
    """The driver's rules: gradflow's, then one per retired slug a fixed baseline finding names (every result's
    ruleId is a rule of the driver)."""
    rules = [{
        "id": r.code, "name": r.slug,
        "shortDescription": {"text": r.slug.replace("-", " ")},
        "fullDescription": {"text": r.doc.strip().split("\n\n")[0].replace("## What it does\n", "")},
        "defaultConfiguration": {"level": _LEVEL[r.severity]},
        "help": {"text": r.doc.strip()},
    } for r in all_rules()]
    known = {r["name"] for r in rules} | {r["id"] for r in rules}
    for slug in sorted({f["slug"] for f in fixed if f["slug"] not in known and f.get("code") not in known}):
        text = f"{slug}: a finding this version of gradflow no longer reports (retired since the baseline)."
        rules.append({"id": f"gradflow/{slug}", "name": slug, "shortDescription": {"text": slug.replace("-", " ")},
                      "fullDescription": {"text": text}, "defaultConfiguration": {"level": "none"},
                      "help": {"text": text + " Pass --update-baseline to drop it from the baseline."}})
    return rules


def _result(code, rule_index, level, message, slug, module, where: SourceLines, model: str,
            identity: str = "") -> dict:
    result = {"ruleId": code, "ruleIndex": rule_index}
    location = {"physicalLocation": where.physical(slug)}
    if module:
        location["logicalLocations"] = [{"fullyQualifiedName": module, "kind": "module"}]
    # one identity per finding, module and MODEL (gradflow.report.identity: not its spelling), as the baseline
    # keys it (the slug, not the code), so code scanning tracks it across commits; a fixed finding's result has
    # its own, so that the finding's alert closes rather than living on as the fix
    key = f"{slug}|{module or ''}|{model}" + (f"|{identity}" if identity else "")
    result.update(level=level, message={"text": message}, locations=[location],
                  partialFingerprints={FINGERPRINT: hashlib.sha256(key.encode()).hexdigest()[:32]},
                  properties={"slug": slug})
    return result


def locate(source: str | None, *, root: str, config: str | None = None,
           model_class: str | None = None) -> SourceLines:
    """Where a result of MODEL `source` points (see the module docstring for the order); always a relative URI."""
    where = source_lines(source, root=root) if source else None
    if where is not None and where.uri:
        return where
    target = source.rpartition(":")[0] if source and ":" in source else None
    if where is None and target and target.endswith(".py") and os.path.isfile(target) and relative_uri(target, root):
        return SourceLines(os.path.abspath(target), {}, 1, fallback=(), uri=relative_uri(target, root))  # no def
    if config and relative_uri(config, root):
        line = _line_of(config, re.compile(r"^\s*\[tool\.gradflow[\].]"))
        return SourceLines(os.path.abspath(config), {}, line, fallback=(), uri=relative_uri(config, root))
    nearest = _nearest_pyproject(root)
    if nearest is not None:
        return SourceLines(nearest, {}, 1, fallback=(), uri=relative_uri(nearest, root))
    if where is not None:  # a file outside the repository: its name and real lines, not the machine's path
        name = os.path.basename(where.path)
        if name.endswith(".json"):  # a model's config.json, an adapter's adapter_config.json: with the folder
            name = f"{os.path.basename(os.path.dirname(where.path))}/{name}"
        return SourceLines(where.path, where.lines, where.default, where.fallback, uri=f"gradflow/external/{name}")
    return SourceLines("", {}, 1, fallback=(), uri=_virtual_uri(source, model_class))


def _virtual_uri(source: str | None, model_class: str | None) -> str:
    if not source:
        folder, name = "model", model_class or "unknown"
    elif source in PRESETS:
        folder, name = "presets", source
    elif ":" not in source and not os.path.exists(source):
        folder, name = "hub", source
    else:  # a factory or file that cannot be read (outside the repository, or gone)
        folder, name = "external", os.path.basename(source.rpartition(":")[0] or source)
    parts = [p for p in re.split(r"[/\\]+", name) if p not in ("", ".", "..")] or ["unknown"]
    return f"gradflow/{folder}/" + "/".join(quote(p) for p in parts)


def _nearest_pyproject(root: str) -> str | None:
    folder = os.path.abspath(os.getcwd())
    while relative_uri(folder, root) is not None or folder == root:
        candidate = os.path.join(folder, "pyproject.toml")
        if os.path.isfile(candidate):
            return candidate
        if folder == root:
            return None
        folder = os.path.dirname(folder)
    return None


def _line_of(path: str, pattern: re.Pattern) -> int:
    try:
        with open(path, encoding="utf-8") as fh:
            for no, text in enumerate(fh, 1):
                if pattern.match(text):
                    return no
    except (OSError, UnicodeDecodeError):
        pass
    return 1


def _dir_uri(path: str) -> str:
    from pathlib import Path

    uri = Path(path).as_uri()
    return uri if uri.endswith("/") else uri + "/"
