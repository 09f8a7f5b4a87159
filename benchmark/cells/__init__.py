"""Kinds of grid cell, as plugins (see ``base``). Importing this package registers the built-in kinds:
``gradient`` (one shared update), ``text-gradient`` (one shared masked-LM update per sentence),
``collaborative`` (rounds of the collaborative protocol), ``model`` (the finished model) and ``membership``
(membership inference on the finished model)."""
from . import collaborative, gradient, membership, text_gradient, trained_model  # noqa: F401  (register the built-in kinds)
from .base import CellContext, CellKind, TableColumn

__all__ = ["CellContext", "CellKind", "TableColumn"]
