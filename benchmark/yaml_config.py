"""YAML configuration files with ``include:`` (lm-evaluation-harness style): grids and leaderboard
protocols are read the same way. Included files merge first, the including file's keys win, mappings
merge key by key."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import ConfigError

# A config is a few hundred values: a document that would expand (through YAML aliases, "billion
# laughs") to more nodes than this is refused before anything is built from it.
MAX_EXPANDED_NODES = 100_000


def expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many nodes ``node`` stands for once every alias is expanded (aliases share their node, so
    the memo keeps this linear in the document's size)."""
    key = id(node)
    if key not in memo:
        memo[key] = 0  # a recursive alias counts once
        if isinstance(node, yaml.SequenceNode):
            memo[key] = 1 + sum(expanded_size(child, memo) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            memo[key] = 1 + sum(expanded_size(k, memo) + expanded_size(v, memo) for k, v in node.value)
        else:
            memo[key] = 1
    return memo[key]


def safe_load_bounded(text: str, *, where: str) -> Any:
    """``yaml.safe_load`` that refuses documents whose aliases expand past MAX_EXPANDED_NODES."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = expanded_size(node, {})
        if size > MAX_EXPANDED_NODES:
            raise ConfigError(f"{where}: YAML aliases expand to {size:,} values; allowed: at most "
                              f"{MAX_EXPANDED_NODES:,} (a config, not a data file)")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_text_file(path: Any, *, where: str) -> str:
    """The file's text (UTF-8), or a one-line ConfigError for a binary or unreadable file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\0" in text:
        raise ConfigError(f"{where}: not a text file (YAML is UTF-8 text)")
    return text


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
        raw = safe_load_bounded(read_text_file(path, where=where), where=where) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}:{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys ({', '.join(keys)})")
    return raw


def read_with_includes(spec: Any, *, resolve: Callable[[Any], Any], what: str, keys: tuple[str, ...],
                       path_keys: tuple[str, ...] = (), _seen: tuple = ()) -> dict:
    """Read ``spec`` (resolved to a file by ``resolve``) and merge its ``include:`` files first. An include
    is a path relative to the including file, else whatever ``resolve`` makes of the name. Entries of
    ``path_keys`` (lists of file names) are resolved against the file that states them, so that they
    still point there once merged into another file."""
    path = resolve(spec)
    key = str(path)
    if key in _seen:
        raise ConfigError(f"{what} include cycle: {' -> '.join(_seen + (key,))}")
    raw = read_yaml_mapping(path, what=what, keys=keys)
    includes = raw.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list):
        raise ConfigError(f"{what} {key}: include = {includes!r} is invalid; allowed: a file path or grid name, "
                          f"or a list of them")
    merged: dict = {}
    for inc in includes:
        if not isinstance(inc, str):
            raise ConfigError(f"{what} {key}: include entries must be file paths or grid names, got {inc!r}")
        merged = deep_merge(merged, read_with_includes(relative_to(key, inc), resolve=resolve, what=what,
                                                       keys=keys, path_keys=path_keys, _seen=_seen + (key,)))
    for name in path_keys:
        entries = raw.get(name)
        if isinstance(entries, str):
            entries = [entries]
        if isinstance(entries, list):
            raw[name] = [str(relative_to(key, e)) if isinstance(e, str) else e for e in entries]
    return deep_merge(merged, raw)


def relative_to(source: str, name: str) -> str | Path:
    """``name`` next to the file ``source`` when such a file exists, else ``name`` itself (a shipped name)."""
    local = Path(source).parent / name if source else None
    return local if local is not None and local.is_file() else name
