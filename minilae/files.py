"""Writing files safely: atomic replacement, writability, and the temporary files a killed writer leaves.

Every file minilae writes (dataset caches, checkpoints, metrics) goes through :func:`atomic_write`:
the content is written to a unique sibling ``.{name}.{pid}.{32 hex digits}.tmp``, flushed to disk
(fsync), then moved onto the target with ``os.replace`` - atomic on one file system, so a reader
sees the old file or the new one, never a partial one, and concurrent writers never share a
temporary file. A process killed mid-write leaves its temporary file behind; the owner of the
folder removes it with :func:`stale_temp_files`.
"""
from __future__ import annotations

import os
import re
import stat
import uuid
from pathlib import Path

__all__ = ["atomic_write", "is_writable", "stale_temp_files"]


def atomic_write(path, write) -> None:
    """Call write(file) on a temporary file in path's folder, fsync it, then os.replace it onto path."""
    path = Path(path)
    # A unique sibling name keeps the replace atomic (same file system) and concurrent
    # writers apart; opening with "xb" keeps the usual umask permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None and err.filename is None:
            err.filename = str(path)  # a failed write() names no file; say which one (e.g. disk full)
        raise


def stale_temp_files(folder, names) -> list:
    """The temporary files atomic_write left in folder for targets with these names (a killed writer's).

    Only call it while no other process may be writing these targets (e.g. holding the folder's lock).
    Also matches the fixed ``.{name}.tmp`` of earlier minilae versions.
    """
    targets = "|".join(re.escape(n) for n in names)
    pattern = re.compile(rf"\.(?:{targets})(?:\.\d+\.[0-9a-f]{{32}})?\.tmp")
    return sorted(p for p in Path(folder).iterdir() if pattern.fullmatch(p.name) and p.is_file())


def is_writable(folder) -> bool:
    """True if we may write in folder; a folder with no write bits counts as read-only even for root."""
    folder = Path(folder)
    try:
        mode = folder.stat().st_mode
    except OSError:
        return False
    write_bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    return os.access(folder, os.W_OK) and bool(mode & write_bits)
