"""``results.jsonl``: one JSON object per finished cell, appended whole or not at all.

Each record is written with a single ``write`` on a file opened for appending, under an exclusive
``flock``, then fsynced, so concurrent writers never interleave lines (a parallel run has one writer,
the parent process, but two runs on one folder may overlap). A run that is killed mid-write can leave
a torn last line: reading drops it (and trims it from the file when asked to repair), so that cell
simply runs again on resume. A damaged line elsewhere is reported and skipped: every valid record
is always read.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np


# what a record must hold for the tables (cells.base states the fields every kind writes)
REQUIRED_FIELDS = ("key", "attack", "attack_params", "dataset", "model", "seed", "defense_label", "defense_family",
                   "metrics.leak_rate", "verdict.max_leak_rate", "verdict.rule")


def missing_field(record: dict) -> str | None:
    """The first field of REQUIRED_FIELDS that ``record`` lacks, or None."""
    for field in REQUIRED_FIELDS:
        value = record
        for part in field.split("."):
            if not isinstance(value, dict) or part not in value:
                return field
            value = value[part]
    return None


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
        """Every valid record (see :meth:`numbered`)."""
        return [record for _, record in self.numbered(repair=repair)]

    def numbered(self, *, repair: bool = False) -> list[tuple[int, dict]]:
        """(line number, record) of every valid record. A line that is not a JSON object (a stray edit, a
        torn write in the middle) is named on stderr (file and line number) and skipped, never the lines
        after it. A torn final
        line (no newline: a run killed mid-write) is dropped silently, and trimmed when ``repair``, so
        that its cell runs again on resume."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        out: list[tuple[int, dict]] = []
        lines = data.splitlines(keepends=True)
        for number, line in enumerate(lines, start=1):
            if not line.endswith(b"\n"):
                if repair:
                    self._trim(len(data) - len(line))
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                self.skipped(number, f"not JSON ({str(exc).splitlines()[0]})")
                continue
            if not isinstance(record, dict):
                self.skipped(number, f"a JSON {type(record).__name__}, not a record")
                continue
            out.append((number, record))
        return out

    _warned: set[tuple[str, int]] = set()  # one warning per damaged line and process, however often read

    def skipped(self, line: int, why: str) -> None:
        if (str(self.path), line) in ResultsStore._warned:
            return
        ResultsStore._warned.add((str(self.path), line))
        print(f"leakbench: warning: {self.path}:{line}: skipped, {why}", file=sys.stderr)

    def _trim(self, length: int) -> None:
        with open(self.path, "r+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.truncate(length)
            fcntl.flock(fh, fcntl.LOCK_UN)

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


