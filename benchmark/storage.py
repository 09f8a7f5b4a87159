"""Files written whole or not at all, and shared work computed once.

Atomic writes go through a temporary file and a rename, so a reader never sees a half-written file.
Shared work (accuracy runs, oracles, decoded data) is cached on disk by ``computed_once``: one process
computes an entry while the others wait on its lock and then read it.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from filelock import FileLock, Timeout

from .errors import ConfigError

T = TypeVar("T")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_torch(path: Path, obj: Any) -> None:
    """``torch.save`` of tensors (or dicts of them), written atomically like the others."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def check_writable(path: Path, *, what: str) -> None:
    """A one-line ConfigError unless files can be created in the folder ``path`` (or, where it does not
    exist yet, in its nearest existing parent, where it would be made). Writes nothing that stays."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} exists and is not a folder; allowed: a folder you can write to")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {str(path)!r}: {str(existing)!r} is not a folder; allowed: a folder you can "
                          f"write to")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".leakbench-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r}: cannot write there ({exc.strerror or exc}); allowed: a folder "
                          f"you can write to") from None


def computed_once(path: Path, compute: Callable[[], T], *, read: Callable[[Path], T],
                  write: Callable[[Path, T], None], wait: bool = True) -> T | None:
    """The value cached at ``path``, computed at most once however many processes ask at the same
    time: the first takes a per-entry file lock and computes; the others block on the lock, then find
    the entry written and read it. (filelock, a torch dependency, rather than hand-rolled flock code.)
    An entry that cannot be read (torn by a crash of an older version, another format) is recomputed.
    ``wait=False``: None at once when another process holds the lock (it is computing the entry)."""

    def cached() -> tuple[bool, Any]:
        if not path.exists():
            return False, None
        try:
            return True, read(path)
        except Exception:  # noqa: BLE001  any unreadable entry is recomputed, whatever the reader raised
            return False, None

    found, value = cached()  # the common case needs no lock
    if found:
        return value
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path.with_name(f".{path.name}.lock"))
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        return None
    try:
        found, value = cached()  # another process may have written it while this one waited
        if found:
            return value
        try:
            value = compute()
        except BaseException:
            # nothing was cached: leave no lock file behind either (a waiter holding the old one simply
            # computes the entry itself)
            Path(lock.lock_file).unlink(missing_ok=True)
            raise
        write(path, value)  # written atomically (rename) before the lock is released
        return value
    finally:
        lock.release()
