"""95% intervals of the rates leakbench reports (a leak rate over its targets), shared by the boards and
the paper tables."""
from __future__ import annotations

from scipy.stats import binomtest


def leak_interval(leak_rate: float, targets: int) -> tuple[float, float]:
    """The Wilson 95% interval of a rate measured on ``targets`` trials (scipy's binomtest)."""
    if targets < 1:
        return 0.0, 1.0
    hits = round(leak_rate * targets)
    ci = binomtest(hits, targets).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)
