"""What is registered: the built-in components, and those of installed plugin packages.

Importing this module registers every built-in (their modules' ``@register_*`` decorators run on
import) and the entry-point plugins, so the ``list_*`` functions see everything a grid may name.
"""
from __future__ import annotations

from functools import partial

from . import attacks, cells, data, defenses, models, text  # noqa: F401  (register the built-ins)
from .plugins import load_entry_point_plugins
from .registry import LISTED
from .scoring import reconstruction  # noqa: F401  (registers the image metrics)
from .scoring import text as text_metrics  # noqa: F401  (registers the text metrics)


def load_all() -> None:
    """Register the entry-point plugins (the built-ins are registered by importing this module)."""
    load_entry_point_plugins()


def list_components(kind: str, pattern: str = "*") -> list[str]:
    """Registered names of ``kind`` (attacks, defenses, datasets, models, metrics, cells) matching a
    shell-style wildcard, e.g. ``list_components("attacks", "dlg*")``."""
    load_all()
    return LISTED[kind].list(pattern)


list_attacks = partial(list_components, "attacks")
list_defenses = partial(list_components, "defenses")
list_datasets = partial(list_components, "datasets")
list_models = partial(list_components, "models")
list_metrics = partial(list_components, "metrics")
list_cell_kinds = partial(list_components, "cells")
