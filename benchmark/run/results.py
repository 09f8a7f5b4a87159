"""``results.jsonl``: one JSON object per finished cell, appended whole or not at all.

Each record is written with a single ``write`` on a file opened for appending, under an exclusive
``flock``, then fsynced, so concurrent writers never interleave lines (a parallel run has one writer,
the parent process, but two runs on one folder may overlap). A run that is killed mid-write can leave
a torn last line: reading drops it (and trims it from the file when asked to repair), so that cell
simply runs again on resume.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np


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


