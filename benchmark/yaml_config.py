"""YAML configuration files with ``include:`` (lm-evaluation-harness style): grids and leaderboard
protocols are read the same way. Included files merge first, the including file's keys win, mappings
merge key by key."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import ConfigError


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` updated by ``override``; nested mappings merge instead of being replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml_mapping(path: Any, *, what: str, keys: tuple[str, ...]) -> dict:
    """The top-level mapping of a YAML file; one-line ConfigErrors for bad YAML or another top level.
    ``path`` is a filesystem path or an ``importlib.resources`` traversable."""
    where = f"{what} {path}"
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}:{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys ({', '.join(keys)})")
    return raw


def read_with_includes(spec: Any, *, resolve: Callable[[Any], Any], what: str, keys: tuple[str, ...],
                       _seen: tuple = ()) -> dict:
    """Read ``spec`` (resolved to a file by ``resolve``) and merge its ``include:`` files first. An include
    is a path relative to the including file, else whatever ``resolve`` makes of the name."""
    path = resolve(spec)
    key = str(path)
    if key in _seen:
        raise ConfigError(f"{what} include cycle: {' -> '.join(_seen + (key,))}")
    raw = read_yaml_mapping(path, what=what, keys=keys)
    includes = raw.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        if not isinstance(inc, str):
            raise ConfigError(f"{what} {key}: include entries must be file paths or grid names, got {inc!r}")
        merged = deep_merge(merged, read_with_includes(relative_to(key, inc), resolve=resolve, what=what,
                                                       keys=keys, _seen=_seen + (key,)))
    return deep_merge(merged, raw)


def relative_to(source: str, name: str) -> str | Path:
    """``name`` next to the file ``source`` when such a file exists, else ``name`` itself (a shipped name)."""
    local = Path(source).parent / name if source else None
    return local if local is not None and local.is_file() else name
