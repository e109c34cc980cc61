"""SARIF that GitHub code scanning accepts: valid against the OASIS SARIF 2.1.0 schema (vendored in tests/data)
and GitHub's own checks (tests/helpers/sarif.py lists them), with each result at the line of the user's code that
set the finding up where gradflow can tell it, and always at a file path relative to the repository root."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.helpers.cli import gradflow, invoke
from tests.helpers.env import child_env
from tests.helpers.sarif import OASIS, assert_uploadable, github_problems

jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[1]
SEED_BUG = "gradflow.demos:seed_bug"

FACTORY = '''
from peft import LoraConfig, get_peft_model

from gradflow.setup.presets import build_preset


def frozen_adapter():
    model = build_preset("tiny-llama", seed=0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))  # PEFT
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad = False  # FREEZE
    return model


def _wrap(model):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))  # HELPER


def reentrant_without_hook():
    model = _wrap(build_preset("tiny-llama", seed=0))  # WRAPPED
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})  # GC
    if getattr(base, "_require_grads_hooks", None) or getattr(base, "_require_grads_hook", None):
        base.disable_input_require_grads()  # transformers 5 adds the hook itself: take it away, as 4.57 never adds it
    return model


def healthy():
    return _wrap(build_preset("tiny-llama", seed=0))
'''


def line_of(path: Path, marker: str) -> int:
    hits = [i for i, text in enumerate(path.read_text().splitlines(), 1) if marker in text]
    assert len(hits) == 1, (marker, hits)
    return hits[0]


def sarif(*args) -> dict:
    result = invoke("probe-backward", *args, "--format", "sarif")
    assert result.code in (0, 1), result.stderr[-2000:]
    return assert_uploadable(result.json())


def results(log) -> dict:
    return {r["properties"]["slug"]: r for r in log["runs"][0]["results"]}


def physical(result) -> tuple[str, str | None, int]:
    (location,) = result["locations"]
    phys = location["physicalLocation"]
    return phys["artifactLocation"]["uri"], phys["artifactLocation"].get("uriBaseId"), phys["region"]["startLine"]


def uris(log) -> set[str]:
    return {loc["physicalLocation"]["artifactLocation"]["uri"] for r in log["runs"][0]["results"]
            for loc in r["locations"]}


@pytest.fixture
def factory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the repository root, as in CI: URIs are relative to it
    path = tmp_path / "train_setup.py"
    path.write_text(textwrap.dedent(FACTORY))
    return path


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git repository (`git init`) in a temporary folder, the working directory in its `ci/` subfolder."""
    root = tmp_path / "repo"
    (root / "ci").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    monkeypatch.chdir(root / "ci")
    return root


def test_the_vendored_schema_is_oasis_sarif_2_1_0():
    jsonschema.Draft4Validator.check_schema(OASIS)
    assert OASIS["id"] == "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
    # it has teeth: a result without its message is rejected
    log = {"version": "2.1.0", "runs": [{"tool": {"driver": {"name": "gradflow"}}, "results": [{"ruleId": "GF101"}]}]}
    assert list(jsonschema.Draft4Validator(OASIS).iter_errors(log))


def test_seed_bug_points_at_the_line_that_turned_checkpointing_on():
    log = sarif(SEED_BUG)
    run = log["runs"][0]
    assert run["originalUriBaseIds"]["%SRCROOT%"]["uri"].startswith("file:///")
    found = results(log)
    uri, base, line = physical(found["reentrant-checkpoint-no-input-grad"])
    demos = REPO / "gradflow" / "demos.py"
    assert (uri, base) == ("gradflow/demos.py", "%SRCROOT%")  # tests run from the repository root
    assert line == line_of(demos, "base.gradient_checkpointing_enable(")  # inside _seed_setup, which seed_bug calls
    names = [loc["fullyQualifiedName"] for loc in found["reentrant-checkpoint-no-input-grad"]["locations"][0]
             ["logicalLocations"]]
    assert names == ["base_model.model.model.layers.0"]  # the module stays, as a logical location
    assert all(len(r["partialFingerprints"]["gradflowFinding/v2"]) == 32 for r in run["results"])


def test_factory_results_carry_the_line_that_caused_them(factory):
    found = results(sarif(f"{factory}:frozen_adapter"))
    assert physical(found["adapter-frozen"]) == ("train_setup.py", "%SRCROOT%", line_of(factory, "# FREEZE"))

    found = results(sarif(f"{factory}:reentrant_without_hook"))
    assert physical(found["reentrant-checkpoint-no-input-grad"]) == ("train_setup.py", "%SRCROOT%",
                                                                     line_of(factory, "# GC"))


def test_a_factory_whose_name_is_imported_points_at_its_file(factory):
    (factory.parent / "entry.py").write_text("from train_setup import frozen_adapter  # noqa: F401\n")
    found = results(sarif("entry.py:frozen_adapter"))
    assert physical(found["adapter-frozen"]) == ("entry.py", "%SRCROOT%", 1)  # no def there to point at


