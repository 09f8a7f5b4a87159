"""Additive noise on the shared gradient (DLG section 5.1)."""
from __future__ import annotations

import math

import torch

from ..params import Param
from ..registry import register_defense
from ..sampling import laplace_noise
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
        return [u + laplace_noise(b, u.numel(), generator=generator).view(u.shape).to(device=u.device, dtype=u.dtype)
                for u in update]
