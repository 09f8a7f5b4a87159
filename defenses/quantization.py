"""Low-precision sharing (DLG section 5.1, Table 3): round trip through fp16, bf16 or int8."""
from __future__ import annotations

import torch

from ..params import Param
from ..registry import register_defense
from .base import Defense

FP16_MAX = float(torch.finfo(torch.float16).max)


def int8_roundtrip(t: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric int8: q = round(t / scale) in [-127, 127] with scale = max|t| / 127 (per tensor) unless
    given. The round-trip error per entry is at most scale / 2."""
    scale = t.abs().max() / 127.0 if scale is None else scale
    if scale == 0:
        return t.clone()
    q = torch.round(t / scale).clamp(-127, 127).to(torch.int8)
    return q.to(t.dtype) * scale


@register_defense("quantization")
class Quantization(Defense):
    """Shares the update after a round trip through a low-precision format.

    fp16 saturates at +-65504 rather than overflowing to inf (what a sender scaling its update would
    see); bf16 has float32's range; int8 is symmetric with one scale per tensor (``int8``) or one for
    the whole update (``int8-update``). DLG does not state its int8 scheme;
    per tensor, every entry keeps its value to half a step of its own tensor's range, which leaves the
    image pinned down; one scale for the update rounds every tensor whose entries are far below the
    largest to zero, the candidate for the paper's accuracy drop and defense (Table 3: 53.7%, ✓)."""

    family = "quantization"
    replayable_transform = True  # rounding is deterministic: adaptive attacks match through it (straight-through)
    params = (Param("format", str, "fp16", "number format of the shared update (int8: one scale per tensor; "
                    "int8-update: one scale for the whole update)", choices=("fp16", "bf16", "int8", "int8-update")),)

    def transform(self, update, *, generator=None):
        if self.format == "fp16":
            return [u.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(u.dtype) for u in update]
        if self.format == "bf16":
            return [u.to(torch.bfloat16).to(u.dtype) for u in update]
        if self.format == "int8-update":
            scale = max(float(u.abs().max()) for u in update) / 127.0
            return [int8_roundtrip(u, torch.tensor(scale, dtype=u.dtype, device=u.device)) for u in update]
        return [int8_roundtrip(u) for u in update]
