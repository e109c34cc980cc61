"""Shared command plumbing: build the setup and batch, print a report, choose the exit code."""

from __future__ import annotations

import contextlib
import sys

from gradflow.errors import ExitCode, GradflowError


@contextlib.contextmanager
def user_code(setup=None):
    """What the user's code prints (a factory, a forward, a Trainer) goes to stderr: stdout carries only data.

    With the factory's `setup`, a SystemExit or KeyboardInterrupt its forward or loss raises is an error naming
    the factory (exit 2), never a silent exit 0 that passes a CI gate.
    """
    with contextlib.redirect_stdout(sys.stderr):
        try:
            yield
        except (SystemExit, KeyboardInterrupt) as exc:
            if setup is None or setup.kind not in ("factory", "trainer"):
                raise
            from gradflow.sources import user_exit_error

            raise user_exit_error(exc, setup.source, "running its forward, loss or backward") from exc


def prepare(model, opts, *, data, batch_size, seq_len, seed, out):
    """Resolve, build and batch, with progress on stderr."""
    from gradflow.cli._options import check_positive
    from gradflow.runner import load_setup, make_batch

    check_positive(batch_size, "--batch-size")
    check_positive(seq_len, "--seq-len", 32)
    if data is not None:
        check_data(data)
    with out.status(f"loading {model}"), user_code():
        setup = load_setup(model, opts)
        batch = make_batch(setup, data=data, batch_size=batch_size, seq_len=seq_len, seed=seed)
    return setup, batch


def check_data(path: str) -> None:
    """A bad --data file fails before the model loads, not after."""
    from gradflow.data import read_jsonl

    _, problems = read_jsonl(path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise GradflowError(f"malformed sample at {problems[0]}{more}", "Fix or remove that line")


def exit_for(report, fail_on: str) -> int:
    return int(ExitCode.FINDINGS if report.fails(fail_on) else ExitCode.OK)


def check_format(fmt: str, allowed) -> None:
    if fmt not in allowed:
        raise GradflowError(f"--format {fmt!r} is not one of {', '.join(allowed)}", "Pick one of those")


def check_fail_on(fail_on: str) -> None:
    if fail_on not in ("error", "warning", "never"):
        raise GradflowError(f"--fail-on {fail_on!r} is not error, warning or never", "Pick one of those")
