"""Rendering of Reports: rich text, the module tree, SARIF.

`renderable(report)` is what the CLI prints for the report's command; `to_text(report)` is the same as a string
(`str(report)`). rich is imported inside the functions, so importing gradflow.report.render.sarif stays cheap.
"""

from __future__ import annotations

import os
import sys

from gradflow.report.render.patch import patch_text, snippet_text
from gradflow.report.render.text import probe_text
from gradflow.report.render.train import train_text
from gradflow.report.render.tree import inspect_text

DEFAULT_WIDTH = 80  # when neither $COLUMNS nor a terminal says


def renderable(report, *, depth: int | None = 4):
    """The CLI's text report for `report.command`, as one rich renderable that fits the console's width."""
    from rich.console import Group

    if report.command == "inspect":
        return inspect_text(report, depth=depth)
    if report.command == "train":
        return train_text(report)
    if report.before is not None or report.after is not None:
        parts = [patch_text(report)]
        if report.patch is not None and report.patch.snippet:
            parts.append(snippet_text(report.patch.snippet))
        return Group(*parts)

    return probe_text(report)


def stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout (notebooks, captured streams)
        return False


def text_width() -> int:
    """Columns for text that leaves the process as a string: $COLUMNS, else the terminal's, else 80."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if stdout_is_terminal():
        import shutil

        return shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    return DEFAULT_WIDTH


def to_text(report, *, width: int | None = None, color: bool | None = None, depth: int | None = 4) -> str:
    """`renderable(report)` as a string: plain unless `color` (default: stdout is a terminal and NO_COLOR unset)."""
    import io

    from rich.console import Console

    if color is None:
        color = stdout_is_terminal() and not os.environ.get("NO_COLOR")
    buf = io.StringIO()
    # force_jupyter=False: in a notebook rich would display HTML instead of writing to buf
    console = Console(file=buf, width=width or text_width(), force_terminal=bool(color), force_jupyter=False,
                      color_system="standard" if color else None, no_color=not color, highlight=False,
                      soft_wrap=False, legacy_windows=False, emoji=False)
    console.print(renderable(report, depth=depth), crop=False)
    return buf.getvalue()
