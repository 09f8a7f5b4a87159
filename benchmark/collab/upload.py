"""What a participant uploads without differential privacy: how many values, and which."""
from __future__ import annotations

import math

import torch


def fraction_count(fraction: float, total: int) -> int:
    """``floor(fraction * total)`` (tolerant of float error, e.g. 0.3 * 10), as the papers count
    theta_u |w| and theta_d |w|."""
    return min(total, int(math.floor(fraction * total + 1e-9)))


def upload_count(theta_u: float, num_params: int) -> int:
    """c = theta_u * |w|, the most values one upload may contain (at least one)."""
    return max(1, fraction_count(theta_u, num_params))


def select_upload(delta: torch.Tensor, *, count: int, criterion: str, tau: float = 0.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices (distinct) of the entries of the flat update ``delta`` to upload, without noise.

    ``largest``: the ``count`` largest magnitudes. ``random``: ``count`` uniformly random entries.
    ``threshold``: a random subset of at most ``count`` entries with ``|delta| > tau`` (fewer when
    fewer pass), Shokri-Shmatikov's "random subset of values above a threshold".
    """
    n = delta.numel()
    count = min(count, n)
    if criterion == "largest":
        return torch.topk(delta.abs(), count, sorted=False).indices
    if criterion == "random":
        return torch.randperm(n, generator=generator)[:count]
    if criterion == "threshold":
        above = (delta.abs() > tau).nonzero().flatten()
        return above[torch.randperm(above.numel(), generator=generator)[:count]]
    raise ValueError(f"no plain selection for criterion {criterion!r}")
