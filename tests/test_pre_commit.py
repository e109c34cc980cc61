"""A real `pre-commit run` with this repository's `gradflow` hook (language: system) in a temporary git repository:
a healthy setup passes, the seed's broken one fails the commit.

pre-commit comes from the stack (`pip install ".[test]"` has it), or from GRADFLOW_PRE_COMMIT (the path of a
`pre-commit` executable); without either the test is skipped. The `gradflow-isolated` hook pip-installs torch into
its own environment: bench/precommit_time.sh times it, cold and warm, instead of the suite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.env import REPO, child_env

pytestmark = pytest.mark.slow


def _pre_commit() -> list[str]:
    if os.environ.get("GRADFLOW_PRE_COMMIT"):
        return [os.environ["GRADFLOW_PRE_COMMIT"]]
    try:
        import pre_commit  # noqa: F401
    except ImportError:
        pytest.skip("pre-commit is not installed (pip install pre-commit, or set GRADFLOW_PRE_COMMIT)")
    return [sys.executable, "-m", "pre_commit"]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false",
                           *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def hooks_repo(tmp_path) -> tuple[Path, str]:
    """This repository's hook manifest, committed in a git repository of its own (pre-commit clones a rev)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "hooks"
    repo.mkdir()
    shutil.copy(REPO / ".pre-commit-hooks.yaml", repo)
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "hooks")
    return repo, _git(repo, "rev-parse", "HEAD")


def _project(tmp_path: Path, hooks: tuple[Path, str], model: str) -> Path:
    project = tmp_path / f"project-{model.replace(':', '-').replace('.', '-')}"
    project.mkdir()
    config = {"repos": [{"repo": str(hooks[0]), "rev": hooks[1],
                         "hooks": [{"id": "gradflow", "args": [model, "--fail-on", "warning"]}]}]}
    (project / ".pre-commit-config.yaml").write_text(yaml.safe_dump(config))
    (project / "train_setup.py").write_text("MODEL = 'tiny-llama'\n")
    _git(project, "init", "-q")
    _git(project, "add", ".")
    return project


def _run(project: Path, home: Path) -> subprocess.CompletedProcess:
    # the system hook runs the `gradflow` on PATH: this stack's console script, importing this checkout
    env = child_env(PRE_COMMIT_HOME=home, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    return subprocess.run([*_pre_commit(), "run"], cwd=project, env=env, capture_output=True, text=True, timeout=600)


def test_the_system_hook_passes_a_healthy_setup_and_blocks_a_broken_one(tmp_path, hooks_repo):
    home = tmp_path / "pre-commit-home"
    healthy = _run(_project(tmp_path, hooks_repo, "tiny-llama"), home)
    assert healthy.returncode == 0, healthy.stdout[-3000:] + healthy.stderr[-2000:]
    assert "gradflow (gradient-flow pre-flight)" in healthy.stdout and "Passed" in healthy.stdout
    broken = _run(_project(tmp_path, hooks_repo, "gradflow.demos:seed_bug"), home)
    assert broken.returncode == 1, broken.stdout[-3000:] + broken.stderr[-2000:]
    assert "Failed" in broken.stdout and "reentrant-checkpoint-no-input-grad" in broken.stdout
