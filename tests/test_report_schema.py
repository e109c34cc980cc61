"""gradflow.schema() (gradflow/report/report.schema.json): every command's JSON validates against it, and the default
report stays small.

Every report comes from the real CLI (Typer's runner, in process) on tiny presets and the seed factory; the train
report from a one-step run of a tiny preset.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import gradflow
from tests.helpers.cli import invoke, invoke_main

jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[1]
SCHEMA = gradflow.schema()
SEED_BUG = "gradflow.demos:seed_bug"
DEMO = str(REPO / "gradflow" / "data" / "think_demo.jsonl")


def cli_json(*args, codes=(0, 1)) -> dict:
    run = invoke(*args, "--format", "json")
    assert run.code in codes, (run.code, run.stderr[-2000:])
    return run.json()


def validate(report: dict) -> None:
    errors = sorted(jsonschema.Draft202012Validator(SCHEMA).iter_errors(report), key=lambda e: list(e.path))
    assert not errors, [(list(e.absolute_path), e.message[:300]) for e in errors[:5]]


def test_the_schema_is_valid_draft_2020_12():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("args", [
    ("inspect", SEED_BUG, "--static"),
    ("inspect", SEED_BUG),
    ("inspect", "tiny-llama", "--detail", "params"),
    ("probe-backward", SEED_BUG),
    ("probe-backward", SEED_BUG, "--detail", "params"),
    ("probe-backward", "tiny-gpt2", "--gc", "reentrant", "--seq-len", "16"),
    ("patch", SEED_BUG),
    ("patch", SEED_BUG, "--detail", "params"),
    ("patch", SEED_BUG, "--dry-run"),
], ids=lambda a: " ".join(a[:1] + a[2:]) + (" seed" if SEED_BUG in a else " " + a[1]))
def test_every_command_json_validates(args):
    report = cli_json(*args)
    validate(report)
    assert report["command"] == args[0]
    assert report["detail"] == ("params" if "params" in args else "compact")


def test_opt_in_runs_validate(tmp_path):
    """--check-gc, --steps, --dry-run (no weights) and --baseline add their own parts: all in the schema."""
    for extra, key in ((("--check-gc",), "gc_check"), (("--steps", "2"), "steps"), (("--dry-run",), "dry_run"),
                       (("--baseline", tmp_path / "baseline.json"), "baseline"), (("--packed",), "packed_check")):
        report = cli_json("probe-backward", "tiny-llama", "--gc", "reentrant", "--seq-len", "16", *extra)
        validate(report)
        assert isinstance(report[key], dict), key
    assert cli_json("inspect", "tiny-llama", "--dry-run")["dry_run"]["weights_loaded"] is False


def test_patch_before_after_validate_at_both_levels():
    report = cli_json("patch", SEED_BUG, "--detail", "params")
    validate(report)
    for part in ("before", "after"):
        assert report[part]["detail"] == "params"
        assert len(report[part]["params"]["per_param"]) == report[part]["params"]["trainable"] == 32
        assert len(report[part]["modules"]) == report[part]["modules_total"]
    assert report["before"]["params"]["none_grad"] == 32 and report["after"]["params"]["none_grad"] == 0


@pytest.mark.slow
def test_train_report_json_validates(tmp_path):
    out = tmp_path / "run"
    run = invoke("train", "tiny-llama", "--data", DEMO, "--output", out, "--max-steps", "1", "--seq-len", "32",
                 "--gc", "off", "--save-steps", "100", "--format", "json")
    assert run.code == 0, run.stderr[-3000:]
    written = json.loads((out / "report.json").read_text())
    validate(written)
    assert written["command"] == "train" and written["train"]["status"] == "completed"
    assert written["detail"] == "compact" and "per_param" not in written["params"]
    validate(run.json())  # --format json prints the same document


def test_the_schema_rejects_what_breaks_the_contract():
    report = cli_json("probe-backward", SEED_BUG)
    validate(report)
    broken = [
        {**report, "findings": [{**report["findings"][0], "severity": "fatal"}]},
        {**report, "findings": [{k: v for k, v in report["findings"][0].items() if k != "slug"}]},
        {**report, "params": {**report["params"], "with_grad": -1}},
        {**report, "modules": [{**report["modules"][0], "checkpointing": "sometimes"}]},
        {k: v for k, v in report.items() if k != "loss"},
    ]
    for bad in broken:
        assert list(jsonschema.Draft202012Validator(SCHEMA).iter_errors(bad)), bad


# ----- the compact default ---------------------------------------------------------------------------------------
def test_compact_keeps_layers_and_the_way_to_each_finding():
    compact = cli_json("probe-backward", SEED_BUG)
    full = cli_json("probe-backward", SEED_BUG, "--detail", "params")
    rows = [r["name"] for r in compact["modules"]]
    layers = "base_model.model.model.layers"
    assert {"", "base_model", "base_model.model", "base_model.model.model", f"{layers}.3",
            "base_model.model.model.embed_tokens", "base_model.model.lm_head"} <= set(rows)
    assert not any(".lora_" in r or r.endswith("self_attn") for r in rows)  # below a decoder layer: params only
    for f in compact["findings"]:  # a finding's module and its ancestors stay, whatever its depth
        if f["location"]:
            assert f["location"] in rows
    assert compact["modules_total"] == full["modules_total"] == len(full["modules"]) > 2 * len(rows)
    full_rows = {r["name"]: r for r in full["modules"]}
    assert all(r == full_rows[r["name"]] for r in compact["modules"])  # the same rows, only fewer
    # counts and findings do not depend on the detail
    params = {k: v for k, v in full["params"].items() if k != "per_param"}
    assert compact["params"] == params and "per_param" not in compact["params"]
    assert [f["code"] for f in compact["findings"]] == [f["code"] for f in full["findings"]]
    assert {p["name"] for p in full["params"]["per_param"]} >= set(full["findings"][0]["params"])
    # per-layer gradients: four decoder layers, every LoRA weight without a gradient (the seed bug)
    per_layer = {row["layer"]: row for row in compact["params"]["per_layer"]}
    assert [f"layers.{i}" for i in range(4)] == [k for k in per_layer if k.startswith("layers.")]
    assert all(row["grads"] == {"none": 8} and row["grad_norm"] is None for row in per_layer.values())


def test_compact_stays_small_on_a_deep_model(tmp_path):
    """32 layers with LoRA on every linear layer: ~1,700 modules and 256 trainable tensors."""
    factory = tmp_path / "deep.py"
    factory.write_text(
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from gradflow.setup.presets import preset_config\n\n\n"
        "def build():\n"
        "    config = preset_config('tiny-phi3')\n"
        "    config.num_hidden_layers = 32\n"
        "    torch.manual_seed(0)\n"
        "    return AutoModelForCausalLM.from_config(config)\n")
    args = (f"{factory}:build", "--lora-r", "8", "--lora-targets", "all-linear", "--seq-len", "8")
    run = invoke("probe-backward", *args, "--format", "json")
    assert run.code == 0, run.stderr[-2000:]
    compact, full = run.stdout, invoke("probe-backward", *args, "--format", "json", "--detail", "params").stdout
    data, full_data = json.loads(compact), json.loads(full)
    validate(data)
    validate(full_data)
    assert len(full_data["params"]["per_param"]) == 256 and full_data["modules_total"] > 1600
    assert len(data["modules"]) < 60
    assert len(compact) < 60_000 < 600_000 < len(full), (len(compact), len(full))


def test_detail_from_the_api_and_a_bad_value():
    import gradflow
    from gradflow.errors import GradflowError
    from gradflow.setup.presets import build_preset

    report = gradflow.probe(build_preset("tiny-llama", seed=0))
    assert report.to_dict() == report.to_dict("compact")
    assert len(report.to_dict("params")["params"]["per_param"]) == report.params["trainable"]
    with pytest.raises(GradflowError, match="--detail 'everything' is not one of compact, params"):
        report.to_dict("everything")
    # the console script's main(): a bad choice is one line on stderr and exit 2, before any model loads
    run = invoke_main("probe-backward", "tiny-llama", "--format", "json", "--detail", "everything", cwd=REPO)
    assert run.code == 2 and run.stdout == ""
    assert run.stderr.splitlines() == ["gradflow: error: --detail 'everything' is not one of compact, params. "
                                       "Pick one of those"], run.stderr
