"""`probe-backward --dry-run` and `inspect --dry-run`: a config.json, its directory or a preset; no weights loaded."""

from __future__ import annotations

import json

import pytest

from tests.helpers.cli import assert_one_line_error, invoke, invoke_main

SETUP = ["--lora-r", "8", "--lora-targets", "all-linear", "--gc", "reentrant", "--device", "cpu", "--seq-len", "16"]


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    """A Llama config.json alone, as a hub repo's config is before any weights are fetched (6 layers, GQA 8/2)."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama-config")
    LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False).save_pretrained(folder)
    return folder


def _full_counts(folder):
    """Parameter count of the full-size model, and of its all-linear LoRA r=8, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    total = sum(p.numel() for p in model.parameters())
    lora = sum(8 * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head")
    return total, lora


def test_config_json_path_json_report(config_dir):
    run = invoke("probe-backward", str(config_dir / "config.json"), "--dry-run", *SETUP, "--format", "json")
    assert run.code == 0, run.stderr
    report = run.json()
    total, lora = _full_counts(config_dir)
    assert report["model"]["params_total"] == total + lora  # the real sizes, not the twin's
    assert report["model"]["params_trainable"] == lora
    assert report["model"]["dry_run"] is True and report["model"]["gradient_checkpointing"] == "reentrant"
    dry = report["dry_run"]
    assert dry["weights_loaded"] is False and dry["config"]["num_hidden_layers"] == 6
    assert dry["twin"]["hidden_size"] < 1024
    assert set(dry["not_seen"]) == {"nonfinite-grad", "no-supervised-tokens", "param-not-in-optimizer"}
    assert report["params"]["none_grad"] == 0 and report["loss"]["value"] is None
    assert {f["slug"] for f in report["findings"]} == {"lora-zero-init", "use-cache-in-training"}


def test_directory_text_report_says_it_is_a_dry_run(config_dir):
    run = invoke("probe-backward", str(config_dir), "--dry-run", *SETUP)
    assert run.code == 0, run.stderr
    assert "dry run: no weights loaded" in run.stdout
    assert "not seen by a dry run: nonfinite-grad" in run.stdout and "no-supervised-tokens" in run.stdout
    assert "6 layers" in run.stdout and "Traceback" not in run.stderr


def test_preset(tmp_path):
    run = invoke("probe-backward", "tiny-llama", "--dry-run", *SETUP, "--format", "json")
    assert run.code == 0, run.stderr
    assert run.json()["dry_run"]["config_class"] == "LlamaConfig"


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_quantized_preset_with_a_dtype(quant):
    # the twin is quantized while it loads, in that dtype: casting it again raised ValueError (seen on an H100)
    run = invoke("probe-backward", "tiny-phi3", "--dry-run", *SETUP, "--quant", quant, "--dtype", "bfloat16",
                 "--format", "json")
    assert run.code == 0, run.stderr
    data = run.json()
    assert data["model"]["quantized"] == quant and data["params"]["trainable"] > 0
    assert "reentrant-checkpoint-no-input-grad" not in [f["slug"] for f in data["findings"]]  # prepared for k-bit


def test_directory_with_weights_reads_only_the_config(tmp_path):
    """A save_pretrained directory works too; its weights are never read (here they are not even valid)."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=0).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    run = invoke("probe-backward", str(tmp_path), "--dry-run", *SETUP, "--format", "json")
    assert run.code == 0, run.stderr
    assert run.json()["dry_run"]["weights_loaded"] is False


def test_broken_setup_exits_1(config_dir):
    # the user means to train the embeddings beside LoRA, but LoRA froze them
    run = invoke("probe-backward", str(config_dir), "--dry-run", *SETUP, "--trainable", "lora_|embed_tokens",
                 "--format", "json")
    assert run.code == 1, run.stderr
    finding = next(f for f in run.json()["findings"] if f["slug"] == "intended-param-frozen")
    assert finding["severity"] == "error" and finding["params"] == ["base_model.model.model.embed_tokens.weight"]


def test_inspect_dry_run_tree(config_dir):
    run = invoke("inspect", str(config_dir / "config.json"), "--dry-run", *SETUP)
    assert run.code == 0, run.stderr
    assert "layers" in run.stdout and "dry run: no weights loaded" in run.stdout
    run = invoke("inspect", str(config_dir), "--dry-run", "--static", *SETUP, "--format", "json")
    assert run.code == 0, run.stderr
    report = run.json()
    assert report["command"] == "inspect" and report["params"]["with_grad"] is None
    total, lora = _full_counts(config_dir)
    root = next(m for m in report["modules"] if m["name"] == "")
    assert (root["trainable"], root["frozen"]) == (lora, total)


def test_bad_path_is_one_line(tmp_path):  # the console script's main(), its one line and exit 2
    assert_one_line_error(invoke_main("probe-backward", tmp_path / "nowhere" / "config.json", "--dry-run"),
                          "no such directory")


@pytest.mark.parametrize("case", ["empty-dir", "not-json", "no-model-type", "factory", "data", "check-gc",
                                  "config-without-dry-run"])
def test_refusals_are_one_line(tmp_path, config_dir, case):
    bad = tmp_path / "config.json"
    args, needle = {
        "empty-dir": ([str(tmp_path), "--dry-run"], "holds no config.json"),
        "not-json": ([str(bad), "--dry-run"], "not readable JSON"),
        "no-model-type": ([str(bad), "--dry-run"], "not a transformers model config"),
        "factory": (["gradflow.demos:seed_bug", "--dry-run"], "is a factory"),
        "data": ([str(config_dir), "--dry-run", "--data", str(bad)], "--data"),
        "check-gc": ([str(config_dir), "--dry-run", "--check-gc"], "--check-gc"),
        "config-without-dry-run": ([str(config_dir / "config.json")], "--dry-run"),
    }[case]
    if case == "not-json":
        bad.write_text("{not json")
    elif case == "no-model-type":
        bad.write_text(json.dumps({"hidden_size": 8}))
    elif case == "data":
        bad.write_text(json.dumps({"text": "hello"}) + "\n")
    run = invoke("probe-backward", *args)
    assert run.code == 2 and run.stdout == "", (run.code, run.stdout[-500:], run.stderr[-500:])
    line = run.stderr.strip()
    assert "\n" not in line and "Traceback" not in line and needle in line, line
