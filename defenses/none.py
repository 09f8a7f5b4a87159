from ..registry import register_defense
from .base import Defense


@register_defense("none")
class NoDefense(Defense):
    """The baseline row: the update is shared as computed."""

    family = "baseline"
