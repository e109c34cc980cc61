"""SIGINT / SIGTERM save a checkpoint and say how to resume; one run per --output; SIGKILL frees the directory.

Through the real CLI in subprocesses; every resumed run must end bit-exact with the uninterrupted reference run.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time

import pytest

from tests.helpers.cli import CLI, gradflow
from tests.helpers.env import child_env
from tests.helpers.train import (STEPS, assert_bit_exact, reference_run, resume_command, start, train_args,
                                 wait_for_checkpoint)

pytestmark = pytest.mark.slow  # real `gradflow train` processes, signalled


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


SIGNALS = (signal.SIGINT, signal.SIGTERM)
# what each background run is sent once its first checkpoint is written; "twice": SIGINT then SIGTERM, queued
# while the run is stopped (SIGSTOP), so that the second lands before the step in progress can end
CASES = {"SIGINT": [signal.SIGINT], "SIGTERM": [signal.SIGTERM], "twice": [signal.SIGINT, signal.SIGTERM]}


def _send(proc, signals):
    if len(signals) == 1:
        proc.send_signal(signals[0])
        return
    proc.send_signal(signal.SIGSTOP)
    for signum in signals:
        proc.send_signal(signum)
    proc.send_signal(signal.SIGCONT)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """Per case: a run sent its signal(s) once its first checkpoint is written, then resumed with the command it
    printed. The runs go side by side (each is mostly interpreter and model start-up)."""
    from gradflow.training.checkpoint import complete_checkpoints, damage

    root = tmp_path_factory.mktemp("signals")
    runs = {case: (root / case, start(*train_args(root / case))) for case in CASES}
    waiting, deadline = set(CASES), time.time() + 240
    while waiting and time.time() < deadline:  # poll the filesystem, signal each run as soon as it has saved
        for case in list(waiting):
            output, proc = runs[case]
            if proc.poll() is not None or complete_checkpoints(str(output / "checkpoints")):
                _send(proc, CASES[case])
                waiting.discard(case)
        time.sleep(0.01)
    results = {}
    for case, (output, proc) in runs.items():
        _, err = proc.communicate(timeout=240)
        saved = complete_checkpoints(str(output / "checkpoints"))
        results[case] = {"output": output, "code": proc.returncode, "stderr": err,
                         "adapter": (output / "adapter").exists(),
                         "checkpoints": {path: damage(path) for path in saved}}  # before the resume rotates them
    resumes = {}
    for case, result in results.items():
        lines = [line for line in result["stderr"].splitlines() if "Resume with: " in line]
        if lines:
            resumes[case] = resume_command(lines[0])
    for case, proc in resumes.items():
        _, err = proc.communicate(timeout=300)
        results[case]["resumed"] = (proc.returncode, err)
    return results


@pytest.mark.parametrize("signum", SIGNALS, ids=[s.name for s in SIGNALS])
def test_a_signal_saves_a_checkpoint_that_resumes_bit_exact(reference, interrupted, signum):
    name = signal.Signals(signum).name
    result = interrupted[name]
    output, err = result["output"], result["stderr"]
    assert result["code"] == 128 + signum, err[-3000:]
    assert "Traceback" not in err
    ours = [line for line in err.splitlines() if line.startswith("gradflow:")]
    assert ours[0] == f"gradflow: {name}: stopping after this step to save a checkpoint (again to abort now)"
    assert len(ours) == 2, err  # that acknowledgement, then the one line that says where it stopped
    match = re.fullmatch(rf"gradflow: {name}: stopped at step (\d+)/{STEPS} with (\S+) saved\. Resume with: (.+)",
                         ours[1])
    assert match, ours[1]
    step, checkpoint = int(match.group(1)), match.group(2)
    assert 1 < step < STEPS
    assert checkpoint == str(output / "checkpoints" / f"checkpoint-{step}")
    assert list(result["checkpoints"])[-1] == checkpoint and result["checkpoints"][checkpoint] is None  # intact
    assert not result["adapter"]

    code, resumed = result["resumed"]
    assert code == 0, resumed[-3000:]
    assert f"resuming from {checkpoint}" in resumed
    assert_bit_exact(output, reference[1])


def test_a_second_signal_aborts_at_once(interrupted):
    result = interrupted["twice"]
    err = result["stderr"]
    assert result["code"] == 128 + signal.SIGTERM, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("gradflow:")]
    assert ours == ["gradflow: SIGINT: stopping after this step to save a checkpoint (again to abort now)",
                    "gradflow: SIGTERM after SIGINT: aborted at once; the last complete checkpoint stays"], err
    assert "Traceback" not in err and "resumed" not in result
    assert result["checkpoints"] and all(why is None for why in result["checkpoints"].values())
    assert not result["adapter"]


def test_one_run_per_output_and_sigkill_frees_it_then_resume_skips_a_damaged_checkpoint(reference, tmp_path):
    """A live run holds --output: a second run, --overwrite and --resume are refused naming its PID. SIGKILL
    releases it; the newest checkpoint, then truncated, gives way to the one before, and the run ends bit-exact."""
    from gradflow.training.checkpoint import complete_checkpoints

    output = tmp_path / "run"
    proc = start(*train_args(output))
    wait_for_checkpoint(proc, output, count=2)  # the newest will be damaged: the one before must be there
    proc.send_signal(signal.SIGSTOP)  # frozen where it stands (even mid-save): it holds the lock and does nothing
    try:
        probes = [subprocess.Popen([*CLI, *train_args(output, *extra)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=child_env()) for extra in ([], ["--overwrite"], ["--resume"])]
        results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in probes]
        saved = complete_checkpoints(str(output / "checkpoints"))
    finally:
        proc.kill()  # SIGKILL: no handler runs, no cleanup
        proc.communicate()
    for code, out, err in results:
        assert code == 2 and out == "", err
        assert err == (f"gradflow: error: --output {output} is in use by another gradflow train run (PID {proc.pid}). "
                       f"Wait for it to end, stop it (kill -INT {proc.pid} saves a checkpoint), or pass another "
                       "--output\n")
    assert saved and all(os.path.isdir(p) for p in saved)  # --overwrite deleted nothing

    done = complete_checkpoints(str(output / "checkpoints"))
    newest, previous = done[-1], done[-2]
    os.truncate(os.path.join(newest, "adapter_model.safetensors"), 100)
    res = gradflow(*train_args(output, "--resume"))  # the lock died with its process
    assert res.code == 0, res.stderr[-3000:]
    name, before = os.path.basename(newest), os.path.basename(previous)
    assert (f"gradflow: {name} is damaged (adapter_model.safetensors is 100 bytes, " in res.stderr
            and f"set aside as {name}.damaged; resuming from {before} instead" in res.stderr), res.stderr[-3000:]
    assert "SafetensorError" not in res.stderr and "internal error" not in res.stderr
    assert f"resuming from {previous}" in res.stderr
    assert os.path.isdir(f"{newest}.damaged")
    assert_bit_exact(output, reference[1])


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    from gradflow.errors import GradflowError
    from gradflow.training.lock import LOCK_NAME, OutputLock

    holder = subprocess.Popen(["python3", "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(tmp_path / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
                               "print('locked', flush=True); time.sleep(300)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(GradflowError, match=rf"in use by another gradflow train run \(PID {holder.pid}\)"):
            OutputLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = OutputLock(str(tmp_path))
    lock.acquire()
    assert open(tmp_path / LOCK_NAME).read().strip() == str(os.getpid())
    lock.release()
    fresh = OutputLock(str(tmp_path / "new"))  # a directory the lock made, left empty: removed on release
    fresh.acquire()
    fresh.release()
    assert not (tmp_path / "new").exists()


def test_a_full_device_while_saving_is_one_line_and_marks_nothing_intact(tmp_path):
    """A write that fails while saving a checkpoint (here a file-size limit, `ulimit -f`: the same failed write as a
    full disk) is one line, exit 2, saying what to do; no checkpoint is published half-written (issue 21)."""
    from gradflow.training.checkpoint import complete_checkpoints

    output = tmp_path / "run"
    command = " ".join(map(shlex.quote, [*CLI, *train_args(output)]))
    proc = subprocess.run(["bash", "-c", f"ulimit -f 300; exec {command}"], capture_output=True, text=True,
                          env=child_env(), timeout=300)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    last = proc.stderr.splitlines()[-1]  # (torch's own words for the failed write in the brackets)
    assert last.startswith(f"gradflow: error: could not write checkpoint-1 in {output / 'checkpoints'} (")
    assert last.endswith("): the device is full, or a quota or file-size limit was reached. Free space, then run "
                         "again with --overwrite (no checkpoint was complete yet)")
    assert complete_checkpoints(str(output / "checkpoints")) == []
