"""The startup profile (train.startup in report.json, --verbose's line) and the caches across runs: tokenised data
keyed by content (a second run hits, a changed file or option misses), the compile cache's directory, and regional
compilation (one compiled graph for every identical decoder layer).

Cost: the encoding tests tokenise the 12-sample demo file (~1 s); the slow ones run three 1-step tiny-phi3 trainings
in-process (~15 s) and compile tiny Llamas of 2 and 6 layers with aot_eager (~10 s).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from gradflow.data import cache
from gradflow.setup.presets import build_tokenizer
from gradflow.training.compiling import compile_layers, use_cache_dir
from gradflow.training.dataset import cached_prepare, read_data
from gradflow.training.options import TrainOptions
from gradflow.training.checkpoint import sha256_file
from gradflow.training.startup import STAGES, startup_line
from tests.helpers.cli import invoke_main
from tests.helpers.train import DEMO


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("GRADFLOW_CACHE_DIR", str(root))
    monkeypatch.delenv("GRADFLOW_NO_CACHE", raising=False)
    return root


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _prepare(path, tok, **options):
    opts = TrainOptions(**options)
    return cached_prepare(str(path), tok, opts, read_data(str(path), opts), data_sha256=sha256_file(str(path)))


def test_a_second_encoding_hits_the_cache_with_the_same_rows(cache_dir, tok, tmp_path):
    data = tmp_path / "d.jsonl"
    shutil.copy(DEMO, data)
    first, status = _prepare(data, tok, seq_len=96)
    assert status == {"status": "miss"}
    assert len(list((cache_dir / "data").iterdir())) == 1
    assert oct((cache_dir / "data").stat().st_mode & 0o777) == "0o700"  # the data may be private
    again, status = _prepare(data, tok, seq_len=96)
    assert status == {"status": "hit"}
    assert again.rows == first.rows and again.audit == first.audit and again.previews == first.previews
    assert [str(p) for p in again.problems] == [str(p) for p in first.problems] and again.samples == first.samples


def test_a_changed_file_or_option_misses(cache_dir, tok, tmp_path):
    data = tmp_path / "d.jsonl"
    shutil.copy(DEMO, data)
    _prepare(data, tok, seq_len=96)
    assert _prepare(data, tok, seq_len=64)[1]["status"] == "miss"  # another --seq-len
    assert _prepare(data, tok, seq_len=96, loss_on="all")[1]["status"] == "miss"
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:-1]) + "\n")  # the same path, other bytes
    changed, status = _prepare(data, tok, seq_len=96)
    assert status["status"] == "miss" and changed.samples == len(lines) - 1
    assert _prepare(data, tok, seq_len=96)[1]["status"] == "hit"


def test_another_tokenizer_misses(cache_dir, tok, tmp_path):
    data = tmp_path / "d.jsonl"
    shutil.copy(DEMO, data)
    _prepare(data, tok, seq_len=96)
    other = build_tokenizer()
    other.chat_template = (other.chat_template or "") + "{# another template #}"
    assert cache.tokenizer_identity(other) != cache.tokenizer_identity(tok)
    assert _prepare(data, other, seq_len=96)[1]["status"] == "miss"


def test_no_cache_writes_nothing(cache_dir, tok, tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    shutil.copy(DEMO, data)
    opts = TrainOptions(seq_len=96)
    _, status = cached_prepare(str(data), tok, opts, read_data(str(data), opts), data_sha256=sha256_file(str(data)),
                               use_cache=False)
    assert status == {"status": "off"}
    monkeypatch.setenv("GRADFLOW_NO_CACHE", "1")
    assert _prepare(data, tok, seq_len=96)[1] == {"status": "off"}
    assert not cache_dir.exists()


def test_a_damaged_entry_is_a_miss_and_is_rewritten(cache_dir, tok, tmp_path):
    data = tmp_path / "d.jsonl"
    shutil.copy(DEMO, data)
    first, _ = _prepare(data, tok, seq_len=96)
    (entry,) = (cache_dir / "data").iterdir()
    entry.write_text('{"key": "x"')
    again, status = _prepare(data, tok, seq_len=96)
    assert status == {"status": "miss"} and again.rows == first.rows
    assert _prepare(data, tok, seq_len=96)[1] == {"status": "hit"}


def test_the_compile_cache_dir_is_gradflows_unless_the_user_set_one(cache_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert use_cache_dir(cache=False) is None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    assert use_cache_dir() == str(cache_dir / "inductor") == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_cache_dir() == str(tmp_path / "mine")
    monkeypatch.delenv("GRADFLOW_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.root() == str(tmp_path / "xdg" / "gradflow")


def test_the_verbose_line_names_each_stage_that_ran():
    startup = {f"{name}_s": 0.5 for name in STAGES} | {"imports_s": None, "quantization_s": 0.25,
                                                       "time_to_first_step_s": 4.0, "from": "train() called",
                                                       "cache": {"data": {"status": "hit"}}, "compile": {"graphs": 2}}
    line = startup_line(startup)
    assert line.startswith("startup: first step at 4.0s from train() called: data 0.5s, model 0.5s "
                           "(quantization 0.2s), plan 0.5s")
    assert "imports" not in line and line.endswith("(data cache hit; 2 compiled graphs)")


@pytest.mark.slow
def test_train_records_every_stage_and_a_second_run_hits_the_data_cache(cache_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    shutil.copy(DEMO, data)
    job = ["tiny-phi3", "--data", str(data), "--max-steps", "1", "--seq-len", "96", "--save-steps", "5"]
    runs = []
    for i in range(3):
        if i == 2:
            data.write_text(data.read_text() + data.read_text().splitlines()[0] + "\n")  # one more sample
        res = invoke_main("train", *job, "--output", str(tmp_path / f"r{i}"), "--verbose")
        assert res.code == 0, res.stderr[-2000:]
        runs.append((json.loads((tmp_path / f"r{i}" / "report.json").read_text())["train"], res.stderr))
    startup, stderr = runs[0]
    startup = startup["startup"]
    assert set(startup) == {f"{n}_s" for n in STAGES} | {"time_to_first_step_s", "from", "cache", "compile"}
    assert startup["from"] == "process start" and startup["imports_s"] >= 0  # the CLI knows its process start
    for name in ("data", "model", "plan", "preflight", "trainer", "first_step"):
        assert startup[f"{name}_s"] > 0, name
    assert startup["quantization_s"] is None and startup["compile"]["graphs"] == 0  # --quant none, CPU: eager
    ran = sum(v for k, v in startup.items() if k.endswith("_s") and k != "time_to_first_step_s" and v)
    assert startup["time_to_first_step_s"] >= ran - 0.05  # the stages lie inside the time to the first step
    assert [r[0]["startup"]["cache"]["data"]["status"] for r in runs] == ["miss", "hit", "miss"]
    assert "startup: first step at" in stderr and "(data cache miss)" in stderr
    assert "encoded samples from the cache" in runs[1][1]
    assert runs[1][0]["losses"] == runs[0][0]["losses"]  # the cached rows train the same step


def _tiny_llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=256, use_cache=False)
    model = LlamaForCausalLM(config).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for i, layer in enumerate(model.model.layers):  # the plan's every-2nd-layer checkpointing: both kinds of layer
        layer.gradient_checkpointing = i % 2 == 0
    for name, p in model.named_parameters():
        p.requires_grad_("q_proj" in name)
    return model


@pytest.mark.slow
def test_one_compiled_graph_serves_every_identical_layer_and_lengths_do_not_recompile():
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    graphs = {}
    for layers in (2, 6):
        torch._dynamo.reset()
        counters.clear()
        model = _tiny_llama(layers)
        assert compile_layers(model, backend="aot_eager") == layers
        for length in (16, 32, 24):  # packed batches: a new length every step
            ids = torch.randint(0, 256, (1, length))
            model(input_ids=ids, labels=ids, position_ids=torch.arange(length)[None]).loss.backward()
        graphs[layers] = counters["stats"]["unique_graphs"]
        assert sum(counters["recompiles"].values()) == 0
    torch._dynamo.reset()
    # not one per layer: the same few graphs for 2 and 6 layers (2 on 5.x, 4 on 4.57: the first layer, whose input
    # needs no gradient, and checkpointed or not)
    assert graphs[6] == graphs[2] > 0, graphs
