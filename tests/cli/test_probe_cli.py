"""`gradflow probe-backward` end to end: exit codes, text / JSON / SARIF, --fail-on, --data, --quant, factories."""

from __future__ import annotations

import json
import os
import subprocess
import threading

import pytest
import torch

from gradflow.rules.codes import CODES
from tests.helpers.cli import CLI, invoke
from tests.helpers.env import child_env

SEED_BUG = "gradflow.demos:seed_bug"
LAYER0 = "base_model.model.model.layers.0"

FACTORY = '''
import torch
from peft import LoraConfig, get_peft_model

from gradflow.setup.presets import build_preset, build_tokenizer


def _lora_phi3():
    model = build_preset("tiny-phi3", seed=0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                            task_type="CAUSAL_LM"))


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (2, 16), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def full(optimizer="all", trainable="lora_"):
    """Everything a factory may return: model, batch, loss_fn, optimizer, trainable, tokenizer."""
    model = _lora_phi3()
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "half":
        params = params[: len(params) // 2]
    return {"model": model, "batch": _batch(), "loss_fn": lambda m, b: m(**b).loss * 3.0,
            "optimizer": torch.optim.AdamW(params, lr=1e-4), "trainable": trainable, "tokenizer": build_tokenizer()}


def model_and_batch():
    return {"model": _lora_phi3(), "batch": _batch()}


def half_in_optimizer():
    return full(optimizer="half")


def intends_embeddings():
    return full(trainable="lora_|embed_tokens")


def loss_fn_only():
    """A loss_fn and no batch: the batch is synthesised, as for a bare model (SPEC: batch=None)."""
    return {"model": _lora_phi3(), "loss_fn": lambda m, b: m(**b).loss}


def plain_module():
    """Not a transformers model: a plain nn.Module with its own batch and loss."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    return {"model": model, "batch": torch.randn(4, 8), "loss_fn": lambda m, b: m(b).pow(2).mean()}


def costly_embeddings():
    """LoRA plus a trainable embedding matrix: warnings (costly, not saved), no error."""
    model = _lora_phi3()
    model.get_base_model().model.embed_tokens.weight.requires_grad_(True)
    return {"model": model, "batch": _batch()}
'''


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    path = tmp_path_factory.mktemp("factories") / "setups.py"
    path.write_text(FACTORY)
    return path


def probe_json(*args: str) -> tuple[int, dict]:
    run = invoke("probe-backward", *args, "--format", "json")
    assert run.code in (0, 1), run.stderr
    return run.code, json.loads(run.stdout)


def blocking(report: dict) -> list[str]:
    return [f["code"] for f in report["findings"] if f["severity"] in ("error", "warning")]


def test_seed_bug_fails_with_gf101_at_the_layer():
    run = invoke("probe-backward", SEED_BUG)  # the real entry point's exit 1 is checked with the JSON below
    assert run.code == 1, run.stderr
    assert "GF101" in run.stdout and "reentrant-checkpoint-no-input-grad" in run.stdout
    assert f"at {LAYER0}" in run.stdout
    assert "grad_fn: none" in run.stdout  # the loud variant: the loss itself has no grad_fn


@pytest.mark.parametrize("args", [["tiny-phi3"], ["tiny-gpt2"], ["tiny-llama", "--gc", "non-reentrant"],
                                  ["tiny-phi3", "--gc", "reentrant"]], ids=" ".join)
def test_healthy_presets_exit_0(args):
    code, report = probe_json(*args)
    assert code == 0
    assert blocking(report) == []
    p = report["params"]
    assert p["trainable"] > 0 and p["none_grad"] == 0 and p["nonfinite_grad"] == 0
    assert p["with_grad"] == p["trainable"]
    assert report["loss"]["grad_fn"] is not None and report["loss"]["requires_grad"] is True


def test_text_report_for_a_healthy_preset():
    run = invoke("probe-backward", "tiny-llama", "--gc", "non-reentrant")
    assert run.code == 0
    assert "no-grad" not in run.stdout and " none" in run.stdout  # "0 none" in the tensor summary
    assert "gradient norm per layer" in run.stdout
    assert "GF301" in run.stdout  # info, shown but never failing


