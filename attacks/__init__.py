"""Attack plugins. Importing this package registers the built-in attacks."""
from .base import Attack
from . import dlg  # noqa: F401  (registers dlg, idlg, dlg-batched)

__all__ = ["Attack"]
