"""`gradflow inspect` end to end: the collapsed tree, the highlighted cut, --static, --depth, --format json."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers.cli import invoke, invoke_main

FACTORY = '''
from pathlib import Path

import torch

MARKER = Path(__file__).with_name("forward_ran")


class Recorder(torch.nn.Module):
    """A model whose forward leaves a file behind, so a test can tell whether it ran."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        MARKER.write_text("yes")
        raise RuntimeError("the forward ran")


def recorder():
    return {"model": Recorder(), "batch": torch.randn(2, 4), "loss_fn": lambda m, b: m(b).sum()}


def llama32():
    """A 32-layer tiny Llama with LoRA on every linear layer."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=32,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                            task_type="CAUSAL_LM"))
'''

ROW = re.compile(r"^[\s│├└─]*(\S+) ")  # a tree row's label: the module's last name, or 'a–b' for a run


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(FACTORY)
    return path


def tree_labels(text: str) -> list[str]:
    return [m.group(1) for line in text.splitlines() if (m := ROW.match(line)) and ("─ " in line or "(root)" in line)]


def test_seed_bug_tree_collapses_repeats_and_marks_the_cut():
    run = invoke("inspect", "gradflow.demos:seed_bug")
    assert run.code == 1, run.stderr  # GF101 is an error: inspect fails on it like probe-backward does
    lines = run.stdout.splitlines()
    cut = [line for line in lines if "◀" in line]
    assert len(cut) == 1
    assert re.search(r"[├└]── 0 Phi3DecoderLayer .*ckpt:reentrant .*out:no-grad .*◀ GF101 "
                     r"reentrant-checkpoint-no-input-grad$", cut[0]), cut[0]
    # layers 1-3 look the same as each other, so they share one row
    assert any(re.search(r"── 1–3 ×3 Phi3DecoderLayer", line) for line in lines)
    assert not any(re.search(r"── [123] Phi3DecoderLayer", line) for line in lines)
    assert "error   GF101 reentrant-checkpoint-no-input-grad  at base_model.model.model.layers.0" in run.stdout


def test_healthy_preset_collapses_all_layers_into_one_row():
    run = invoke("inspect", "tiny-llama", "--gc", "non-reentrant")
    assert run.code == 0, run.stderr
    assert "0–3 ×4 LlamaDecoderLayer" in run.stdout
    assert "◀" not in run.stdout


def test_static_runs_no_forward(factory):
    marker = factory.with_name("forward_ran")
    static = invoke("inspect", f"{factory}:recorder", "--static", "--format", "json")
    assert static.code == 0, static.stderr
    assert not marker.exists()
    report = json.loads(static.stdout)
    assert report["loss"] is None
    assert all("ran" not in row for row in report["modules"])
    assert {row["name"] for row in report["modules"]} == {"", "lin"}

    # the same command without --static does run it, and records the exception as data
    traced = invoke("inspect", f"{factory}:recorder", "--format", "json")
    assert traced.code in (0, 1), traced.stderr
    assert marker.exists()
    assert "the forward ran" in json.loads(traced.stdout)["loss"]["error"]


def test_static_still_predicts_the_seed_bug():
    run = invoke("inspect", "gradflow.demos:seed_bug", "--static")
    assert run.code == 1
    assert "◀ GF101" in run.stdout
    assert "out:" not in run.stdout  # no forward: no per-module output state
    assert "predicted without a forward" in run.stdout


def test_depth_limits_the_tree():
    shown = {d: tree_labels(invoke("inspect", "tiny-llama", "--static", "--lora-r", "0", "--depth", str(d)).stdout)
             for d in (1, 2, 3, 4)}
    assert shown[1] == ["(root)", "model", "lm_head"]
    assert "embed_tokens" in shown[2] and "0–3" not in shown[2]
    assert "0–3" in shown[3] and "self_attn" not in shown[3]
    assert "self_attn" in shown[4] and "q_proj" not in shown[4]
    assert len(shown[1]) < len(shown[2]) < len(shown[3]) < len(shown[4])


def test_depth_ignores_peft_wrappers():
    """PeftModel → LoraModel → the transformers model: --depth 3 shows the same modules as without LoRA."""
    plain = tree_labels(invoke("inspect", "tiny-llama", "--static", "--lora-r", "0", "--depth", "3").stdout)
    lora = tree_labels(invoke("inspect", "tiny-llama", "--static", "--depth", "3").stdout)
    assert lora[:3] == ["(root)", "base_model", "model"]
    assert lora[3:] == plain[1:]


def test_depth_one_still_leads_down_to_the_cut():
    run = invoke("inspect", "gradflow.demos:seed_bug", "--static", "--depth", "1")
    labels = tree_labels(run.stdout)
    assert "0" in labels and "◀ GF101" in run.stdout
    assert "self_attn" not in labels  # the cut's own children stay folded


def test_json_is_valid_with_schema_and_module_rows():
    run = invoke_main("inspect", "gradflow.demos:seed_bug", "--format", "json")  # the console script's main()
    assert run.code == 1, run.stderr
    assert "Traceback" not in run.stderr
    report = json.loads(run.stdout)  # stdout is the JSON document and nothing else
    assert report["schema_version"] == 1
    assert report["command"] == "inspect"
    assert report["model"]["class"] == "PeftModelForCausalLM"
    rows = {row["name"]: row for row in report["modules"]}
    assert rows[""]["class"] == "PeftModelForCausalLM"
    for row in report["modules"]:
        assert {"name", "class", "trainable", "frozen", "checkpointing"} <= set(row)
    layer0 = rows["base_model.model.model.layers.0"]
    assert layer0["checkpointing"] == "reentrant" and layer0["out_requires_grad"] is False
    assert rows["base_model.model.model.embed_tokens"]["trainable"] == 0
    assert any(f["code"] == "GF101" and f["location"] == "base_model.model.model.layers.0" for f in report["findings"])


def test_32_layer_model_fits_on_one_screen(factory):
    run = invoke("inspect", f"{factory}:llama32")
    assert run.code == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) < 60, run.stdout
    assert re.search(r"── (0–31 ×32|1–31 ×31) LlamaDecoderLayer", run.stdout), run.stdout
    assert max(map(len, lines)) < 160


@pytest.mark.parametrize("columns", [60, 80, 120])
def test_tree_fits_the_width_and_keeps_the_cut_marker(columns):
    """Below the width a row needs, details give way and names shorten in the middle; the marker stays whole."""
    run = invoke_main("inspect", "gradflow.demos:seed_bug", "--depth", "3", env={"COLUMNS": str(columns)})
    assert run.code == 1, run.stderr
    lines = run.stdout.splitlines()
    too_wide = [line for line in lines if len(line) > columns]
    assert not too_wide, too_wide
    marked = [line for line in lines if "◀" in line]
    assert len(marked) == 1 and marked[0].endswith("◀ GF101 reentrant-checkpoint-no-input-grad"), marked
    labels = [m.group(1) for line in lines if (m := re.match(r"^[\s│├└─]*[├└]─* ?(\S+) ", line))]
    assert {"embed_tokens", "layers", "0", "1–3", "lm_head"} <= set(labels), labels  # every module still shown
    assert "error   GF101 reentrant-checkpoint-no-input-grad" in run.stdout


def test_a_pipe_without_columns_keeps_every_row_whole():
    """CI logs and `| grep`: no $COLUMNS and no terminal means no wrapping, so a row is one grep-able line."""
    run = invoke_main("inspect", "gradflow.demos:seed_bug", "--depth", "3")
    assert run.code == 1, run.stderr
    assert re.search(r"── 0 Phi3DecoderLayer  train 7\.2k  frozen 41\.1k  float32  ckpt:reentrant  out:no-grad  "
                     r"◀ GF101 reentrant-checkpoint-no-input-grad$", run.stdout, re.M), run.stdout
    assert max(map(len, run.stdout.splitlines())) > 140  # the finding's message too, on one line


def test_middle_ellipsis_keeps_both_ends():
    from gradflow.report.render.tree import middle

    assert middle("Phi3DecoderLayer", 12) == "Phi3De…Layer"
    assert middle("Phi3DecoderLayer", 16) == "Phi3DecoderLayer"
    assert len(middle("post_attention_layernorm", 8)) == 8
