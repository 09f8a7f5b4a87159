"""``results.jsonl``: one JSON object per finished cell, appended whole or not at all.

Each record is written with a single ``write`` on a file opened for appending, under an exclusive
``flock``, then fsynced, so concurrent writers never interleave lines (a parallel run has one writer,
the parent process, but two runs on one folder may overlap). A run that is killed mid-write can leave
a torn last line: reading drops it (and trims it from the file when asked to repair), so that cell
simply runs again on resume.

Shared work (accuracy runs, oracles) is cached on disk by ``computed_once``: one worker computes an
entry while the others wait on its lock and then read it.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
from filelock import FileLock, Timeout

T = TypeVar("T")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, float) and not math.isfinite(obj):  # NaN/inf are not JSON; null: "not available"
        return None
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    return obj


class ResultsStore:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def records(self, *, repair: bool = False) -> list[dict]:
        """All complete records; a torn final line is ignored (and trimmed when ``repair``)."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        good_end = 0
        out: list[dict] = []
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # torn final line
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good_end += len(line)
        if repair and good_end < len(data):
            with open(self.path, "r+b") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                fh.truncate(good_end)
                fcntl.flock(fh, fcntl.LOCK_UN)
        return out

    def completed_keys(self, *, repair: bool = False) -> set[str]:
        return {r["key"] for r in self.records(repair=repair) if "key" in r}

    def append(self, record: dict) -> None:
        line = (json.dumps(_jsonable(record), sort_keys=True, allow_nan=False) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records())


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
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


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
        value = compute()
        write(path, value)  # written atomically (rename) before the lock is released
        return value
    finally:
        lock.release()
