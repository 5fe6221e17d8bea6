"""Disk space: the free-space floor the server keeps, and telling a full disk from other failures.

A full disk shows up as OSError(ENOSPC) from a file write, or as the job store's own error (SQLite
"database or disk is full", PostgreSQL SQLSTATE 53100) when the store lives on that disk. Either way
it is the server's condition, not a bug: the API answers 507, a job fails with `out_of_disk`.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from pathlib import Path

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_PG_DISK_FULL = "53100"


def free_bytes(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from, says the disk (or quota) is full."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        if getattr(exc, "sqlstate", None) == _PG_DISK_FULL:  # psycopg.errors.DiskFull
            return True
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
    return False


def probe_write(folder: Path) -> str | None:
    """Write, fsync and remove a small file in `folder`: None, or why that failed (a full disk).

    The free-space figure alone can say "ok" on a disk where nothing can be written any more."""
    probe = folder / ".shears-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        probe.unlink(missing_ok=True)
    return None
