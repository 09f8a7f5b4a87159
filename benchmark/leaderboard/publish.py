"""Publishing the boards: validate every entry under a leaderboards folder, then write its
``README.md`` (Markdown) and one static ``<protocol>/index.html`` per protocol."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ..storage import atomic_write_text
from .html import render_html
from .markdown import render_index
from .schema import DEFAULT_ROOT, NAME_PATTERN, NAME_RE, load_board, protocols_under


def superseded_protocols() -> dict[str, str]:
    """Protocol name -> the protocol that supersedes it."""
    from .protocol import protocols  # the protocol module runs grids: imported only to read its table
    return {name: p.superseded_by for name, p in protocols().items() if p.superseded_by}


def render_boards(root: Path = DEFAULT_ROOT, *, protocols: list[str] | None = None) -> dict[str, Path]:
    """Validate every entry under ``root``, then write ``root/README.md`` and ``root/<protocol>/index.html``.

    ``protocols`` adds boards that have no folder yet (an empty board). Nothing is written unless every
    entry is valid. Returns the files written, by kind."""
    root = Path(root)
    names = sorted(set(protocols_under(root)) | set(protocols or ()))
    for p in names:
        if not NAME_RE.match(p):
            raise ConfigError(f"--protocol {p!r} is invalid; allowed: {NAME_PATTERN}")
    superseded = superseded_protocols()
    names.sort(reverse=True)  # newest first (v3 before v2) ...
    names.sort(key=lambda p: p in superseded)  # ... and the boards that take entries before the closed ones
    boards = {p: load_board(p, root) for p in names}  # all validated before anything is written
    written = {}
    for p, entries in boards.items():
        path = root / p / "index.html"
        atomic_write_text(path, render_html(p, entries, superseded_by=superseded.get(p)))
        written[f"html:{p}"] = path
    atomic_write_text(root / "README.md", render_index(boards, superseded=superseded))
    written["markdown"] = root / "README.md"
    return written
