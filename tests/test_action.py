"""action.yml's run step: its args split as shell words (a quoted regex arrives without its quotes), and a python
without gradflow is exit 2 with one clear error, never exit 1 (which the action reads as findings)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.env import REPO, child_env


def _run_step(cwd: Path, given: dict, path: str) -> tuple[subprocess.CompletedProcess, dict]:
    """The action's `run` step as Actions runs it (bash -eo pipefail), its ${{ inputs.* }} env filled in, with the
    `python` found first on `path`."""
    action = yaml.safe_load((REPO / "action.yml").read_text())
    (step,) = [s for s in action["runs"]["steps"] if s.get("id") == "run"]
    inputs = {k: str(v.get("default", "")) for k, v in action["inputs"].items()} | given
    env = child_env(PATH=path + os.pathsep + os.environ["PATH"], GITHUB_OUTPUT=str(cwd / "github_output"))
    for key, value in step["env"].items():
        env[key] = re.sub(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}", lambda m: inputs[m.group(1)], value)
    proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    outputs = dict(line.split("=", 1) for line in (cwd / "github_output").read_text().splitlines())
    return proc, outputs


@pytest.mark.slow
def test_args_carry_a_quoted_regex_as_one_word(tmp_path):
    here = os.path.dirname(sys.executable)
    # intact, the regex names the frozen embeddings too (intended-param-frozen); with its quotes it names nothing
    given = {"model": "tiny-llama", "sarif": "true",
             "args": "--trainable 'lora_(A|B)|embed_tokens' --select \"GF1, GF2\""}
    proc, outputs = _run_step(tmp_path, given, here)
    assert (proc.returncode, outputs["exit-code"]) == (0, "1"), proc.stderr[-3000:]
    (result,) = json.loads((tmp_path / "gradflow.sarif").read_text())["runs"][0]["results"]
    assert result["ruleId"] == "GF112" and "embed_tokens" in result["message"]["text"]
    unbalanced = _run_step(tmp_path, {**given, "args": "--trainable 'lora_"}, here)
    assert unbalanced[1]["exit-code"] == "2" and "No closing quotation. Close the quote" in unbalanced[0].stderr
    assert "::error title=gradflow::the args input does not split" in unbalanced[0].stdout


@pytest.mark.slow
def test_a_python_without_gradflow_is_exit_2_with_one_clear_error(tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    # a real python that cannot see gradflow: no site-packages (-S), no PYTHONPATH (-I)
    (bare / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')
    (bare / "python").chmod(0o755)
    proc, outputs = _run_step(tmp_path, {"model": "tiny-llama"}, str(bare))
    assert proc.returncode == 0 and outputs == {"exit-code": "2"}  # the gate step fails the job with 2
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("::error")]
    assert line.startswith(f"::error title=gradflow::gradflow does not import in {bare / 'python'} "
                           "(ModuleNotFoundError: No module named 'gradflow'): install it")
    assert "::group::" not in proc.stdout  # gradflow never ran


@pytest.mark.slow
def test_a_sarif_file_in_a_missing_folder_gets_its_folder(tmp_path):
    here = os.path.dirname(sys.executable)
    given = {"model": "tiny-llama", "sarif": "true", "sarif-file": "reports/ci/gradflow.sarif"}
    proc, outputs = _run_step(tmp_path, given, here)
    # absolute, so the upload step (which runs from the workspace, not working-directory) finds it, whatever the
    # path given
    written = tmp_path / "reports" / "ci" / "gradflow.sarif"
    assert (proc.returncode, outputs) == (0, {"sarif-file": str(written), "exit-code": "0"}), proc.stderr[-3000:]
    assert json.loads(written.read_text())["runs"][0]["results"]
    action = yaml.safe_load((REPO / "action.yml").read_text())
    (upload,) = [s for s in action["runs"]["steps"] if "upload-sarif" in s.get("uses", "")]
    assert upload["with"]["sarif_file"] == "${{ steps.run.outputs.sarif-file }}"
    assert "::error" not in proc.stdout
    # a path that cannot be written (a folder's name) is exit 2 with one clear error, before gradflow runs
    (tmp_path / "taken").mkdir()
    (tmp_path / "github_output").unlink()  # the outputs of this run only
    proc, outputs = _run_step(tmp_path, {**given, "sarif-file": "taken"}, here)
    assert (proc.returncode, outputs) == (0, {"exit-code": "2"})
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("::error")]
    assert line.startswith("::error title=gradflow::cannot write the sarif-file taken (from ")
    assert "findings" not in line
    assert "::group::" not in proc.stdout


@pytest.mark.slow
def test_a_usage_error_with_sarif_hands_on_no_file_and_no_traceback(tmp_path):
    given = {"model": "nope", "sarif": "true", "sarif-file": "out/gradflow.sarif"}
    proc, outputs = _run_step(tmp_path, given, os.path.dirname(sys.executable))
    assert (proc.returncode, outputs) == (0, {"exit-code": "2"})  # no sarif-file output: the upload step is skipped
    assert not (tmp_path / "out" / "gradflow.sarif").exists()  # no empty file left for a later step
    assert "Traceback" not in proc.stderr and "JSONDecodeError" not in proc.stderr
    assert "gradflow: error: " in proc.stderr  # gradflow's own one line
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("::error")]
    assert line.startswith("::error title=gradflow::usage, input or setup error (exit 2)") and "findings at" not in line
