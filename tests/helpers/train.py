"""`gradflow train` runs for the resume / signal / lock / packing tests: subprocesses (a fresh one per run, as users
start them), and one uninterrupted reference run per session.

Every run trains the same tiny job, so any resumed run can be compared bit for bit with the uninterrupted one.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from importlib import resources

from tests.helpers.cli import CLI, Run, gradflow
from tests.helpers.env import child_env

DEMO = str(resources.files("gradflow") / "data" / "think_demo.jsonl")
STEPS = 16
# tiny-llama, 16 steps of 4 samples, a checkpoint every step (the last two kept); lr 1e-3 so every step shows
JOB = ["--max-steps", str(STEPS), "--seq-len", "64", "--save-steps", "1", "--logging-steps", "1", "--gc", "off",
       "--lr", "1e-3"]


def train_args(output, *extra, data: str = DEMO) -> list[str]:
    return ["train", "tiny-llama", "--data", data, "--output", str(output), *JOB, *map(str, extra)]


def start(*args) -> subprocess.Popen:
    """A run in the background; SIGINT at its default, even when this test process ignores it (a background job)."""
    return subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_checkpoint(proc: subprocess.Popen, output, count: int = 1, timeout: float = 240) -> list[str]:
    """Poll until `output` holds `count` complete checkpoints (bounded); the complete ones, oldest first."""
    from gradflow.training.checkpoint import complete_checkpoints

    run_dir = os.path.join(output, "checkpoints")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        done = complete_checkpoints(run_dir)
        if len(done) >= count:
            return done
        time.sleep(0.01)
    proc.kill()
    out, err = proc.communicate()
    raise AssertionError(f"{count} checkpoint(s) did not appear (exit {proc.returncode}): {err[-2000:]}")


def resume_command(line: str) -> subprocess.Popen:
    """Start the 'Resume with: gradflow train …' command a line names, as the user would paste it."""
    command = shlex.split(line.split("Resume with: ", 1)[1])
    assert command[0] == "gradflow" and "--resume" in command, command
    return start(*command[1:])


def adapter_tensors(output) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(output, "adapter", "adapter_model.safetensors"))


def assert_bit_exact(output, reference: dict) -> None:
    import torch

    got = adapter_tensors(output)
    assert got.keys() == reference.keys()
    differ = [k for k in got if not torch.equal(got[k], reference[k])]
    assert not differ, f"{len(differ)} of {len(got)} adapter tensors differ from the uninterrupted run: {differ[:3]}"


_REFERENCE: dict = {}


def reference_run(tmp_path_factory) -> tuple[str, dict]:
    """The uninterrupted run (its directory and adapter tensors), trained once per session for every test file."""
    if "dir" not in _REFERENCE:
        output = str(tmp_path_factory.mktemp("reference") / "run")
        res: Run = gradflow(*train_args(output))
        assert res.code == 0, res.stderr[-3000:]
        _REFERENCE.update(dir=output, tensors=adapter_tensors(output))
    return _REFERENCE["dir"], _REFERENCE["tensors"]


def copy_run(source, target) -> str:
    shutil.copytree(source, target)
    return str(target)
