"""Attack plugins. Importing this package registers the built-in attacks."""
from .base import Attack
from . import dlg  # noqa: F401  (registers dlg, idlg, dlg-batched)
from . import inverting_gradients  # noqa: F401  (registers inverting-gradients)
from . import gan  # noqa: F401  (registers gan-active, gan-passive)
from . import model_inversion  # noqa: F401  (registers model-inversion)
from . import adaptive  # noqa: F401  (registers dlg-adaptive, idlg-adaptive, inverting-gradients-adaptive)
from . import dlg_text  # noqa: F401  (registers dlg-text)
from . import membership  # noqa: F401  (registers membership-loss, membership-lira)

__all__ = ["Attack"]
