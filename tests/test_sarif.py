"""SARIF that GitHub code scanning accepts: valid against the OASIS SARIF 2.1.0 schema (vendored in tests/data),
with each result at the line of the user's code that set the finding up, where gradflow can tell it."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.helpers.cli import invoke

jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[1]
# OASIS SARIF 2.1.0 (errata01) JSON schema, byte for byte as in oasis-tcs/sarif-spec Schemata/sarif-schema-2.1.0.json
OASIS = json.loads((REPO / "tests" / "data" / "sarif-schema-2.1.0.json").read_text())
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
    log = result.json()
    errors = list(jsonschema.Draft4Validator(OASIS).iter_errors(log))
    assert not errors, [(list(e.absolute_path), e.message[:300]) for e in errors[:5]]
    return log


def results(log) -> dict:
    return {r["properties"]["slug"]: r for r in log["runs"][0]["results"]}


def physical(result) -> tuple[str, str | None, int]:
    (location,) = result["locations"]
    phys = location["physicalLocation"]
    return phys["artifactLocation"]["uri"], phys["artifactLocation"].get("uriBaseId"), phys["region"]["startLine"]


@pytest.fixture
def factory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the repository root, as in CI: URIs are relative to it
    path = tmp_path / "train_setup.py"
    path.write_text(textwrap.dedent(FACTORY))
    return path


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
    assert all(len(r["partialFingerprints"]["gradflowFinding/v1"]) == 32 for r in run["results"])


def test_factory_results_carry_the_line_that_caused_them(factory):
    found = results(sarif(f"{factory}:frozen_adapter"))
    assert physical(found["adapter-frozen"]) == ("train_setup.py", "%SRCROOT%", line_of(factory, "# FREEZE"))

    found = results(sarif(f"{factory}:reentrant_without_hook"))
    assert physical(found["reentrant-checkpoint-no-input-grad"]) == ("train_setup.py", "%SRCROOT%",
                                                                     line_of(factory, "# GC"))


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


def test_a_preset_has_only_a_logical_location():
    found = results(sarif("tiny-llama", "--trainable", "lm_head|lora_"))
    (location,) = found["intended-param-frozen"]["locations"]
    assert "physicalLocation" not in location and location["logicalLocations"][0]["fullyQualifiedName"]


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
