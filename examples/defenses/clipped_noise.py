"""A defense written only against leakbench's public Defense API: per-layer norm clipping, then Gaussian
noise scaled to the clip norm.

Submit it with

    leakbench submit examples/defenses/clipped_noise.py:ClippedNoise --name clipped-noise \
        --params clip=1.0 noise_ratio=0.5 --smoke

Each parameter tensor's update is scaled down to L2 norm at most ``clip`` (so no single layer, and no
single outlier batch, dominates what is shared), then noise N(0, s^2) is added to every coordinate with
s = noise_ratio * clip / sqrt(numel): the noise's expected norm is ``noise_ratio`` times the clip norm,
whatever the layer's size. Unlike ``gaussian-noise`` the noise is relative to the signal, and unlike
``dp-sgd`` there is no per-example clipping and no privacy accounting (``privacy`` is not overridden).
"""
from __future__ import annotations

import math

import torch

from leakbench import Defense, Param


class ClippedNoise(Defense):
    """Per-layer L2 clipping to ``clip``, plus Gaussian noise of norm about ``noise_ratio * clip``."""

    family = "noise"
    params = (
        Param("clip", float, 1.0, "L2 norm bound of each parameter tensor's update", low=1e-6),
        Param("noise_ratio", float, 0.5, "expected noise norm per tensor, as a multiple of clip", low=0.0),
    )

    def transform(self, update, *, generator=None):
        shared = []
        for u in update:
            norm = float(u.norm())
            clipped = u * min(1.0, self.clip / norm) if norm > 0 else u.clone()
            std = self.noise_ratio * self.clip / math.sqrt(u.numel())
            # drawn on the CPU from the seeded generator: the same noise on any device
            noise = torch.randn(u.shape, generator=generator, dtype=u.dtype).to(u.device)
            shared.append(clipped + std * noise)
        return shared
