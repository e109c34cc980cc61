"""Helpers for the CLI tests: the real console path in a subprocess, and Typer's in-process runner."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


def cli_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.pop("GRADFLOW_DEBUG", None)
    for var in ("COLUMNS", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE"):  # a developer's terminal settings
        env.pop(var, None)
    # a hub id must fail fast on a machine without network, not retry for a minute
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    env.update(extra)
    return env


def gradflow(*args: str, cwd=None, env: dict | None = None, timeout: int = 300) -> Run:
    """`python -m gradflow.cli ARGS` in a fresh process: the real entry point, exit code and streams."""
    proc = subprocess.run([sys.executable, "-m", "gradflow.cli", *map(str, args)], cwd=cwd, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def invoke(*args: str) -> Run:
    """The same command in-process through Typer's CliRunner (no interpreter start-up: for the slower cases)."""
    from typer.testing import CliRunner

    from gradflow.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return Run(result.exit_code, result.stdout, result.stderr)


def assert_one_line_error(run: Run, *needles: str) -> str:
    """Exit 2, nothing on stdout, exactly one line on stderr without a traceback; returns that line."""
    assert run.code == 2, (run.code, run.stdout[-2000:], run.stderr[-2000:])
    assert run.stdout == "", run.stdout[-2000:]
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    line = lines[0]
    assert line.startswith("gradflow: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line
