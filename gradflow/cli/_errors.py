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


def raised_outside_gradflow(exc: BaseException) -> bool:
    """Whether the innermost Python frame that raised `exc` is outside the gradflow package (user or library code).

    gradflow itself ends a command through fail() or typer.Exit; a SystemExit from anywhere else (a model's
    forward calling sys.exit(0) mid-training) must not pass for success.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return False
    # the CLI's own frameworks exit too: rich and Click on a closed stdout pipe (`gradflow ... | head`);
    # a framework that raised is loaded, and Typer may vendor Click rather than install it
    loaded = (sys.modules.get(name) for name in ("click", "rich", "typer"))
    ours = [os.path.dirname(os.path.abspath(m.__file__)) for m in loaded if getattr(m, "__file__", None)]
    ours.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raiser = os.path.abspath(frames[-1].filename)
    return not any(raiser.startswith(folder + os.sep) for folder in ours)


def foreign_exit_error(exc: SystemExit) -> GradflowError:
    from gradflow.setup.sources import _where

    return GradflowError(f"code outside gradflow raised SystemExit({exc.code!r}){_where(exc)} before the command "
                         "finished, so nothing was checked", "Remove that exit call from your factory, model or loss")


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
