"""str(report) is the CLI's text: the same lines `gradflow probe-backward / inspect / patch` print, fitted to a width.

Also the per-layer gradient-norm chart: a log scale that says so, and runs of identical layers folded into one row.
"""

from __future__ import annotations

import io
import math
import re

import pytest
import torch
from rich.console import Console

import gradflow
from gradflow.demos import seed_bug
from gradflow.report.render.text import fold_runs
from gradflow.report.render.text import GradChart
from tests.helpers.cli import invoke_main

ANSI = re.compile(r"\x1b\[[0-9;]*m")
SLUG = "reentrant-checkpoint-no-input-grad"
LAYER0 = "base_model.model.model.layers.0"


@pytest.fixture(autouse=True)
def _no_columns(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)


def cli_stdout(*args: str, columns: int = 80) -> str:
    """stdout of `gradflow ARGS` through the console script's main(), not a terminal, with $COLUMNS set."""
    run = invoke_main(*args, env={"COLUMNS": str(columns), "FORCE_COLOR": None, "NO_COLOR": None})
    assert run.code in (0, 1), run.stderr[-2000:]
    return run.stdout


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_str_of_a_probe_report_is_what_probe_backward_prints():
    setup = seed_bug()
    report = gradflow.probe(setup["model"], setup["batch"])
    text = str(report)
    assert not ANSI.search(text)  # stdout is not a terminal under pytest: plain text
    assert "PeftModelForCausalLM(" not in text and "findings=[" not in text  # not the dataclass dump
    assert f"error   GF101 {SLUG}" in text and f"at {LAYER0}" in text
    assert "grad_fn: none" in text
    assert max(map(len, text.splitlines())) <= 80  # no terminal, no $COLUMNS: 80 columns
    assert lines(text) == lines(cli_stdout("probe-backward", "gradflow.demos:seed_bug", columns=80))
    assert text == report.render()


def test_str_of_an_inspect_report_is_what_inspect_prints():
    setup = seed_bug()
    report = gradflow.inspect(setup["model"], setup["batch"])
    text = str(report)
    marker = [line for line in text.splitlines() if "◀" in line]
    # at 80 columns the marker has a line of its own, under its module's row
    assert len(marker) == 1 and marker[0].endswith(f"│     ◀ GF101 {SLUG}"), marker
    assert lines(text) == lines(cli_stdout("inspect", "gradflow.demos:seed_bug", columns=80))
    # wide enough, the marker ends its module's row, as in a wide terminal
    wide = report.render(width=200)
    assert re.search(rf"── 0 Phi3DecoderLayer .*ckpt:reentrant .*out:no-grad  ◀ GF101 {SLUG}$", wide, re.M), wide


def test_str_of_a_patch_report_shows_before_after_the_proof_and_the_snippet():
    setup = seed_bug()
    report = gradflow.patch(setup["model"], setup["batch"])
    text = str(report)
    assert "fixes applied (2)" in text and "✓ input-grad-hook (safe)" in text
    assert re.search(r"^params with gradients\s+0 / 32\s+32 / 32$", text, re.M), text
    assert "proof: every intended trainable parameter (32) receives a finite gradient" in text
    assert "enable_input_require_grads()" in text.split("paste into your script")[1]
    assert lines(text) == lines(cli_stdout("patch", "gradflow.demos:seed_bug", columns=80))


def test_render_width_and_color_are_the_callers():
    setup = seed_bug()
    report = gradflow.probe(setup["model"], setup["batch"])
    narrow = report.render(width=60)
    assert max(map(len, narrow.splitlines())) <= 60
    assert f"GF101 {SLUG}" in narrow and f"at {LAYER0}" in narrow
    colored = report.render(color=True)
    assert ANSI.search(colored) and lines(ANSI.sub("", colored)) == lines(report.render(color=False))
    # rich consoles print the renderable itself (Report.__rich__), styled and fitted to their own width
    buf = io.StringIO()
    Console(file=buf, width=100, force_terminal=True, color_system="standard").print(report)
    assert ANSI.search(buf.getvalue()) and "GF101" in buf.getvalue()


