"""The CLI under test three ways, one result type (`Run`):

- `invoke`: Typer's CliRunner on the app, in-process (a GradflowError raised while parsing an option propagates, as
  Click hands it to main());
- `invoke_main`: the console script's `main()` in-process, under the same runner's captured streams: every error is
  main()'s one line and exit 2, as the real process gives it, without an interpreter start (7-8 s of imports);
- `gradflow`: `python -m gradflow.cli` in a fresh process, for what only a real process shows (signals, torchrun,
  stdout file descriptors, imports at start-up, the console script itself). Tests that use it are marked slow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import warnings

from tests.helpers.env import child_env

CLI = [sys.executable, "-m", "gradflow.cli"]

# the loggers main() quiets (gradflow.cli._quiet_libraries, gradflow.noise): restored after an in-process run
_QUIETED = ("bitsandbytes", "transformers", "peft", "accelerate", "huggingface_hub", "torch.utils.checkpoint",
            "kernels._internals.hf_hub", "bitsandbytes.backends.cpu.ops")


@dataclasses.dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


def gradflow(*args, cwd=None, env: dict | None = None, timeout: int = 300) -> Run:
    """`python -m gradflow.cli ARGS` in a fresh process: the real entry point, exit code and streams."""
    proc = subprocess.run([*CLI, *map(str, args)], cwd=cwd, env=env or child_env(), capture_output=True, text=True,
                          timeout=timeout)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def invoke(*args, cwd=None, env: dict | None = None) -> Run:
    """The command in-process through Typer's CliRunner (no interpreter start-up). `env` overrides os.environ for
    the run (None drops a key); `cwd` is the working directory for the run."""
    from typer.testing import CliRunner

    from gradflow.cli import app

    with _working_dir(cwd):
        result = CliRunner().invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)
    return Run(result.exit_code, result.stdout, result.stderr)


def invoke_main(*args, cwd=None, env: dict | None = None) -> Run:
    """`gradflow ARGS` through the console script's main() in-process: its one-line errors and exit codes (usage
    errors, bad option values, GRADFLOW_DEBUG tracebacks), its quieted libraries, stdout and stderr apart.

    The run leaves this interpreter as it found it: argv, the working directory, sys.path (a factory's folder is put
    on it) and the sibling modules imported from there, the library loggers main() quiets, the warning filters.
    """
    from typer.testing import CliRunner

    from gradflow.cli import main

    saved_argv, saved_path = sys.argv, list(sys.path)
    saved_modules = set(sys.modules)
    saved_loggers = {name: (logging.getLogger(name).level, list(logging.getLogger(name).filters)) for name in _QUIETED}
    code = 0
    with warnings.catch_warnings(), _working_dir(cwd), \
            CliRunner().isolation(env={"GRADFLOW_DEBUG": None, **(env or {})}) as (out, err, _):
        sys.argv = ["gradflow", *map(str, args)]
        try:
            main()
        except SystemExit as exc:
            code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.argv = saved_argv
            sys.stdout.flush()
            sys.stderr.flush()
            stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
            added = [p for p in sys.path if p not in saved_path]
            sys.path[:] = saved_path
            for name in set(sys.modules) - saved_modules:  # modules a factory's folder gave (its sibling imports)
                where = getattr(sys.modules[name], "__file__", None) or ""
                if name.startswith("_gradflow_factory_") or any(where.startswith(p + os.sep) for p in added if p):
                    del sys.modules[name]
            for name, (level, filters) in saved_loggers.items():
                logger = logging.getLogger(name)
                logger.setLevel(level)
                logger.filters[:] = filters
    return Run(code, stdout, stderr)


@contextlib.contextmanager
def _working_dir(cwd):
    if cwd is None:
        yield
        return
    before = os.getcwd()
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(before)


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
