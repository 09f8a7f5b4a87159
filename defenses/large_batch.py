"""Large batches (DLG section 5.3): the victim's batch size is the defense parameter."""
from ..params import Param
from ..registry import register_defense
from .base import Defense


@register_defense("large-batch")
class LargeBatch(Defense):
    """The victim computes its update on ``batch_size`` samples; the attacker must recover all of them.
    The update itself is shared unchanged; in the accuracy run the model trains with this batch size."""

    family = "large-batch"
    params = (Param("batch_size", int, 8, "victim batch size (paper: 1, 2, 4, 8, 16, 32, 64)", low=1, high=4096),)

    def victim_batch_size(self, default: int) -> int:
        return self.batch_size
