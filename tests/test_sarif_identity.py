"""SARIF identities and URIs that code scanning can track: a result's fingerprint is its slug, module and the MODEL
as gradflow.report.identity names it (never the code, never MODEL as typed); an installed package's file (a venv
inside the repository included) is no repository file; an adapter directory in the repository is one."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import textwrap

import pytest

import gradflow
from gradflow.report.render.sarif import to_sarif
from tests.helpers.sarif import assert_uploadable, github_problems
from tests.test_sarif import FACTORY, line_of, physical, results, sarif

pytest.importorskip("jsonschema")
FINGERPRINT = "gradflowFinding/v2"  # v1 hashed the code and MODEL as typed


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git repository, the working directory at its top."""
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    monkeypatch.chdir(root)
    return root


def fingerprints(log) -> dict:
    return {r["properties"]["slug"]: r["partialFingerprints"][FINGERPRINT] for r in log["runs"][0]["results"]}


def test_fingerprints_do_not_depend_on_how_model_is_spelled(repo, monkeypatch):
    (repo / "sub").mkdir()
    (repo / "sub" / "setup_bug.py").write_text(textwrap.dedent(FACTORY))
    spellings = ["sub/setup_bug.py:frozen_adapter", "./sub/setup_bug.py:frozen_adapter",
                 f"{repo}/sub/setup_bug.py:frozen_adapter"]
    logs = [sarif(spec) for spec in spellings]
    monkeypatch.chdir(repo / "sub")  # run from a folder of the repository
    logs.append(sarif("setup_bug.py:frozen_adapter"))
    assert len({json.dumps(fingerprints(log), sort_keys=True) for log in logs}) == 1
    assert {physical(results(log)["adapter-frozen"])[0] for log in logs} == {"sub/setup_bug.py"}
    # another factory of the same file is another setup: its findings are other alerts
    other = fingerprints(sarif("setup_bug.py:reentrant_without_hook"))
    assert not set(other.values()) & set(fingerprints(logs[0]).values())


def test_a_renamed_code_keeps_the_fixed_findings_fingerprint(tmp_path, monkeypatch):
    """The baseline identifies a finding by slug and location; so does the fingerprint (a renamed code is no
    change), and a slug this version no longer has gets a rule of its own in the driver."""
    monkeypatch.chdir(tmp_path)
    report = gradflow.probe("tiny-llama")
    where = "base_model.model.model.layers.0"
    logs = []
    for code, slug in (("GF101", "reentrant-checkpoint-no-input-grad"), ("GF999", "reentrant-checkpoint-no-input-grad"),
                       ("GF998", "retired-rule")):
        removed = [{"code": code, "slug": slug, "location": where}]
        section = {"file": "b.json", "status": "changed", "findings": {"added": [], "removed": removed,
                                                                          "unchanged": []}}
        logs.append(assert_uploadable(to_sarif(dataclasses.replace(report, baseline=section), source="tiny-llama")))
    absent = [[r for r in log["runs"][0]["results"] if r.get("baselineState") == "absent"][0] for log in logs]
    assert absent[0]["partialFingerprints"] == absent[1]["partialFingerprints"]
    assert [r["ruleId"] for r in absent] == ["GF101", "GF101", "gradflow/retired-rule"]
    rules = logs[2]["runs"][0]["tool"]["driver"]["rules"]
    assert rules[absent[2]["ruleIndex"]]["id"] == "gradflow/retired-rule"
    assert "retired" in rules[absent[2]["ruleIndex"]]["fullDescription"]["text"]


def test_a_rule_id_missing_from_the_driver_is_a_github_problem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log = to_sarif(gradflow.probe("tiny-llama"), source="tiny-llama")
    assert not github_problems(log)
    result = log["runs"][0]["results"][0]
    result.update(ruleId="gradflow/retired-rule")
    result.pop("ruleIndex")
    assert github_problems(log) == ["runs[0].results[0] ruleId 'gradflow/retired-rule' is not a rule of the driver"]


def test_an_installed_factory_in_a_venv_inside_the_repository_is_no_repository_file(repo, monkeypatch):
    site = repo / ".venv" / "lib" / "python3.11" / "site-packages"
    (site / "acme_setups").mkdir(parents=True)
    (site / "acme_setups" / "__init__.py").write_text("")
    (site / "acme_setups" / "train.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(site))
    found = results(sarif("acme_setups.train:frozen_adapter"))
    # not .venv/lib/...: the file's name and real line, as for any factory outside the repository
    assert physical(found["adapter-frozen"]) == ("gradflow/external/train.py", "%SRCROOT%",
                                                 line_of(site / "acme_setups" / "train.py", "# FREEZE"))
    (repo / "pyproject.toml").write_text('[project]\nname = "demo"\n')
    assert physical(results(sarif("acme_setups.train:frozen_adapter"))["adapter-frozen"])[0] == "pyproject.toml"


def test_an_adapter_directory_in_the_repository_points_at_its_adapter_config(repo, tmp_path):
    from tests.helpers.builders import lora

    lora("tiny-llama", target_modules=["q_proj"]).save_pretrained(str(repo / "adapter"))
    config = repo / "adapter" / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"base_model_name_or_path": "tiny-llama"}))
    found = results(sarif("adapter"))  # loaded frozen: adapter-frozen
    assert physical(found["adapter-frozen"]) == ("adapter/adapter_config.json", "%SRCROOT%", 1)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (repo / "adapter").rename(outside / "adapter")
    found = results(sarif(str(outside / "adapter")))
    assert physical(found["adapter-frozen"])[0] == "gradflow/external/adapter/adapter_config.json"
