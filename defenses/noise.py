"""Additive noise on the shared gradient (DLG section 5.1)."""
from __future__ import annotations

import math

import torch

from ..params import Param
from ..registry import register_defense
from .base import Defense

_VARIANCE = Param("variance", float, 1e-3, "noise variance per coordinate (paper sweep 1e-4 .. 1e-1)", low=0.0)


@register_defense("gaussian-noise")
class GaussianNoise(Defense):
    """Adds N(0, variance) to every coordinate. The parameter is the variance, as in the paper's text
    (the standard deviation is its square root)."""

    family = "noise"
    params = (_VARIANCE,)

    def transform(self, update, *, generator=None):
        std = math.sqrt(self.variance)
        # drawn on the CPU from the seeded generator, so the noise is the same on any device
        return [u + std * torch.randn(u.shape, generator=generator, dtype=u.dtype).to(u.device) for u in update]


@register_defense("laplacian-noise")
class LaplacianNoise(Defense):
    """Adds Laplace(0, b) with b = sqrt(variance / 2), so the variance matches the Gaussian setting."""

    family = "noise"
    params = (_VARIANCE,)

    def transform(self, update, *, generator=None):
        b = math.sqrt(self.variance / 2.0)
        out = []
        for u in update:
            # inverse-CDF sampling, so the draw comes from our seeded generator
            # (torch.distributions.Laplace takes no generator)
            p = torch.rand(u.shape, generator=generator, dtype=torch.float64) - 0.5
            p = p.clamp(-0.5 + 1e-12, 0.5 - 1e-12)
            noise = -b * torch.sign(p) * torch.log1p(-2 * p.abs())
            out.append(u + noise.to(device=u.device, dtype=u.dtype))
        return out
