"""`gradflow train --compile`: the decoder layers compiled in place train the same losses as the eager run.

Cost: one torch.compile of tiny Llama's layers on the CPU (~20-25 s per stack; the only compiled test), plus
two 3-step runs of tiny-llama.
"""

from __future__ import annotations

import json

import pytest
from torch.testing import assert_close

from gradflow.training.compiling import resolve
from tests.helpers.cli import invoke_main
from tests.helpers.train import DEMO


@pytest.mark.slow
def test_compiled_layers_train_the_eager_losses_and_save_the_same_adapter_names(tmp_path):
    import gradflow as gf
    from safetensors.torch import load_file

    runs = {}
    for mode in ("off", "on"):
        report = gf.train("tiny-llama", DEMO, str(tmp_path / mode), max_steps=3, seq_len=64, logging_steps=1,
                          progress=False, compile=mode)
        train = report.extra["train"]
        assert train["status"] == "completed", train
        runs[mode] = train
    assert runs["off"]["compile"] == {"compiled": False, "layers": 0, "why": "--compile off"}
    assert runs["on"]["compile"] == {"compiled": True, "layers": 4, "why": "--compile on"}
    assert_close([x["loss"] for x in runs["on"]["losses"]], [x["loss"] for x in runs["off"]["losses"]],
                 rtol=1e-4, atol=1e-5)
    eager = load_file(str(tmp_path / "off" / "adapter" / "adapter_model.safetensors"))
    compiled = load_file(str(tmp_path / "on" / "adapter" / "adapter_model.safetensors"))
    assert sorted(compiled) == sorted(eager)  # in-place compile: no _orig_mod. in any saved name
    for name in eager:
        assert_close(compiled[name], eager[name], rtol=1e-3, atol=1e-5)
    stored = json.load(open(tmp_path / "on" / "report.json"))
    assert stored["train"]["compile"]["compiled"] is True


@pytest.mark.parametrize("asked, device, world, expected", [
    ("auto", "cpu", "1", (False, "auto: compiling pays off on CUDA, and this is the CPU")),
    ("auto", "cuda", "2", (False, "auto: not under torchrun (compiled layers are untested with DDP/FSDP; "
                                  "--compile on forces it)")),
    ("auto", "cuda", "1", (False, "auto: not under torchrun (compiled layers are untested with DDP/FSDP; "
                                  "--compile on forces it)")),  # a one-process torchrun too
    ("off", "cuda", "1", (False, "--compile off")),
    ("on", "cpu", "2", (True, "--compile on")),
])
def test_auto_compiles_only_a_single_cuda_process(monkeypatch, asked, device, world, expected):
    monkeypatch.setenv("WORLD_SIZE", world)
    assert resolve(asked, device) == expected


def test_a_bad_compile_value_is_one_line_exit_2(tmp_path):
    res = invoke_main("train", "tiny-llama", "--data", DEMO, "--output", str(tmp_path / "x"), "--compile", "maybe")
    assert res.code == 2
    assert "--compile 'maybe'" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x").exists()
