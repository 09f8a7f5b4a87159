"""``leakbench submit``: validate a submission, run the protocol on it, write its entry."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from ..storage import check_writable
from .build import build_entry, entry_path, validate_and_write
from .protocol import load_protocol, run_protocol
from .sandbox import DefenseSource, SandboxLimits
from .schema import DEFAULT_ROOT, check_name


def submit(spec: str, *, name: str, authors: str = "anonymous", link: str | None = None,
           params: dict | None = None, protocol: str = "v3-smoke", reported: dict | None = None,
           root: Path = DEFAULT_ROOT, replace: bool = False, limits: SandboxLimits | None = None,
           data_dir: str | None = None, device: str = "cpu", overrides: dict | None = None,
           progress: Callable[[str], None] | None = None) -> tuple[Path, dict]:
    """Validate, run the protocol, write the entry. Raises ConfigError (nothing written) on any failure."""
    check_name(name)
    if link is not None and not re.match(r"https?://[^\s\"'<>]+\Z", link):
        raise ConfigError(f"--link {link!r} is invalid; allowed: an http(s) URL")
    chosen = load_protocol(protocol, for_submission=True)
    source = DefenseSource.parse(spec)
    path = entry_path(root, chosen.name, name)
    if path.exists() and not replace:
        raise ConfigError(f"{path} already exists; choose another --name or pass --replace")
    check_writable(path.parent, what="--root")  # before the protocol's minutes of work, not after
    measured = run_protocol(source, dict(params or {}), name=name, protocol=chosen, data_dir=data_dir, limits=limits,
                            device=device, overrides=overrides, progress=progress)
    entry = build_entry(measured, protocol=chosen, name=name, authors=authors, link=link, source=source,
                        reported=reported)
    if path.exists() and not replace:  # someone else took the name while this ran
        raise ConfigError(f"{path} already exists; choose another --name or pass --replace")
    validate_and_write(entry, path)
    return path, entry
