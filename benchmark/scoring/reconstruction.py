"""Reconstruction metrics (torchmetrics-style: ``higher_is_better``, ``update`` / ``compute``),
one-to-one matching of batched reconstructions, and the recognisability verdict."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import ConfigError
from ..params import Component, Param, check_section
from ..registry import METRICS, register_metric
from .ssim import ssim_per_sample


class Metric(Component):
    """Per-sample image metric on [0, 1] images. ``update`` adds a batch, ``compute`` returns all values."""

    higher_is_better: ClassVar[bool] = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reset()

    def reset(self) -> None:
        self._values: list[torch.Tensor] = []

    def update(self, reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        values = self.per_sample(reconstruction.detach().float().clamp(0, 1), original.detach().float())
        self._values.append(values)
        return values

    def compute(self) -> torch.Tensor:
        return torch.cat(self._values) if self._values else torch.empty(0)

    def per_sample(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_metric("mse")
class MSE(Metric):
    higher_is_better = False

    def per_sample(self, x, y):
        return ((x - y) ** 2).flatten(1).mean(1)


@register_metric("psnr")
class PSNR(Metric):
    """Peak signal-to-noise ratio in dB for data range 1; capped at 100 dB for exact copies."""

    def per_sample(self, x, y):
        mse = ((x - y) ** 2).flatten(1).mean(1)
        return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=100.0)


@register_metric("ssim")
class SSIM(Metric):
    """Structural similarity (Gaussian window) through torchmetrics; the window shrinks for tiny images."""

    def per_sample(self, x, y):
        return ssim_per_sample(x, y)


def match_reconstructions(reconstruction: torch.Tensor, original: torch.Tensor) -> np.ndarray:
    """Hungarian assignment of reconstructions to originals by MSE; returns the permutation of the
    reconstructions (``reconstruction[perm[i]]`` is matched to ``original[i]``)."""
    x = reconstruction.detach().float().clamp(0, 1).flatten(1)
    y = original.detach().float().flatten(1)
    cost = torch.cdist(y.double(), x.double()).pow(2).numpy() / x.shape[1]
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm


def score_reconstruction(reconstruction: torch.Tensor, original: torch.Tensor,
                         labels_pred: torch.Tensor | None, labels_true: torch.Tensor,
                         metrics: tuple[str, ...] = ("mse", "psnr", "ssim")) -> dict[str, list[float]]:
    """Per-sample scores after one-to-one matching; images on [0, 1]."""
    perm = match_reconstructions(reconstruction, original)
    matched = reconstruction[perm]
    out: dict[str, list[float]] = {}
    for name in metrics:
        metric = METRICS.build(name)
        out[name] = [float(v) for v in metric.update(matched, original)]
    if labels_pred is not None:
        out["label_correct"] = [float(v) for v in (labels_pred[perm] == labels_true).float()]
    return out


@dataclass(frozen=True)
class RecognisabilityRule:
    """A reconstruction is recognisable when ``metric`` passes ``threshold``; a cell is defended when
    the fraction of recognisable samples (the leak rate) is at most ``max_leak_rate``."""

    metric: str = "ssim"
    threshold: float = 0.4
    max_leak_rate: float = 0.25

    @classmethod
    def from_config(cls, cfg: dict | None) -> "RecognisabilityRule":
        rule = cls(**check_section("verdict", cfg, (
            Param("threshold", float), Param("max_leak_rate", float, low=0.0, high=1.0)), also=("metric",)))
        if rule.metric not in METRICS:
            raise ConfigError(METRICS.unknown_message(rule.metric).replace("unknown metric", "verdict.metric: unknown metric"))
        return rule

    @property
    def higher_is_better(self) -> bool:
        return METRICS.get(self.metric).higher_is_better

    def recognisable(self, values) -> list[bool]:
        if self.higher_is_better:
            return [float(v) >= self.threshold for v in values]
        return [float(v) <= self.threshold for v in values]

    def leak_rate(self, values) -> float:
        flags = self.recognisable(values)
        return sum(flags) / len(flags) if flags else 0.0

    def defended(self, leak_rate: float) -> bool:
        return leak_rate <= self.max_leak_rate

    def describe(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        return (f"a sample leaks when {self.metric} {op} {self.threshold:g}; "
                f"a defense holds when the leak rate is <= {self.max_leak_rate:g}")


def censored_median(values: list[int | None]) -> float | None:
    """Median of per-target iterations where None (never recovered within the budget) counts as more
    than any budget; None when at least half the targets never recovered (the median is not observed)."""
    if not values:
        return None
    median = statistics.median(math.inf if v is None else v for v in values)
    return None if math.isinf(median) else float(median)
