"""Stable identities and seeds derived from configurations: the same on every machine and in every
process (unlike Python's ``hash``), so a cell's key, its cache entries and its random draws follow from
what it is, not from where or when it runs."""
from __future__ import annotations

import hashlib
import json
from typing import Any


def config_hash(obj: Any) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any JSON-able parts."""
    return int(config_hash(list(parts))[:8], 16) & 0x7FFFFFFF
