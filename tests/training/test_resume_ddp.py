"""Run management through the real CLI: SIGKILL mid-run then --resume, and DDP on CPU with 2 processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers.dist import torchrun
from tests.helpers.env import child_env
from tests.helpers.train import DEMO

pytestmark = pytest.mark.slow  # a real `gradflow train` killed mid-run, and one under torchrun


def _cli():
    exe = os.path.join(os.path.dirname(sys.executable), "gradflow")
    assert os.path.exists(exe), "the gradflow console script is not installed in this environment"
    return exe


def _complete(ckpt_dir):
    from gradflow.training.checkpoint import MARKER

    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(d for d in os.listdir(ckpt_dir)
                  if d.startswith("checkpoint-") and os.path.isfile(os.path.join(ckpt_dir, d, MARKER)))


def _assert_whole(ckpt_dir):
    """Every checkpoint-N is marked complete, lists exactly its files, and each file loads."""
    from safetensors.torch import load_file

    from gradflow.training.checkpoint import MARKER

    names = [d for d in os.listdir(ckpt_dir) if d.startswith("checkpoint-")]
    assert names
    for name in names:
        path = os.path.join(ckpt_dir, name)
        marker = json.load(open(os.path.join(path, MARKER)))
        files = sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)
        assert sorted(marker["files"] + [MARKER]) == files
        assert load_file(os.path.join(path, "adapter_model.safetensors"))
        torch.load(os.path.join(path, "optimizer.pt"), weights_only=False)
        json.load(open(os.path.join(path, "trainer_state.json")))


def test_sigkill_mid_run_then_resume_finishes(tmp_path):
    out = tmp_path / "run"
    args = [_cli(), "train", "tiny-phi3", "--data", DEMO, "--output", str(out), "--max-steps", "30",
            "--save-steps", "3", "--seq-len", "64", "--gc", "off", "--lr", "1e-3", "--logging-steps", "1"]
    env = child_env()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None and not _complete(out / "checkpoints"):
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    _assert_whole(out / "checkpoints")
    killed_at = max(int(d.split("-")[1]) for d in _complete(out / "checkpoints"))
    assert not (out / "adapter").exists()

    res = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert "resuming from" in res.stderr
    first_step = next(int(x.split()[1].split("/")[0]) for x in res.stderr.splitlines() if x.startswith("step "))
    assert first_step > killed_at >= 3  # it continued; it did not start again
    assert not [d for d in os.listdir(out / "checkpoints") if d.startswith(".staging")]
    _assert_whole(out / "checkpoints")
    report = json.loads((out / "report.json").read_text())
    assert report["train"]["status"] == "completed" and report["train"]["steps"] == 30

    from peft import PeftModel

    from gradflow.setup.presets import build_preset

    PeftModel.from_pretrained(build_preset("tiny-phi3"), str(out / "adapter"))


def test_ddp_two_cpu_processes_with_torchrun(tmp_path):
    out = tmp_path / "ddp"
    res = subprocess.run(torchrun(_cli(), "train", "tiny-llama", "--data", DEMO, "--output", out, "--max-steps", "3",
                                  "--save-steps", "2", "--seq-len", "48", "--gc", "non-reentrant", "--device", "cpu",
                                  "--logging-steps", "1"),
                         capture_output=True, text=True, timeout=300, env=child_env())
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["train"]["status"] == "completed" and report["train"]["world_size"] == 2
    assert report["train"]["steps"] == 3 and report["train"]["gradients"]["missing"] == 0
    assert res.stdout.count("train     completed") == 1  # rank 0 speaks for the run
    # both ranks' pre-flight and watch findings, gathered: a healthy run finds the same on both (no rank suffix)
    dist = report["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo" and dist["findings_on_some_ranks"] == []
    assert [f["slug"] for f in report["findings"]] == ["lora-zero-init"]
    assert not any("(on rank" in f["message"] for f in report["findings"])
    assert report["train"]["findings"] == [] and report["train"]["stopped_at"] is None
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(out / "checkpoints" / "checkpoint-2"))
    assert os.path.isfile(out / "adapter" / "adapter_model.safetensors")
