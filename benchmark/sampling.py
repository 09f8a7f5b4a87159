"""Seeded noise samplers shared by the defenses."""
from __future__ import annotations

import torch


def laplace_noise(scale: float, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` draws of Laplace(0, scale) in float64, by inverse CDF so they come from our seeded
    generator (``torch.distributions.Laplace`` cannot take one)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64) - 0.5
    u = u.clamp(-0.5 + 1e-16, 0.5 - 1e-16)
    return -scale * torch.sign(u) * torch.log1p(-2 * u.abs())
