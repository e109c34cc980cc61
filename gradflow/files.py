"""Files written atomically: a reader sees the old file or the new one, never half of one, and a crash leaves no
stray temporary file behind. One writer (`write_atomic`); text, JSON and JSONL on top of it."""

from __future__ import annotations

import json
import os
import tempfile
from typing import IO, Callable, Iterable


def write_atomic(path: str, write: Callable[[IO], None], *, binary: bool = False) -> None:
    """Call `write(fh)` on a temporary file in `path`'s folder, flush and fsync it, then rename it over `path` and
    fsync the folder (where the filesystem allows). The file gets the permissions `open()` would give it (0666 less
    the umask): mkstemp's 0600 would hide a file meant to be shared. On any error the temporary file is removed and
    the error raised; `path` is then as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".gradflow-", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def write_text(path: str, text: str) -> None:
    write_atomic(path, lambda fh: fh.write(text))


def write_json(path: str, obj, *, default: Callable | None = None) -> None:
    """`obj` as indented JSON and a final newline (`default`: json.dump's, for values JSON has no type for)."""

    def write(fh):
        json.dump(obj, fh, indent=2, default=default)
        fh.write("\n")

    write_atomic(path, write)


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """One JSON object per line, non-ASCII kept as it is."""

    def write(fh):
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    write_atomic(path, write)


def fsync_dir(path: str) -> None:
    """Make a rename inside `path` durable; a no-op where the folder cannot be opened or fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass
    finally:
        os.close(fd)
