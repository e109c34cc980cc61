"""One table from exceptions to one actionable line; a traceback only with GRADFLOW_DEBUG=1."""

from __future__ import annotations

import os
import sys
import traceback

from gradflow.errors import ExitCode, GradflowError


def debug() -> bool:
    return os.environ.get("GRADFLOW_DEBUG", "") not in ("", "0", "false")


def one_line(exc: BaseException) -> str:
    """What is wrong and what to do, on one line."""
    if isinstance(exc, GradflowError):
        return exc.line()
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return f"out of memory: {text[:200]}. Lower --batch-size or --seq-len, or use --quant 4bit"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, OSError) and getattr(exc, "filename", None):
        return f"{exc.strerror or text}: {exc.filename}. Check the path and its permissions"
    return (f"internal error: {type(exc).__name__}: {text[:300]}. "
            "Run again with GRADFLOW_DEBUG=1 for the traceback, and report it")


def fail(exc: BaseException) -> "NoReturn":  # noqa: F821
    """One line on stderr and exit 2; GRADFLOW_DEBUG=1 puts the traceback above that line."""
    if debug():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    sys.stderr.write(f"gradflow: error: {one_line(exc)}\n")
    sys.stderr.flush()
    raise SystemExit(int(ExitCode.USAGE))


def usage_error(exc) -> "NoReturn":  # noqa: F821
    """Click's usage errors (unknown option, missing argument, bad int) as one line, exit 2."""
    if debug():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    text = " ".join(exc.format_message().split()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "gradflow"
    sys.stderr.write(f"gradflow: error: {text}. Run '{where} --help' for usage\n")
    sys.stderr.flush()
    raise SystemExit(int(ExitCode.USAGE))
