"""stdout carries data only, down to the file descriptor.

`redirect_stdout` moves Python's `print`; a factory or a library it calls can write below Python (`os.write(1, …)`,
`os.system("echo …")`, a C or Rust extension's own stdout, a subprocess). While user code runs, file descriptor 1
points at stderr (fd 2); the real stdout waits on a saved descriptor and is put back for the report.
"""

from __future__ import annotations

import contextlib
import os
import sys

# saved descriptors while user code runs (the first is the real stdout): silence_stdout acts on the real one
_SAVED: list[int] = []


@contextlib.contextmanager
def stdout_to_stderr():
    """Within: Python's stdout and file descriptor 1 both write to stderr. Restored on exit, whatever happened.

    Where fd 1 or fd 2 is not open (an embedding host, some test runners), only Python's stdout is redirected.
    """
    _flush(sys.stdout)  # what was printed before belongs to stdout
    saved = _redirect_fd1()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            _flush(sys.__stdout__)  # what user code wrote to the original stream goes where fd 1 points now
            _flush_c_stdio()  # an extension's buffered printf, before fd 1 changes back
            os.dup2(saved, 1)
            os.close(saved)
            _SAVED.remove(saved)


def seal_stdout() -> None:
    """The command is done: for the rest of the process fd 1 points at stderr, so what user code writes on the way
    out (an atexit handler, a thread still running) cannot land after the data. The console entry only: a caller
    in-process keeps its stdout."""
    _flush(sys.stdout)
    _flush_c_stdio()
    try:
        os.dup2(2, 1)
    except OSError:  # fd 1 or fd 2 is not open: nothing to seal
        pass


def silence_stdout() -> None:
    """This process's stdout goes to /dev/null (under torchrun, rank 0 alone prints data). Inside
    `stdout_to_stderr`, the real stdout it will restore is silenced, so it stays silent after."""
    _flush(sys.stdout)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, _SAVED[0] if _SAVED else 1)
    os.close(devnull)


def _redirect_fd1() -> int | None:
    """Point fd 1 at fd 2; the saved copy of fd 1, or None where either is not open."""
    try:
        saved = os.dup(1)
    except OSError:
        return None
    try:
        os.dup2(2, 1)
    except OSError:
        os.close(saved)
        return None
    _SAVED.append(saved)
    return saved


def _flush(stream) -> None:
    try:
        if stream is not None:
            stream.flush()
    except (OSError, ValueError):  # closed, or not a real stream
        pass


def _flush_c_stdio() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)  # fflush(NULL): every C stdio output stream
    except (OSError, AttributeError, TypeError):  # no C library to load by that name (Windows)
        pass
