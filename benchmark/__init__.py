"""leakbench: a privacy auditing benchmark for collaborative and federated learning."""
from __future__ import annotations

from .attacks.base import Attack
from .catalog import (
    list_attacks, list_cell_kinds, list_components, list_datasets, list_defenses, list_metrics, list_models,
)
from .cells.base import CellContext, CellKind
from .defenses.base import Defense
from .errors import ConfigError
from .params import Component, Param
from .registry import (
    ATTACKS, CELL_KINDS, DATASETS, DEFENSES, METRICS, MODELS, Registry, register_attack, register_cell_kind,
    register_dataset, register_defense, register_metric, register_model,
)
from .version import __version__

__all__ = [
    "__version__", "ConfigError", "Component", "Param", "Registry", "Attack", "Defense", "CellKind", "CellContext",
    "ATTACKS", "DEFENSES", "DATASETS", "MODELS", "METRICS", "CELL_KINDS",
    "list_components", "list_attacks", "list_defenses", "list_datasets", "list_models", "list_metrics",
    "list_cell_kinds",
    "register_attack", "register_defense", "register_dataset", "register_model", "register_metric",
    "register_cell_kind",
]