def test_json_has_the_spec_keys():
    code, report = probe_json(SEED_BUG)
    assert code == 1
    assert report["schema_version"] == 1
    assert isinstance(report["gradflow_version"], str) and report["gradflow_version"]
    assert report["command"] == "probe-backward"
    assert {"class", "params_total", "params_trainable", "quantized"} <= set(report["model"])
    assert report["model"]["quantized"] == "none"
    assert 0 < report["model"]["params_trainable"] < report["model"]["params_total"]
    assert {"value", "requires_grad", "grad_fn", "error"} <= set(report["loss"])
    assert report["loss"]["requires_grad"] is False and report["loss"]["grad_fn"] is None
    assert {"trainable", "with_grad", "none_grad", "zero_grad", "nonfinite_grad"} <= set(report["params"])
    assert report["params"]["none_grad"] == report["params"]["trainable"] == 32
    assert isinstance(report["modules"], list) and report["modules"]
    assert {"name", "class"} <= set(report["modules"][0])
    for f in report["findings"]:
        assert {"code", "slug", "severity", "message", "location", "fix"} <= set(f)
        assert CODES[f["code"]][0] == f["slug"]
        assert f["severity"] in ("error", "warning", "info")
        if f["fix"] is not None:
            assert set(f["fix"]) >= {"title", "applicability"}
            assert f["fix"]["applicability"] in ("safe", "unsafe", "display-only")
    gf101 = next(f for f in report["findings"] if f["code"] == "GF101")
    assert gf101["severity"] == "error" and gf101["location"] == LAYER0
    assert gf101["fix"]["applicability"] == "safe"


def test_sarif_is_2_1_0():
    run = invoke("probe-backward", SEED_BUG, "--format", "sarif")
    assert run.code == 1
    sarif = json.loads(run.stdout)
    assert sarif["version"] == "2.1.0"
    run0 = sarif["runs"][0]
    driver = run0["tool"]["driver"]
    assert driver["name"] == "gradflow"
    rule_ids = [r["id"] for r in driver["rules"]]
    assert set(rule_ids) == set(CODES)
    result = next(r for r in run0["results"] if r["ruleId"] == "GF101")
    assert result["level"] == "error"
    assert driver["rules"][result["ruleIndex"]]["id"] == "GF101"
    assert result["message"]["text"]
    names = [loc["fullyQualifiedName"] for x in result["locations"] for loc in x["logicalLocations"]]
    assert names == [LAYER0]


def test_fail_on_changes_the_exit_code(factory):
    warn_only = f"{factory}:costly_embeddings"
    code, report = probe_json(warn_only)
    assert code == 0  # default --fail-on error: warnings alone pass
    assert {"GF202"} <= set(blocking(report)) and not [f for f in report["findings"] if f["severity"] == "error"]
    assert invoke("probe-backward", warn_only, "--fail-on", "warning").code == 1
    assert invoke("probe-backward", warn_only, "--fail-on", "never").code == 0
    assert invoke("probe-backward", SEED_BUG, "--fail-on", "never").code == 0
    # info findings never fail, even with --fail-on warning
    assert invoke("probe-backward", "tiny-phi3", "--fail-on", "warning").code == 0


@pytest.mark.slow
def test_stdout_is_only_data_while_stderr_shows_progress():
    """stderr on a terminal (so the spinner runs), stdout a pipe: the JSON must parse untouched."""
    import pty

    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.run([*CLI, "probe-backward", SEED_BUG, "--format", "json"], env=child_env(),
                          stdout=subprocess.PIPE, stderr=slave, timeout=300)
    os.close(slave)
    reader.join(timeout=10)
    os.close(master)
    assert proc.returncode == 1  # the real entry point's exit code on the seed bug
    report = json.loads(proc.stdout.decode())
    assert report["command"] == "probe-backward"
    assert any(f["code"] == "GF101" and f["location"] == LAYER0 for f in report["findings"])
    assert b"probing" in b"".join(chunks) or b"loading" in b"".join(chunks)  # the spinner went to stderr


