"""Gradient pruning / compression (DLG section 5.2): zero the smallest-magnitude entries."""
from __future__ import annotations

import torch

from ..params import Param
from ..registry import register_defense
from ..threat import AttackerMap
from .base import Defense


def prune_smallest(t: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero exactly floor(ratio * numel) entries of smallest magnitude (ties by position)."""
    k = int(ratio * t.numel())
    out = t.clone()
    if k > 0:
        order = torch.argsort(t.abs().flatten(), stable=True)
        out.view(-1)[order[:k]] = 0
    return out


@register_defense("pruning")
class GradientPruning(Defense):
    """Zeroes the fraction ``ratio`` of smallest-magnitude entries, per parameter tensor (``layer``,
    as deep gradient compression prunes) or over the whole update (``global``)."""

    family = "sparsification"
    params = (
        Param("ratio", float, 0.2, "fraction of entries zeroed (paper sweep 0.01 .. 0.7, plus 0.99)",
              low=0.0, high=1.0),
        Param("scope", str, "layer", "threshold per parameter tensor or over all of them",
              choices=("layer", "global")),
    )

    def attacker_map(self, shared):
        """The zeroed coordinates carry no information: only those that survived (non-zero in the shared
        update) are matched."""
        masks = [(t != 0).to(t.dtype) for t in shared]
        return AttackerMap("surviving-coordinates", lambda update: [u * m for u, m in zip(update, masks)])

    def transform(self, update, *, generator=None):
        if self.scope == "layer":
            return [prune_smallest(u, self.ratio) for u in update]
        flat = prune_smallest(torch.cat([u.flatten() for u in update]), self.ratio)
        out, start = [], 0
        for u in update:
            out.append(flat[start:start + u.numel()].view_as(u).clone())
            start += u.numel()
        return out
