"""One output object: data to stdout (text, JSON or SARIF), talk and progress to stderr."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager


def stdout_width() -> int | None:
    """Columns for stdout; None lets rich take a terminal's width, or $COLUMNS where it is set.

    A pipe or CI log without $COLUMNS gets no wrapping at all, so every module and finding stays on one grep-able
    line (so nothing full-width, like a Panel or Rule, belongs on stdout). rich alone would wrap a pipe at 80.
    """
    columns = os.environ.get("COLUMNS", "")
    if sys.stdout.isatty() or (columns.isdigit() and int(columns) > 0):
        return None
    return 1000


class Output:
    """`quiet`: data only; progress and hints are dropped (the one-line error and failure reasons still print)."""

    def __init__(self, fmt: str = "text", *, quiet: bool = False):
        from rich.console import Console

        self.fmt = str(fmt)
        self.quiet = quiet
        self.out = Console(file=sys.stdout, soft_wrap=False, highlight=False, width=stdout_width())
        self.err = Console(file=sys.stderr, highlight=False)

    def data(self, obj) -> None:
        """A JSON-able object to stdout."""
        sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
        sys.stdout.flush()

    def show(self, renderable) -> None:
        # crop=False: a long tree row overflows rather than being cut off (its cut marker sits at the end)
        self.out.print(renderable, crop=False)

    def say(self, text: str) -> None:
        """A hint or note on stderr (not with --quiet)."""
        if not self.quiet:
            self.err.print(text)

    def tell(self, text: str) -> None:
        """Why the exit code is what it is, on stderr even with --quiet: plain text, never wrapped."""
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    @contextmanager
    def status(self, text: str):
        if self.err.is_terminal and not self.quiet:
            with self.err.status(text):
                yield
        else:
            yield
