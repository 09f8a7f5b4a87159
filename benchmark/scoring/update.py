"""How much a defense changes the update it shares, relative to the update's own size.

A defense's strength is set in absolute units (noise variance, quantisation step), but what it hides is
relative to the gradient: the same variance is 0.1x the gradient's RMS on a LeNet at random init and
nearly 2x on a sigmoid ResNet-56 (DLG Table 3's model). Records carry both numbers, so a reader can
compare defense settings across models and datasets. Evaluator-side measurements: the attacker never
sees the clean update when a defense is on.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def update_distortion(clean: Sequence[torch.Tensor], shared: Sequence[torch.Tensor]) -> dict[str, float | None]:
    """``gradient_rms``: the RMS of the undefended update's coordinates; ``relative_distortion``: the
    norm of (shared - clean) over the norm of clean (0 for no defense, ~1 when the change is as large as
    the update itself); None where the shared update has another shape (a defense that shares something
    else) or the clean update is zero."""
    flat = torch.cat([c.detach().flatten().double() for c in clean])
    rms = float(flat.pow(2).mean().sqrt()) if flat.numel() else 0.0
    same_shape = len(clean) == len(shared) and all(c.shape == s.shape for c, s in zip(clean, shared))
    if not same_shape or rms == 0.0:
        return {"gradient_rms": rms, "relative_distortion": None}
    diff = torch.cat([(s.detach().to(c.device).double() - c.detach().double()).flatten() for c, s in zip(clean, shared)])
    distortion = float(diff.norm() / flat.norm())
    return {"gradient_rms": rms, "relative_distortion": distortion if math.isfinite(distortion) else None}
