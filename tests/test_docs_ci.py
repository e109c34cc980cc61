"""docs/ci.md runs as written: its workflow's gradflow steps with its [tool.gradflow] example, the composite
action's run step with the documented inputs, and the pre-commit hook with the documented args."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.helpers.cli import invoke
from tests.helpers.env import REPO as ROOT, child_env

DOC = (ROOT / "docs" / "ci.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", DOC, flags=re.S | re.M)


def workflows() -> list[dict]:
    return [doc for doc in map(yaml.safe_load, blocks("yaml")) if isinstance(doc, dict) and "jobs" in doc]


def steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A checkout: the page's [tool.gradflow] example as its pyproject.toml, and the current directory."""
    (toml,) = blocks("toml")
    assert "gradflow" in tomllib.loads(toml)["tool"]
    (tmp_path / "pyproject.toml").write_text(toml)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_install_lines_install_this_repository():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name, repo, version = meta["name"], meta["urls"]["Repository"], meta["version"]
    assert name != "gradflow"  # taken on PyPI by an unrelated project
    line = f'pip install "{name} @ git+{repo}@v{version}"'  # pip builds the tagged source tree, as from a clone
    cpu = " --extra-index-url https://download.pytorch.org/whl/cpu"  # torch's CPU build, within the tested range
    assert line + cpu in DOC
    plain = [s for s in steps(workflows()[0]) if "uses" not in s]
    assert line + cpu in [s["run"] for s in plain]
    (uses,) = [s["uses"] for s in steps(workflows()[1]) if "gradflow@" in s.get("uses", "")]
    assert f"https://github.com/{uses}" == f"{repo}@v{version}"
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    assert action["inputs"]["package"]["default"] == "."  # the action installs its own checkout


def test_the_workflow_commands_run_as_written(project):
    commands = [line for s in steps(workflows()[0]) if "run" in s for line in s["run"].splitlines()
                if line.startswith("gradflow ")]
    assert len(commands) == 2 and "--baseline" in commands[0]
    for round_ in ("writes the baseline", "compares with it"):
        for command in commands:
            run = invoke(*shlex.split(command)[1:])
            assert run.code == 0, (round_, command, run.stderr[-2000:])
    baseline = json.loads((project / ".gradflow" / "baseline.json").read_text())
    assert baseline["model"] == "tiny-llama" and baseline["trainable"]["count"] > 0
    assert "matches the baseline" not in run.stderr  # the inspect step is --quiet


def test_the_baseline_example_has_the_shape_gradflow_reads(tmp_path):
    from gradflow.report.baseline import load

    (example,) = blocks("json")
    (tmp_path / "b.json").write_text(example)
    assert load(str(tmp_path / "b.json"))["command"] == "probe-backward"


def _action_step(step_id: str) -> dict:
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    assert action["runs"]["using"] == "composite"
    (step,) = [s for s in action["runs"]["steps"] if s.get("id") == step_id or s.get("name") == step_id]
    assert "${{" not in step["run"]  # inputs reach the script only through env (no injection)
    return action, step


def _run_action(project: Path, given: dict) -> tuple[subprocess.CompletedProcess, dict]:
    """The action's `run` step as Actions runs it (bash -eo pipefail), its ${{ inputs.* }} env filled in."""
    action, step = _action_step("run")
    inputs = {k: str(v.get("default", "")) for k, v in action["inputs"].items()}
    required = {k for k, v in action["inputs"].items() if v.get("required")}
    assert required <= set(given), required - set(given)
    inputs.update({k: str(v) for k, v in given.items()})
    env = child_env(PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
                    GITHUB_OUTPUT=str(project / "github_output"))
    for key, value in step["env"].items():
        env[key] = re.sub(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}", lambda m: inputs[m.group(1)], value)
    proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
                          cwd=project / inputs["working-directory"], env=env, capture_output=True, text=True,
                          timeout=600)
    outputs = dict(line.split("=", 1) for line in (project / "github_output").read_text().splitlines())
    return proc, outputs


def test_the_action_installs_its_own_checkout_with_cpu_torch(tmp_path):
    """The install step's command line, with a stand-in `python` on PATH that prints the arguments pip would get."""
    action, step = _action_step("Install gradflow")
    (tmp_path / "python").write_text('#!/bin/sh\necho "$@"\n')
    (tmp_path / "python").chmod(0o755)
    defaults = {"package": action["inputs"]["package"]["default"],
                "torch-index-url": action["inputs"]["torch-index-url"]["default"]}
    env = {key: re.sub(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}", lambda m: defaults[m.group(1)], value)
           for key, value in step["env"].items()}
    env.update(PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}", GITHUB_ACTION_PATH="/actions/gradflow")
    done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], env=env,
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["-m", "pip", "install", "--quiet", "--extra-index-url",
                                   "https://download.pytorch.org/whl/cpu", "/actions/gradflow"]


@pytest.mark.slow
def test_the_action_runs_with_the_documented_inputs(project):
    (uses,) = [s for s in steps(workflows()[1]) if "gradflow@" in s.get("uses", "")]
    proc, outputs = _run_action(project, uses["with"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert outputs == {"sarif-file": str(project / "gradflow.sarif"), "exit-code": "0"}
    sarif = json.loads((project / "gradflow.sarif").read_text())
    assert sarif["version"] == "2.1.0" and sarif["runs"][0]["results"]  # lora-zero-init (info) is a result
    assert "GF301:" in proc.stdout  # the log lists each result
    assert (project / ".gradflow" / "baseline.json").exists()
    # the gate step fails the job by gradflow's exit code (after the upload step could run)
    _, gate = _action_step("Gate on gradflow's exit code")
    for code in (0, 1, 2):
        done = subprocess.run(["bash", "-eo", "pipefail", "-c", gate["run"]], env={"GRADFLOW_EXIT": str(code)})
        assert done.returncode == code


@pytest.mark.slow
def test_the_action_records_a_failure_without_ending_its_step(project):
    proc, outputs = _run_action(project, {"model": "tiny-llama", "args": "--gc sideways"})
    assert proc.returncode == 0 and outputs["exit-code"] == "2"  # the upload step may still run
    assert "gradflow: error: --gc 'sideways'" in proc.stderr and "::error title=gradflow::" in proc.stdout


def test_the_pre_commit_hooks_run_with_the_documented_args(project):
    hooks = {h["id"]: h for h in yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())}
    assert {h: hooks[h]["language"] for h in hooks} == {"gradflow": "system", "gradflow-isolated": "python"}
    assert "--extra-index-url=https://download.pytorch.org/whl/cpu" in hooks["gradflow-isolated"][
        "additional_dependencies"]  # the isolated environment's torch is the CPU build
    for hook in hooks.values():
        assert hook["pass_filenames"] is False and f"`{hook['id']}`" in DOC
    (config,) = [doc for doc in map(yaml.safe_load, blocks("yaml")) if isinstance(doc, dict) and "repos" in doc]
    (used,) = [h for repo in config["repos"] for h in repo["hooks"] if h["id"] in hooks]
    argv = shlex.split(hooks[used["id"]]["entry"]) + [str(a) for a in used["args"]]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts  # the console script, on PATH (system) or in the environment pre-commit builds
    run = invoke(*argv[1:])
    assert run.code == 0, run.stderr[-2000:]
