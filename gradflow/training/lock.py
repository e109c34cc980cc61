"""One run per output directory: an exclusive OS lock (flock) on OUTPUT/.gradflow.lock.

The kernel drops the lock when its process ends, however it ends (SIGKILL included), so a stale lock cannot
outlive its run. The file holds the holder's PID, for the message that names it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time

from gradflow.errors import GradflowError

LOCK_NAME = ".gradflow.lock"


def _holder(fd: int) -> str:
    # the holder writes its PID just after taking the lock: give it a moment when the file is still empty
    for _ in range(50):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "unknown"


class OutputLock:
    """An exclusive lock on a run directory; `acquire` raises GradflowError naming the holder's PID when taken."""

    def __init__(self, output: str):
        self.output = output
        self.path = os.path.join(output, LOCK_NAME)
        self.fd: int | None = None
        self._created_dir = False

    def acquire(self) -> None:
        self._created_dir = not os.path.isdir(self.output)
        while True:
            os.makedirs(self.output, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # a failed run just removed the directory it had made
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _holder(fd)
                os.close(fd)
                raise GradflowError(f"--output {self.output} is in use by another gradflow train run (PID {pid})",
                                    f"Wait for it to end, stop it (kill -INT {pid} saves a checkpoint), or pass "
                                    "another --output") from None
            except OSError as exc:  # a filesystem without locks (ENOLCK, EOPNOTSUPP): run, but say it is unguarded
                os.close(fd)
                sys.stderr.write(f"gradflow: warning: cannot lock --output {self.output} ({exc.strerror}): nothing "
                                 "stops a second run from writing there at the same time\n")
                return
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its last holder removed the file between our open and flock: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if self._created_dir and os.listdir(self.output) == [LOCK_NAME]:
                # a run that failed before writing anything leaves no directory behind (it made it)
                os.unlink(self.path)
                os.rmdir(self.output)
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def hold(output: str, enabled: bool = True):
    """Hold the lock on `output` for the block (nothing when not `enabled`: the ranks other than 0 under DDP)."""
    if not enabled:
        yield None
        return
    lock = OutputLock(output)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
