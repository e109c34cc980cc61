"""`gradflow train --fsdp` on CPU: 2 gloo processes under torchrun, FSDP2 through accelerate's plugin.

A 3-step run completes, its checkpoints are sharded (torch.distributed.checkpoint, one file per rank), and the
adapter is written once, consolidated (full tensors, PeftModel loads it); SIGKILL of one rank, then --resume on
the same world size continues from the last checkpoint. Bad uses are one line, exit 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.helpers.cli import gradflow, invoke_main
from tests.helpers.dist import torchrun
from tests.helpers.env import child_env
from tests.helpers.train import DEMO

ARGS = ["--seq-len", "48", "--gc", "non-reentrant", "--device", "cpu", "--logging-steps", "1"]


def _torchrun(out, *extra) -> list[str]:
    return torchrun("-m", "gradflow", "train", "tiny-llama", "--data", DEMO, "--output", out, "--fsdp", *ARGS, *extra)


def _sharded(ckpt) -> bool:
    return {"__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(ckpt / "pytorch_model_fsdp_0")) and \
        {"__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(ckpt / "optimizer_0"))


def _loads(adapter) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from gradflow.setup.presets import build_preset

    base = build_preset("tiny-llama")
    model = PeftModel.from_pretrained(base, str(adapter))
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert saved and all(t.ndim == 2 and min(t.shape) > 0 for t in saved.values())
    params = dict(model.named_parameters())
    for key, tensor in saved.items():  # full (unsharded) shapes: the LoRA weights as the model holds them
        name = key.replace(".weight", ".default.weight")
        assert params[name].shape == tensor.shape, key
        torch.testing.assert_close(params[name].detach(), tensor, rtol=0, atol=0)


@pytest.mark.slow
def test_fsdp_train_three_steps_two_cpu_processes(tmp_path):
    out = tmp_path / "fsdp"
    # --ce chunked: the chunked loss calls the decoder outside FSDP's root unit (its weights would stay sharded:
    # "mixed torch.Tensor and DTensor", seen on an H200); under --fsdp the standard loss is taken, and said
    res = subprocess.run(_torchrun(out, "--max-steps", 3, "--save-steps", 2, "--ce", "chunked"), capture_output=True,
                         text=True, timeout=300, env=child_env())
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())["train"]
    assert report["ce"]["loss"] == "standard" and "not under --fsdp" in report["ce"]["why"]
    assert report["status"] == "completed" and report["world_size"] == 2 and report["steps"] == 3
    grads = report["gradients"]  # the live watch saw every LoRA gradient (norms summed over the shards)
    assert grads["missing"] == 0 and grads["params_trainable"] > 0
    assert all(v > 0 for v in grads["per_layer"].values())
    assert res.stdout.count("train     completed") == 1  # rank 0 speaks for the run
    # the pre-flight and the live watch ran on both ranks and their findings were gathered: the same on both
    dist = json.loads((out / "report.json").read_text())["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo" and dist["findings_on_some_ranks"] == []
    assert report["findings"] == [] and report["stopped_at"] is None
    assert _sharded(out / "checkpoints" / "checkpoint-2")
    assert not (out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").exists()
    _loads(out / "adapter")


def _children(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as fh:
            kids += [int(k) for k in fh.read().split()]
    return kids


@pytest.mark.slow
def test_fsdp_sigkill_one_rank_then_resume(tmp_path):
    from gradflow.training.checkpoint import complete_checkpoints

    out = tmp_path / "run"
    args = _torchrun(out, "--max-steps", 8, "--save-steps", 2, "--lr", "1e-3")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None and not complete_checkpoints(str(out / "checkpoints")):
            time.sleep(0.01)
        workers = _children(proc.pid)
        assert workers, "torchrun started no workers"
        os.kill(workers[-1], signal.SIGKILL)  # one rank dies; torchrun then ends the other
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0, "the run finished before a rank could be killed"
    done = complete_checkpoints(str(out / "checkpoints"))
    killed_at = max(int(os.path.basename(d).split("-")[1]) for d in done)
    assert killed_at < 8 and not (out / "adapter").exists()

    res = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300, env=child_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr
    first = next(int(x.split()[1].split("/")[0]) for x in res.stderr.splitlines() if x.startswith("step "))
    assert first > killed_at >= 2  # it continued; it did not start again
    report = json.loads((out / "report.json").read_text())["train"]
    assert report["status"] == "completed" and report["steps"] == 8 and report["world_size"] == 2
    _loads(out / "adapter")


def test_fsdp_without_torchrun_is_one_line_exit_2(tmp_path):
    res = invoke_main("train", "tiny-llama", "--data", DEMO, "--output", tmp_path / "x", "--fsdp", "--max-steps", "1")
    assert res.code == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("gradflow")]
    assert len(lines) == 1 and "--fsdp needs the process group" in lines[0] and "Traceback" not in res.stderr


@pytest.mark.slow
def test_fsdp_with_quant_is_one_line_exit_2(tmp_path):
    # a real process: it poses as a one-rank torchrun worker (RANK, WORLD_SIZE), which this test process must not
    env = child_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    res = gradflow("train", "tiny-llama", "--data", DEMO, "--output", tmp_path / "x", "--fsdp", "--quant", "4bit",
                   "--max-steps", "1", env=env, timeout=120)
    assert res.code == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("gradflow")]
    assert len(lines) == 1 and "--fsdp cannot shard a --quant" in lines[0] and "Traceback" not in res.stderr


EMBEDDINGS_BY_HAND = '''
from gradflow.setup.build import apply_lora
from gradflow.setup.presets import build_preset, build_tokenizer


def build():
    model = apply_lora(build_preset("tiny-llama", seed=0, training=True), 4, 8, "all-linear")
    model.get_base_model().model.embed_tokens.weight.requires_grad_(True)  # unfrozen by hand: not in the adapter
    return {"model": model, "tokenizer": build_tokenizer()}
'''


@pytest.mark.slow
def test_fsdp_keeps_the_full_tensors_save_pretrained_leaves_out(tmp_path):
    """Under FSDP the model's own parameters are shards: the tensors kept beside the adapter are the gathered ones,
    plain tensors that load_adapter restores whole."""
    import torch

    from gradflow.setup.presets import build_preset
    from gradflow.training import load_adapter

    (tmp_path / "by_hand.py").write_text(EMBEDDINGS_BY_HAND)
    out = tmp_path / "fsdp"
    args = torchrun("-m", "gradflow", "train", f"{tmp_path / 'by_hand.py'}:build", "--data", DEMO, "--output", out,
                    "--fsdp", "--seq-len", "48", "--device", "cpu", "--max-steps", 2, "--lr", "1e-2")
    res = subprocess.run(args, capture_output=True, text=True, timeout=300, env=child_env())
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())["train"]
    assert report["adapter_outside"]["tensors"] == ["base_model.model.model.embed_tokens.weight"]
    kept = torch.load(out / "adapter" / "trainable_state.pt", weights_only=True)
    assert kept["base_model.model.model.embed_tokens.weight"].shape == (512, 64)
    restored = load_adapter(build_preset("tiny-llama", seed=0), str(out / "adapter"))
    trained = restored.get_base_model().model.embed_tokens.weight
    assert torch.equal(trained, kept["base_model.model.model.embed_tokens.weight"])
    assert not torch.equal(trained, build_preset("tiny-llama", seed=0).model.embed_tokens.weight)
