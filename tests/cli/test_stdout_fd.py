"""stdout for data, down to the file descriptor: what a factory writes below Python (os.write(1, …), os.system, an
extension's own stdout) goes to stderr, and `--format json|sarif` stdout parses."""

from __future__ import annotations

import json
import os
import sys

import pytest

from gradflow.stdio import stdout_to_stderr
from tests.helpers.cli import gradflow, invoke_main

NOISY = '''
import os
import sys

from gradflow.setup.presets import build_preset


def build():
    os.write(1, b"NOISE os.write to fd 1\\n")
    os.system("echo NOISE from a subprocess")
    print("NOISE print")
    sys.__stdout__.write("NOISE sys.__stdout__\\n")
    sys.__stdout__.flush()
    return build_preset("tiny-llama")
'''
NOISE = ["NOISE os.write to fd 1", "NOISE from a subprocess", "NOISE print", "NOISE sys.__stdout__"]


@pytest.fixture
def noisy(tmp_path) -> str:
    (tmp_path / "noisy.py").write_text(NOISY)
    return f"{tmp_path / 'noisy.py'}:build"


@pytest.mark.parametrize("command, fmt", [("probe-backward", "json"), ("probe-backward", "sarif"),
                                          ("inspect", "json")])
def test_noise_below_python_goes_to_stderr_in_process(noisy, command, fmt, capfd):
    run = invoke_main(command, noisy, "--format", fmt, "--seq-len", "8")
    fd = capfd.readouterr()  # file descriptors 1 and 2 themselves, beneath the runner's sys.stdout
    assert run.code == 0, run.stderr[-2000:]
    data = json.loads(run.stdout)  # the report, whole and alone
    assert data.get("command", command) == command and "NOISE" not in run.stdout
    assert "NOISE" not in fd.out  # nothing reached the real stdout
    noise = fd.err + run.stderr
    assert all(line in noise for line in NOISE), noise[-2000:]


def test_the_guard_restores_stdout_when_sys_stdout_is_no_file(capsys):
    print("before")
    with stdout_to_stderr():
        print("inside")
    print("after")
    with pytest.raises(RuntimeError):
        with stdout_to_stderr():
            raise RuntimeError("user code failed")
    print("after a failure")
    seen = capsys.readouterr()
    assert seen.out.split() == ["before", "after", "after", "a", "failure"] and seen.err.split() == ["inside"]


def test_rank_silence_inside_user_code_outlives_the_guard(capfd):
    from gradflow.stdio import silence_stdout

    saved = os.dup(1)
    try:
        with stdout_to_stderr():
            silence_stdout()  # what world.start does on rank 1, inside the probe
            os.write(1, b"user code\n")
        os.write(1, b"rank 1 report\n")  # after the guard: still silent
        sys.stdout.flush()
        seen = capfd.readouterr()
        assert "rank 1 report" not in seen.out and "user code" in seen.err
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@pytest.mark.slow
def test_a_real_process_stdout_is_the_sarif_alone(noisy, tmp_path):
    run = gradflow("probe-backward", noisy, "--format", "sarif", "--seq-len", "8", cwd=tmp_path)
    assert run.code == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["version"] == "2.1.0"
    assert all(line in run.stderr for line in NOISE), run.stderr[-2000:]


def test_train_keeps_its_json_report_alone_on_stdout(tmp_path, capfd):
    """A refused run (nothing trainable: no Trainer step) still ran the factory: its noise is on stderr."""
    frozen = NOISY.replace("from gradflow.setup.presets import build_preset",
                           "from gradflow.setup.presets import build_preset, build_tokenizer")
    frozen = frozen.replace('return build_preset("tiny-llama")',
                            'return {"model": build_preset("tiny-llama").requires_grad_(False), '
                            '"tokenizer": build_tokenizer()}')
    (tmp_path / "frozen.py").write_text(frozen)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}.", "completion": f" {i}"}) + "\n" for i in range(2)))
    run = invoke_main("train", f"{tmp_path / 'frozen.py'}:build", "--data", data, "--output", tmp_path / "run",
                      "--max-steps", "1", "--lora-r", "0", "--format", "json")
    fd = capfd.readouterr()
    assert run.code == 1, run.stderr[-2000:]
    assert json.loads(run.stdout)["train"]["status"] == "refused"
    assert "NOISE" not in fd.out and all(line in fd.err + run.stderr for line in NOISE)


EXITING = '''
import atexit
import os

from gradflow.setup.presets import build_preset


def at_exit():
    atexit.register(lambda: os.write(1, b"NOISE from an atexit handler\\n"))
    return build_preset("tiny-llama")


def forks():
    pid = os.fork()
    if pid == 0:  # a forked child (a DataLoader worker, multiprocessing) still ends with os._exit
        os._exit(3)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 3
    return build_preset("tiny-llama")


def ends_the_process():
    os._exit(0)
'''


@pytest.mark.slow  # real processes: the exit path runs after gradflow's own code, which no in-process run reaches
def test_what_the_process_writes_on_its_way_out_is_no_data_and_os_exit_is_no_pass(tmp_path):
    (tmp_path / "exiting.py").write_text(EXITING)
    run = gradflow("probe-backward", "exiting.py:at_exit", "--format", "json", "--seq-len", "8", cwd=tmp_path)
    assert run.code == 0 and json.loads(run.stdout)["command"] == "probe-backward", run.stdout[-500:]
    assert "NOISE from an atexit handler" in run.stderr
    run = gradflow("probe-backward", "exiting.py:forks", "--format", "json", "--seq-len", "8", cwd=tmp_path)
    assert run.code == 0 and json.loads(run.stdout)["command"] == "probe-backward", run.stderr[-2000:]
    run = gradflow("probe-backward", "exiting.py:ends_the_process", "--format", "json", cwd=tmp_path)
    assert run.code == 2 and run.stdout == "", (run.code, run.stdout[-500:])
    line = EXITING.splitlines().index("    os._exit(0)") + 1
    assert run.stderr.splitlines()[-1] == ("gradflow: error: factory exiting.py:ends_the_process called os._exit(0) "
                                           f"while building the model (at exiting.py:{line}). A factory must return "
                                           "the model (or raise an error), not end the process: remove that "
                                           "os._exit call")
