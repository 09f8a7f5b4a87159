"""One generic typed registry for every kind of component (attacks, defenses, datasets, models, metrics,
kinds of grid cell).

Borrowed shapes: timm's ``@register_model`` / ``list_models("resnet*")`` and Gymnasium's unknown-name
errors that suggest the closest registered name.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Generic, Iterator, TypeVar

from .errors import ConfigError, UnknownNameError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> component class, for one kind of component."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@registry.register("dlg")`` on a class registers it under ``name``."""

        def decorate(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorate

    def add(self, name: str, obj: T) -> None:
        if not name or name != name.strip() or any(c in name for c in "*?[]"):
            raise ValueError(f"invalid {self.kind} name {name!r}")
        if name in self._entries and self._entries[name] is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered (by {self._entries[name]!r})")
        self._entries[name] = obj
        try:  # components know their own registry name, for results and error messages
            setattr(obj, "registry_name", name)
        except (AttributeError, TypeError):
            pass

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        known = sorted(self._entries)
        return f"unknown {self.kind} {name!r}.{did_you_mean(name, known)} Available: {', '.join(known) or '(none)'}"

    def list(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style wildcard, sorted."""
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def build(self, name: str, params: dict | None = None):
        """Look up ``name`` and construct it with validated keyword parameters."""
        cls = self.get(name)
        checked = cls.validate_params(params or {}) if hasattr(cls, "validate_params") else dict(params or {})
        try:
            return cls(**checked)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.kind} {name!r}: {exc}") from None


ATTACKS: Registry = Registry("attack")
DEFENSES: Registry = Registry("defense")
DATASETS: Registry = Registry("dataset")
MODELS: Registry = Registry("model")
METRICS: Registry = Registry("metric")
CELL_KINDS: Registry = Registry("cell kind")  # how a grid runs an attack's setting (leakbench.cells)

REGISTRIES: dict[str, Registry] = {
    "attacks": ATTACKS,
    "defenses": DEFENSES,
    "datasets": DATASETS,
    "models": MODELS,
    "metrics": METRICS,
}
# everything `leakbench list` shows: the components (built with parameters) and the kinds of cell
LISTED: dict[str, Registry] = {**REGISTRIES, "cells": CELL_KINDS}

register_attack = ATTACKS.register
register_defense = DEFENSES.register
register_dataset = DATASETS.register
register_model = MODELS.register
register_metric = METRICS.register
register_cell_kind = CELL_KINDS.register