def test_columns_sets_the_default_width(monkeypatch):
    setup = seed_bug()
    report = gradflow.probe(setup["model"], setup["batch"])
    monkeypatch.setenv("COLUMNS", "200")
    assert f"error   GF101 {SLUG}  at {LAYER0}" in str(report)  # one line at 200 columns


# --- the gradient-norm chart -----------------------------------------------------------------------------------


def _llama32_seed_bug():
    """32 reentrant-checkpointed layers behind a frozen embedding: every LoRA weight gets None."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=32,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if getattr(base, "_require_grads_hooks", None) or getattr(base, "_require_grads_hook", None):
        base.disable_input_require_grads()  # transformers 5 adds the hook in gradient_checkpointing_enable
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_chart_folds_32_layers_without_gradient_into_one_row():
    model, batch = _llama32_seed_bug()
    text = gradflow.probe(model, batch).render(width=100)
    chart = text[text.index("gradient norm per layer"):].splitlines()
    assert "log scale" in chart[0]
    assert [line.strip() for line in chart[1:] if line.strip()] == ["layers.0–31 ×32  ∅ no grad"]


def test_chart_bars_are_log_scaled_and_runs_fold_only_when_identical():
    rows = [("embed_tokens", None, {"none": 1})]
    rows += [(f"layers.{i}", None, {"none": 2}) for i in range(3)]
    rows += [("layers.3", 1e-3, {"ok": 2}), ("layers.4", 1e-1, {"ok": 2})]
    rows += [(f"layers.{i}", 0.0, {"zero": 2}) for i in range(5, 9)]
    rows += [("lm_head", 1e-7, {"ok": 1})]  # under the six decades the bar shows: one block, never none
    buf = io.StringIO()
    Console(file=buf, width=80, color_system=None).print(GradChart(rows))
    out = buf.getvalue().splitlines()
    assert out[0] == "gradient norm per layer (log scale, 6 decades: a full bar is 1.0e-01)"
    body = {line.strip().split("  ")[0]: line for line in out[1:]}
    assert list(body) == ["embed_tokens", "layers.0–2 ×3", "layers.3", "layers.4", "layers.5–8 ×4", "lm_head"]
    assert body["layers.0–2 ×3"].endswith("∅ no grad") and body["layers.5–8 ×4"].endswith("∅ zero")
    bars = {k: body[k].count("█") for k in ("layers.3", "layers.4", "lm_head")}
    # log scale: 1e-3 is two of six decades below the top, so two thirds of the 40-cell bar
    assert bars == {"layers.3": round(40 * 4 / 6), "layers.4": 40, "lm_head": 1}
    assert all(len(line) <= 80 and line == line.rstrip() for line in out)


def test_fold_runs():
    assert fold_runs([("h.0", 1), ("h.1", 1), ("h.2", 2), ("h.3", 2), ("h.5", 2), ("lm_head", 2)]) == [
        ("h.0–1 ×2", 1), ("h.2–3 ×2", 2), ("h.5", 2), ("lm_head", 2)]
    assert fold_runs([("a.layers.0", None), ("b.layers.1", None)]) == [("a.layers.0", None), ("b.layers.1", None)]


def test_png_chart_is_log_scaled_and_folds_layers_without_gradient():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from gradflow.training.plots import grad_norm_figure

    history = [{"step": s, "layers": {**{f"layers.{i}": float("nan") for i in range(32)}, "lm_head": 0.5 / s}}
               for s in (1, 2, 3)]
    fig = grad_norm_figure(history)
    try:
        ax = fig.axes[0]
        assert ax.get_yscale() == "log"
        assert "log scale" in ax.get_ylabel() and "log scale" in ax.get_title()
        notes = [t.get_text() for t in ax.texts]
        assert notes == ["no gradient: layers.0–31 ×32"]
        assert [line.get_label() for line in ax.get_lines()] == ["lm_head"]
        assert all(math.isfinite(y) for y in ax.get_lines()[0].get_ydata())
    finally:
        plt.close(fig)
