"""Errors gradflow raises for bad input, and the exit codes the CLI returns."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes of the `gradflow` CLI."""

    OK = 0  # no finding at or above --fail-on
    FINDINGS = 1  # at least one finding at or above --fail-on
    USAGE = 2  # bad usage, bad input, or the tool itself failed
    INTERRUPTED = 130  # train: SIGINT (128 + 2) stopped the run after a step, with a checkpoint saved
    TERMINATED = 143  # train: SIGTERM (128 + 15) stopped the run after a step, with a checkpoint saved


class GradflowError(Exception):
    """A problem with what the user asked for: one line saying what is wrong and what to do.

    `findings` holds the Findings behind it when gradflow stopped a run because of them
    (`GradFlowCallback(raise_on_error=True)`); it is empty otherwise.
    """

    def __init__(self, what: str, todo: str | None = None, *, findings: list | None = None):
        self.what = what
        self.todo = todo
        self.findings = list(findings or [])
        super().__init__(self.line())

    def line(self) -> str:
        # messages quoted from other libraries often end in "." already
        return f"{self.what.rstrip('.')}. {self.todo}" if self.todo else self.what