def test_a_healthy_factory_gives_a_valid_log_without_problems(factory):
    found = results(sarif(f"{factory}:healthy"))
    assert set(found) <= {"lora-zero-init"}  # info only
    assert found, "lora_B starts at zero: lora_A's first gradient is zero (info)"
    for result in found.values():
        assert result["level"] == "note"
        # about the adapter: the line that made it, in the helper the factory calls
        assert physical(result) == ("train_setup.py", "%SRCROOT%", line_of(factory, "# HELPER"))


def test_a_model_directory_points_at_its_config(preset_dir, monkeypatch):
    directory = preset_dir("tiny-llama")
    monkeypatch.chdir(directory.parent)
    found = results(sarif(directory.name, "--trainable", "lm_head|lora_"))
    uri, base, line = physical(found["intended-param-frozen"])
    assert (uri, base, line) == (f"{directory.name}/config.json", "%SRCROOT%", 1)


def test_source_lines_of_a_trainer_factory_without_running_it():
    """A Trainer built with gradient_checkpointing=True in TrainingArguments: that keyword's line, read by a source
    scan only (the factory is not imported)."""
    from gradflow.report.render.sarif import source_lines

    script = REPO / "tests" / "realistic" / "lora_gc_reentrant.py"
    where = source_lines(f"{script}:build", root=str(REPO))
    gc_line = line_of(script, "gradient_checkpointing=True")
    assert where.line_for("reentrant-checkpoint-no-input-grad") == gc_line
    assert where.line_for("adapter-frozen") == line_of(script, "model = get_peft_model(")
    assert where.line_for("param-not-in-optimizer") == line_of(script, "return Trainer(")
    assert where.physical("nested-checkpoint")["artifactLocation"] == {
        "uri": "tests/realistic/lora_gc_reentrant.py", "uriBaseId": "%SRCROOT%"}
    assert source_lines("tiny-llama") is None and source_lines("org/model-id") is None
    assert source_lines(f"{script}:no_such_function") is None
    # a module-level object: its assignment, and the module's own statements (not the __main__ block)
    texts = source_lines(f"{script}:TEXTS", root=str(REPO))
    assert texts.line_for("adapter-frozen") == line_of(script, "TEXTS = [")


# ----- GitHub's checks ----------------------------------------------------------------------------------------
def test_the_github_checks_have_teeth():
    """Each check in tests/helpers/sarif.py rejects the log that breaks it (and passes a good one)."""
    good = {"$schema": "https://json.schemastore.org/sarif-2.1.0.json", "version": "2.1.0", "runs": [{
        "tool": {"driver": {"name": "gradflow", "rules": [{"id": "GF101", "shortDescription": {"text": "s"},
                                                           "fullDescription": {"text": "f"}, "help": {"text": "h"}}]}},
        "originalUriBaseIds": {"%SRCROOT%": {"uri": "file:///repo/"}},
        "results": [{"ruleId": "GF101", "ruleIndex": 0, "level": "error", "message": {"text": "m"},
                     "partialFingerprints": {"k": "v"}, "baselineState": "new",
                     "locations": [{"physicalLocation": {"artifactLocation": {"uri": "a.py", "uriBaseId": "%SRCROOT%"},
                                                         "region": {"startLine": 3}}}]}]}]}
    assert_uploadable(good)
    breaks = {
        "version": lambda log: log.update(version="2.0.0"),
        "runs": lambda log: log.update(runs=log["runs"] * 21),
        "driver.name": lambda log: log["runs"][0]["tool"]["driver"].pop("name"),
        "unique ids": lambda log: log["runs"][0]["tool"]["driver"]["rules"].append(
            log["runs"][0]["tool"]["driver"]["rules"][0]),
        "help": lambda log: log["runs"][0]["tool"]["driver"]["rules"][0].pop("help"),
        "ruleId": lambda log: _result(log).pop("ruleId"),
        "ruleIndex": lambda log: _result(log).update(ruleIndex=3),
        "rule not in the driver": lambda log: (_result(log).pop("ruleIndex"), _result(log).update(ruleId="GF9")),
        "message": lambda log: _result(log).update(message={"text": ""}),
        "level": lambda log: _result(log).update(kind="pass"),
        "baselineState": lambda log: _result(log).update(baselineState="fixed"),
        "fingerprints": lambda log: _result(log).pop("partialFingerprints"),
        "no location": lambda log: _result(log).update(locations=[]),
        "logical only": lambda log: _result(log).update(locations=[{"logicalLocations": [{"name": "m"}]}]),
        "absolute uri": lambda log: _artifact(log).update(uri="file:///home/me/a.py"),
        "rooted uri": lambda log: _artifact(log).update(uri="/home/me/a.py"),
        "escaping uri": lambda log: _artifact(log).update(uri="../a.py"),
        "empty uri": lambda log: _artifact(log).update(uri=""),
        "base id": lambda log: _artifact(log).update(uriBaseId="%NOPE%"),
        "start line": lambda log: _result(log)["locations"][0]["physicalLocation"]["region"].update(startLine=0),
        "SRCROOT uri": lambda log: log["runs"][0]["originalUriBaseIds"]["%SRCROOT%"].update(uri="repo"),
    }
    for name, spoil in breaks.items():
        log = copy.deepcopy(good)
        spoil(log)
        assert github_problems(log), name


