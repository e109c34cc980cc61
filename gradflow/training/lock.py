"""One run per output directory: an exclusive OS lock (flock) on the directory itself, and on OUTPUT/.gradflow.lock.

The kernel drops a lock when its process ends, however it ends (SIGKILL included), so a stale lock cannot outlive
its run. The directory's lock is the one that counts: deleting the lock file does not free it, and `--overwrite`
keeps the directory. The lock file holds the holder's PID, for the message that names it (and its own lock keeps
runs of older gradflow versions, which locked only the file, out). It is opened without following a symbolic link:
a planted link is refused, never written through.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import sys
import time

from gradflow.errors import GradflowError

LOCK_NAME = ".gradflow.lock"


def _holder(dir_fd: int) -> str:
    # the holder writes its PID just after taking the lock: give it a moment when the file is still empty
    for _ in range(50):
        try:
            fd = os.open(LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            return "unknown"  # the lock file was deleted (or is not a file): the directory's lock still holds
        try:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        finally:
            os.close(fd)
        if text:
            return text
        time.sleep(0.01)
    return "unknown"


class OutputLock:
    """An exclusive lock on a run directory; `acquire` raises GradflowError naming the holder's PID when taken."""

    def __init__(self, output: str):
        self.output = output
        self.path = os.path.join(output, LOCK_NAME)
        self.dir_fd: int | None = None
        self.fd: int | None = None
        self._created_dir = False

    def acquire(self) -> None:
        self._created_dir = not os.path.isdir(self.output)
        while True:
            os.makedirs(self.output, exist_ok=True)
            try:
                dir_fd = os.open(self.output, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:  # a failed run just removed the directory it had made
                continue
            try:
                locked = self._lock(dir_fd)
            except GradflowError:
                os.close(dir_fd)
                raise
            if not locked:
                os.close(dir_fd)
                return
            try:
                same = os.fstat(dir_fd).st_ino == os.stat(self.output).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(dir_fd)  # its last holder removed the directory between our open and flock: lock the new one
        self.dir_fd = dir_fd
        try:
            self.fd = self._open_file(dir_fd)
            self._lock(self.fd)  # a run of an older gradflow locks only this file
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            self.release()
            raise

    def _lock(self, fd: int) -> bool:
        """Take the lock on `fd`; False on a filesystem without locks (the run goes on, unguarded, and says so)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(self.dir_fd if self.dir_fd is not None else fd)
            stop = f", stop it (kill -INT {pid} saves a checkpoint)," if pid != "unknown" else ","
            raise GradflowError(f"--output {self.output} is in use by another gradflow train run (PID {pid})",
                                f"Wait for it to end{stop} or pass another --output") from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP
            sys.stderr.write(f"gradflow: warning: cannot lock --output {self.output} ({exc.strerror}): nothing "
                             "stops a second run from writing there at the same time\n")
            return False
        return True

    def _open_file(self, dir_fd: int) -> int:
        try:
            fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
        except OSError as exc:  # ELOOP: a symbolic link; EISDIR, EACCES …
            raise GradflowError(f"{self.path} is not a lock file gradflow can use ({_what(self.path, exc)}); nothing "
                                "was written through it", "Remove it (a run recreates it), or pass another "
                                "--output") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise GradflowError(f"{self.path} is not a regular file; nothing was written to it",
                                "Remove it (a run recreates it), or pass another --output")
        return fd

    def release(self) -> None:
        if self.dir_fd is None:
            return
        try:
            if self._created_dir and os.listdir(self.output) == [LOCK_NAME]:
                # a run that failed before writing anything leaves no directory behind (it made it)
                os.unlink(self.path)
                os.rmdir(self.output)
        except OSError:
            pass
        finally:
            for fd in (self.fd, self.dir_fd):
                if fd is not None:
                    os.close(fd)
            self.fd = self.dir_fd = None


def _what(path: str, exc: OSError) -> str:
    return "a symbolic link" if os.path.islink(path) else exc.strerror or type(exc).__name__


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
