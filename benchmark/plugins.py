"""Third-party plugins found through entry points, so a pip-installed package registers its attacks
and defenses without touching leakbench.

A plugin package declares, in its pyproject.toml::

    [project.entry-points."leakbench.defenses"]
    my-defense = "my_pkg.module:MyDefense"

and the class is registered under the entry point's name (the same for ``leakbench.attacks`` and, for
a new kind of grid cell, ``leakbench.cells``).
"""
from __future__ import annotations

from importlib.metadata import entry_points

from .registry import LISTED

GROUPS = {"leakbench.attacks": "attacks", "leakbench.defenses": "defenses", "leakbench.cells": "cells"}
_loaded = False


def load_entry_point_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for group, kind in GROUPS.items():
        for ep in entry_points(group=group):
            registry = LISTED[kind]
            if ep.name not in registry:
                registry.add(ep.name, ep.load())