def _result(log) -> dict:
    return log["runs"][0]["results"][0]


def _artifact(log) -> dict:
    return _result(log)["locations"][0]["physicalLocation"]["artifactLocation"]


# ----- a physical location for every MODEL kind ---------------------------------------------------------------
def test_uris_are_relative_to_the_git_top_level(repo):
    (repo / "pyproject.toml").write_text('[project]\nname = "demo"\n\n[tool.gradflow]\nfail-on = "error"\n')
    log = sarif("tiny-llama", "--trainable", "lm_head|lora_")
    assert log["runs"][0]["originalUriBaseIds"]["%SRCROOT%"]["uri"] == repo.resolve().as_uri() + "/"
    for result in results(log).values():  # the [tool.gradflow] table that configured the run, from ci/
        assert physical(result) == ("pyproject.toml", "%SRCROOT%", 4)
        assert result["locations"][0]["logicalLocations"][0]["fullyQualifiedName"]  # the module stays


def test_a_preset_points_at_the_nearest_pyproject_else_a_named_artifact(repo):
    (repo / "ci" / "pyproject.toml").write_text('[project]\nname = "ci-tools"\n')  # no [tool.gradflow]
    assert uris(sarif("tiny-llama")) == {"ci/pyproject.toml"}
    os.remove(repo / "ci" / "pyproject.toml")
    found = results(sarif("tiny-llama", "--trainable", "lm_head|lora_"))
    assert {physical(r) for r in found.values()} == {("gradflow/presets/tiny-llama", "%SRCROOT%", 1)}


def test_a_model_directory_outside_the_repository(repo, preset_dir):
    directory = preset_dir("tiny-llama")  # another temporary folder
    log = sarif(str(directory), "--trainable", "lm_head|lora_")
    assert uris(log) == {f"gradflow/external/{directory.name}/config.json"}
    assert str(directory) not in json.dumps(log["runs"][0]["results"])  # no path of this machine in a location


def test_a_factory_outside_the_repository_keeps_its_lines(repo, tmp_path):
    outside = tmp_path / "elsewhere" / "train_setup.py"
    outside.parent.mkdir()
    outside.write_text(textwrap.dedent(FACTORY))
    found = results(sarif(f"{outside}:frozen_adapter"))
    assert physical(found["adapter-frozen"]) == ("gradflow/external/train_setup.py", "%SRCROOT%",
                                                 line_of(outside, "# FREEZE"))
    # an installed module (the seed demo, outside this git repository): its file name and line
    found = results(sarif(SEED_BUG))
    uri, _, line = physical(found["reentrant-checkpoint-no-input-grad"])
    assert (uri, line) == ("gradflow/external/demos.py",
                           line_of(REPO / "gradflow" / "demos.py", "base.gradient_checkpointing_enable("))


def test_a_hub_id_gets_a_named_artifact(tmp_path, monkeypatch):
    """A hub id cannot be loaded in-process here (no network); the location depends on the MODEL string only, so a
    real probe report of the same tiny model is rendered with the hub id as its source."""
    import gradflow
    from gradflow.report.render.sarif import to_sarif

    monkeypatch.chdir(tmp_path)
    log = assert_uploadable(to_sarif(gradflow.probe("tiny-llama"), source="acme/tiny-llama"))
    assert uris(log) == {"gradflow/hub/acme/tiny-llama"}
    assert uris(assert_uploadable(to_sarif(gradflow.probe("tiny-llama")))) == {"gradflow/model/PeftModelForCausalLM"}


@pytest.mark.slow
def test_a_hub_id_from_the_cache_end_to_end(tmp_path, preset_dir):
    """The CLI in a fresh process resolves a hub id from a local hub cache (HF_HUB_CACHE, offline)."""
    repo_cache = tmp_path / "hub" / "models--acme--tiny-llama"
    snapshot = repo_cache / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir(parents=True)
    os.symlink(preset_dir("tiny-llama"), snapshot)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text("0" * 40)
    work = tmp_path / "work"
    work.mkdir()
    run = gradflow("probe-backward", "acme/tiny-llama", "--format", "sarif", cwd=work,
                   env=child_env(HF_HUB_CACHE=tmp_path / "hub"))
    assert run.code == 0, run.stderr[-2000:]
    log = assert_uploadable(json.loads(run.stdout))
    assert uris(log) == {"gradflow/hub/acme/tiny-llama"} and results(log)["lora-zero-init"]
