"""One table from exceptions to one actionable line; a traceback only with GRADFLOW_DEBUG=1."""

from __future__ import annotations

import os
import sys

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
    if debug():
        raise exc
    sys.stderr.write(f"gradflow: error: {one_line(exc)}\n")
    sys.stderr.flush()
    raise SystemExit(int(ExitCode.USAGE))