def test_data_jsonl_builds_the_batch(tmp_path):
    data = tmp_path / "samples.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"text": "The quick brown fox jumps over the lazy dog."},
        {"prompt": "What is two plus two?", "completion": " Four."},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                      {"role": "assistant", "content": "Hello! How can I help?"}]},
    ]) + "\n")
    code, from_data = probe_json("tiny-phi3", "--data", str(data), "--batch-size", "3")
    assert code == 0
    assert blocking(from_data) == []
    assert from_data["params"]["none_grad"] == 0 and from_data["loss"]["grad_fn"] is not None
    # the batch came from the file, not from synthetic token ids
    _, synthetic = probe_json("tiny-phi3", "--batch-size", "3")
    assert from_data["loss"]["value"] != pytest.approx(synthetic["loss"]["value"], rel=1e-4)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_preset(bits):
    pytest.importorskip("bitsandbytes")
    code, report = probe_json("tiny-phi3", "--quant", bits)
    assert code == 0
    assert report["model"]["quantized"] == bits
    assert blocking(report) == []
    assert report["params"]["none_grad"] == 0 and report["params"]["trainable"] > 0


def test_factory_dict_with_batch_loss_optimizer_and_trainable(factory):
    code, full = probe_json(f"{factory}:full")
    assert code == 0
    assert blocking(full) == []
    _, plain = probe_json(f"{factory}:model_and_batch")
    # the factory's loss_fn is the one probed: it scales the model's loss by 3
    torch.testing.assert_close(full["loss"]["value"], 3.0 * plain["loss"]["value"], rtol=1e-5, atol=0.0)


def test_factory_loss_fn_without_a_batch_gets_the_synthetic_batch(factory):
    code, data = probe_json(f"{factory}:loss_fn_only", "--batch-size", "3")
    assert code == 0 and not [f for f in data["findings"] if f["severity"] != "info"], data["findings"]
    assert data["loss"]["grad_fn"] is not None


def test_a_multi_line_error_with_a_module_repr_is_one_readable_line():
    """`model(**None)` raises a TypeError whose message opens with the model's repr over many lines."""
    import gradflow
    from tests.helpers.builders import lora

    report = gradflow.probe(lora(), {"input_ids": None}, loss_fn=lambda m, b: m(**b["input_ids"]).loss)
    (finding,) = [f for f in report.findings if f.slug == "step-raised"]
    assert "TypeError: PeftModelForCausalLM(...) argument after ** must be a mapping, not NoneType" in finding.message


def test_factory_optimizer_is_checked(factory):
    code, report = probe_json(f"{factory}:half_in_optimizer")
    assert code == 1
    assert "GF140" in blocking(report)


def test_factory_trainable_intent_is_checked(factory):
    code, report = probe_json(f"{factory}:intends_embeddings")
    assert code == 1
    hit = next(f for f in report["findings"] if f["code"] == "GF112")
    assert "embed_tokens" in hit["location"]


def test_cli_trainable_overrides_intent():
    code, report = probe_json("tiny-phi3", "--trainable", "embed_tokens")
    assert code == 1
    assert "GF112" in blocking(report)


def test_factory_tokenizer_serves_data(factory, tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"prompt": "Say hi.", "completion": " Hi!"}) + "\n")
    code, report = probe_json(f"{factory}:full", "--data", str(data), "--batch-size", "1")
    assert code == 0
    assert report["loss"]["grad_fn"] is not None


def test_lora_on_a_plain_module_factory(factory):
    """--lora-r adds LoRA to any factory's module, not only to transformers models."""
    code, report = probe_json(f"{factory}:plain_module", "--lora-r", "2", "--detail", "params")
    assert code == 0
    assert report["model"]["class"] == "PeftModel"
    names = [p["name"] for p in report["params"]["per_param"]]  # per-parameter rows: --detail params
    assert names and all("lora_" in n for n in names)
    assert report["params"]["none_grad"] == 0
