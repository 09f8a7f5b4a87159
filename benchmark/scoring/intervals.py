"""95% intervals of what leakbench reports (a leak rate over its targets, a statistic of per-sample values),
shared by the boards, the paper tables and the membership scores."""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.stats import binomtest, bootstrap

BOOTSTRAP_RESAMPLES = 2000


def leak_interval(leak_rate: float, targets: int) -> tuple[float, float]:
    """The Wilson 95% interval of a rate measured on ``targets`` trials (scipy's binomtest)."""
    if targets < 1:
        return 0.0, 1.0
    hits = round(leak_rate * targets)
    ci = binomtest(hits, targets).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def bootstrap_interval(samples: tuple[np.ndarray, ...], statistic: Callable[..., float], *,
                       n_resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """A seeded percentile-bootstrap 95% interval of ``statistic(*samples)`` (scipy's ``bootstrap``; a
    statistic with an ``axis`` argument runs vectorised). Each sample is resampled on its own (members and
    non-members apart, so every resample holds both). A constant or single-value sample has no spread:
    its value twice."""
    samples = tuple(np.asarray(s, dtype=float) for s in samples)
    if any(len(s) < 2 for s in samples) or all(np.all(s == s[0]) for s in samples):
        value = float(statistic(*samples)) if all(len(s) for s in samples) else float("nan")
        return value, value
    ci = bootstrap(samples, statistic, confidence_level=0.95, n_resamples=n_resamples, method="percentile",
                   random_state=0).confidence_interval
    return float(ci.low), float(ci.high)
