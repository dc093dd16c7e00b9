"""Paths and files: one home for how this library names and writes files.

- :func:`expand_path`: every path a user gives (argument, CLI flag, config) goes through it, so
  ``~`` and ``$VARS`` mean what a shell would make of them (``cache_dir="~/.cache/irs"`` is the
  home folder's cache, never a folder literally named ``~``).
- :func:`write_atomic` and its two shorthands: a file appears whole or not at all (temp file in
  the same folder, fsync, ``os.replace``), with the permissions an ordinary ``open(path, "w")``
  would give (``0o666`` minus the umask), so that banks, ledgers and histories are as readable
  as the user's other files.

Pure standard library: importing it costs nothing.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from pathlib import Path
from typing import Callable

__all__ = ["expand_path", "write_atomic", "write_text_atomic", "write_json_atomic"]


def expand_path(path, name: str = "path") -> Path:
    """``path`` (str or os.PathLike) with ``~`` and environment variables expanded, as a Path.

    Raises a TypeError naming ``name`` for anything that is not a path.
    """
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(path).__name__}")
    return Path(os.path.expandvars(os.path.expanduser(os.fspath(path))))


_UMASK_LOCK = threading.Lock()
_umask_at_start: int | None = None


def _umask() -> int:
    """The process umask, read without changing it: from ``/proc/self/status`` (Linux), else set
    and restored once under a lock and cached (``os.umask`` has no read-only form; setting it,
    even for a moment, would give files other threads create meanwhile the wrong mode)."""
    global _umask_at_start
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        if _umask_at_start is None:
            _umask_at_start = os.umask(0o077)  # 0o077, not 0: a file created meanwhile is private, not open
            os.umask(_umask_at_start)
        return _umask_at_start


def write_atomic(path, write: Callable[[Path], None]) -> Path:
    """Create or replace ``path`` atomically: ``write(tmp)`` writes a temporary file in the same
    folder, which is flushed to disk and renamed over ``path``. Folders are created as needed; the
    file gets ``0o666 & ~umask``. On any error the temporary file is removed and ``path`` is left
    as it was. Returns the path."""
    path = expand_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path, text: str) -> Path:
    """:func:`write_atomic` for a text file (UTF-8)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path, obj, **dumps_options) -> Path:
    """:func:`write_atomic` for ``json.dumps(obj)`` (default: ``indent=1, sort_keys=True``)."""
    options = {"indent": 1, "sort_keys": True, **dumps_options}
    return write_text_atomic(path, json.dumps(obj, **options))
