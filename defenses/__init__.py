"""Defense plugins. Importing this package registers the built-in defenses."""
from .base import Defense
from . import none, noise, pruning, quantization, large_batch, dp, secure_aggregation  # noqa: F401  (registers them)

__all__ = ["Defense"]
