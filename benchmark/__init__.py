"""leakbench: a privacy auditing benchmark for collaborative and federated learning."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import ConfigError
from .params import Component, Param
from .registry import (
    ATTACKS, DATASETS, DEFENSES, METRICS, MODELS, Registry,
    list_attacks, list_datasets, list_defenses, list_metrics, list_models,
    register_attack, register_dataset, register_defense, register_metric, register_model,
)
from . import data as _data, models as _models, metrics as _metrics  # noqa: F401  (register built-ins)
from . import attacks as _attacks, defenses as _defenses  # noqa: F401
from .attacks.base import Attack
from .defenses.base import Defense

__all__ = [
    "__version__", "ConfigError", "Component", "Param", "Registry", "Attack", "Defense",
    "ATTACKS", "DEFENSES", "DATASETS", "MODELS", "METRICS",
    "list_attacks", "list_defenses", "list_datasets", "list_models", "list_metrics",
    "register_attack", "register_defense", "register_dataset", "register_model", "register_metric",
]
