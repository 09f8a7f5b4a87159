"""Errors that the CLI turns into clean one-line messages (exit code 2)."""
from __future__ import annotations

import difflib
from typing import Iterable


class ConfigError(ValueError):
    """Bad user input: an unknown name, a parameter out of range, a malformed grid.

    The message is one line that names the bad key or value and what is allowed.
    """


class UnknownNameError(ConfigError, KeyError):
    """A registry lookup for a name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices`` (Gymnasium's unknown-name hint), or ``""``."""
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""
