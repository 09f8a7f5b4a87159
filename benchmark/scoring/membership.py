"""Scoring membership inference: the ROC of an attack's scores on members and non-members, the numbers
Carlini et al. (S&P 2022) and ML Privacy Meter report (AUC, balanced accuracy, TPR at 0.1% and 1% FPR),
bootstrap intervals, the empirical lower bound on epsilon that a (TPR, FPR) point implies, and the verdict.

The verdict (:class:`MembershipRule`): a defense holds when the attack's TPR at 1% FPR is at most
``max_tpr_ratio`` (3) times that FPR. Calibration: an attack that knows nothing scores members and
non-members alike, and the ROC depends only on the scores' ranks, so the rule's false-alarm rate against
such an attack depends only on the two counts, whatever the data (:func:`null_false_alarm` computes it
with uniform scores, and every record carries it for its own counts). With 500 members and 500
non-members a ratio of 2 would flag 10% of blind attacks (the highest TPR at FPR <= 1% is the maximum
over thresholds, biased up), 3 flags 1.3% (2.7% at the quick grid's 360, 9% at the tests' 200), so 3 is
the lowest round ratio that keeps false alarms near or below 5% at the shipped grids' sizes. Checked on
other data: a real model that never saw the "members" passes, an overfit one fails
(tests/test_membership.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binomtest, mannwhitneyu
from sklearn.metrics import roc_auc_score, roc_curve

from .intervals import bootstrap_interval

#: the false-positive rates at which TPR is reported (Carlini et al. 2022, Table 1 and after)
FPR_POINTS = (0.001, 0.01)
#: ROC points kept in a record for the log-log figure (thinned evenly in log FPR beyond this many)
ROC_POINTS_KEPT = 200


@dataclass(frozen=True)
class MembershipRule:
    """A defense holds when TPR at ``fpr`` is at most ``max_tpr_ratio`` x ``fpr`` (see the module's note)."""

    max_tpr_ratio: float = 3.0
    fpr: float = 0.01

    @property
    def max_tpr(self) -> float:
        return self.max_tpr_ratio * self.fpr

    def describe(self) -> str:
        return (f"a defense holds against membership inference when TPR at {self.fpr:.1%} FPR is "
                f"<= {self.max_tpr_ratio:g} x FPR = {self.max_tpr:.1%}")


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> tuple[float, float]:
    """(TPR, FPR) of the ROC point with the highest TPR whose FPR is at most ``target``: Carlini et al.'s
    convention (their code: ``tpr[np.where(fpr < target)[0][-1]]``); the ROC starts at (0, 0)."""
    index = int(np.flatnonzero(fpr <= target + 1e-12)[-1])
    return float(tpr[index]), float(fpr[index])


def epsilon_from_rates(tpr: float, fpr: float, delta: float = 0.0) -> float:
    """The epsilon that a test with these rates proves at least, for an (epsilon, delta)-DP mechanism:
    every test satisfies TPR <= e^eps FPR + delta and 1 - FPR <= e^eps (1 - TPR) + delta (Kairouz et al.
    2015; Jagielski et al. 2020, eq. 1), so eps >= max(log((TPR - delta) / FPR), log((1 - delta - FPR) /
    (1 - TPR))); 0 when neither applies, inf when a side divides by zero."""
    bounds = [0.0]
    if tpr > delta:
        bounds.append(math.log((tpr - delta) / fpr) if fpr > 0 else math.inf)
    if 1 - delta - fpr > 0:
        bounds.append(math.log((1 - delta - fpr) / (1 - tpr)) if tpr < 1 else math.inf)
    return max(bounds)


def clopper_pearson(successes: int, trials: int) -> tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided 95% interval of a binomial rate (scipy's binomtest)."""
    ci = binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="exact")
    return float(ci.low), float(ci.high)


def epsilon_lower_bound(true_positives: int, members: int, false_positives: int, nonmembers: int,
                        delta: float = 0.0) -> float:
    """The conservative empirical epsilon of Jagielski et al. (NeurIPS 2020): :func:`epsilon_from_rates` of
    the Clopper-Pearson lower bound of TPR and upper bound of FPR, each the end of a two-sided 95% interval
    (a one-sided 97.5% bound, so both hold together with probability >= 95%): with finitely many
    members, a point estimate of FPR = 0 would claim an infinite epsilon."""
    tpr_low = clopper_pearson(true_positives, members)[0]
    fpr_high = clopper_pearson(false_positives, nonmembers)[1]
    return epsilon_from_rates(tpr_low, fpr_high, delta)  # both sides are smallest at low TPR, high FPR


def dp_tpr_bound(epsilon: float, delta: float, fpr: float) -> float:
    """The highest TPR at ``fpr`` that any test can reach against an (epsilon, delta)-DP mechanism
    (the hypothesis-testing view of DP, Kairouz et al. 2015)."""
    if epsilon > 50:  # e^50 x any FPR the scores can show is far above 1 (and e^710 overflows)
        return 1.0
    return float(min(1.0, math.exp(epsilon) * fpr + delta, 1 - math.exp(-epsilon) * (1 - delta - fpr)))


def auc_of_scores(members: np.ndarray, nonmembers: np.ndarray, axis: int = -1) -> np.ndarray:
    """ROC AUC as the Mann-Whitney U statistic over (members x non-members) pairs (ties count half), the same
    number as scikit-learn's ``roc_auc_score``; scipy's ``mannwhitneyu`` works along ``axis``, so the
    bootstrap computes all resamples at once."""
    u = mannwhitneyu(members, nonmembers, axis=axis, method="asymptotic", use_continuity=False).statistic
    return u / (members.shape[axis] * nonmembers.shape[axis])


def tpr_at_fpr_of_scores(members: np.ndarray, nonmembers: np.ndarray, target: float, axis: int = -1) -> np.ndarray:
    """:func:`tpr_at_fpr` of the scores' ROC without building it: a threshold just above the
    (floor(target x n) + 1)-th highest non-member score passes at most target x n non-members, and the
    members above that score are the highest TPR such a threshold reaches (vectorised along ``axis``)."""
    members, nonmembers = np.moveaxis(members, axis, -1), np.moveaxis(nonmembers, axis, -1)
    n = nonmembers.shape[-1]
    allowed = int(np.floor(target * n + 1e-9))
    if allowed >= n:
        return np.ones(members.shape[:-1])
    cut = np.sort(nonmembers, axis=-1)[..., n - 1 - allowed]
    return (members > cut[..., None]).mean(-1)


def null_false_alarm(members: int, nonmembers: int, rule: MembershipRule, *, draws: int = 2000) -> float:
    """How often an attack that knows nothing fails ``rule`` with these counts: the fraction of ``draws``
    seeded draws of exchangeable (uniform) scores whose TPR at the rule's FPR exceeds its bound."""
    rng = np.random.default_rng(0)
    tpr = tpr_at_fpr_of_scores(rng.random((draws, members)), rng.random((draws, nonmembers)), rule.fpr)
    return float(np.mean(tpr > rule.max_tpr + 1e-12))


def thinned_roc(fpr: np.ndarray, tpr: np.ndarray, keep: int = ROC_POINTS_KEPT) -> dict[str, list[float]]:
    """At most ``keep`` ROC points, evenly spaced in log FPR (the figure's axis), the ends kept."""
    if len(fpr) > keep:
        grid = np.unique(np.r_[0, np.searchsorted(fpr, np.logspace(-4, 0, keep - 2)).clip(0, len(fpr) - 1),
                               len(fpr) - 1])
        fpr, tpr = fpr[grid], tpr[grid]
    return {"fpr": [round(float(v), 6) for v in fpr], "tpr": [round(float(v), 6) for v in tpr]}


def score_membership(member_scores, nonmember_scores, *, rule: MembershipRule,
                     delta: float = 0.0) -> dict[str, Any]:
    """Metrics, ROC and verdict of membership scores (higher: more likely a member). ``delta``: of the
    defense's guarantee, for the empirical epsilon (0 without one)."""
    members = np.asarray(member_scores, dtype=float)
    nonmembers = np.asarray(nonmember_scores, dtype=float)
    labels = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    fpr, tpr, _ = roc_curve(labels, np.r_[members, nonmembers])
    at = {target: tpr_at_fpr(fpr, tpr, target) for target in FPR_POINTS}
    verdict_tpr, verdict_fpr = tpr_at_fpr(fpr, tpr, rule.fpr)
    true_positives, false_positives = round(verdict_tpr * len(members)), round(verdict_fpr * len(nonmembers))
    auc_low, auc_high = bootstrap_interval((members, nonmembers), auc_of_scores)
    tpr_low, tpr_high = bootstrap_interval(
        (members, nonmembers), lambda m, n, axis=-1: tpr_at_fpr_of_scores(m, n, rule.fpr, axis=axis))
    point = epsilon_from_rates(verdict_tpr, verdict_fpr, delta)
    metrics = {
        # the verdict's rate is the record's leak rate, so that tables, figures and boards read it as any
        "leak_rate": verdict_tpr,
        "auc": float(roc_auc_score(labels, np.r_[members, nonmembers])), "auc_interval": [auc_low, auc_high],
        # the best threshold's (optimistic: chosen on the scored sets, as ML Privacy Meter reports it)
        "balanced_accuracy": float(np.max((tpr + 1 - fpr) / 2)),
        "tpr_at_0.1%_fpr": at[0.001][0], "tpr_at_1%_fpr": at[0.01][0],
        "tpr_at_1%_fpr_interval": [tpr_low, tpr_high],
        "members": len(members), "nonmembers": len(nonmembers),
        "verdict_point": {"tpr": verdict_tpr, "fpr": verdict_fpr, "true_positives": true_positives,
                          "false_positives": false_positives},
        "epsilon_empirical": point if math.isfinite(point) else None,
        "epsilon_lower_bound": epsilon_lower_bound(true_positives, len(members), false_positives,
                                                   len(nonmembers), delta),
    }
    verdict = {"defended": verdict_tpr <= rule.max_tpr, "rule": rule.describe(), "max_leak_rate": rule.max_tpr,
               "max_tpr_ratio": rule.max_tpr_ratio, "fpr": rule.fpr,
               # the rule's false-alarm rate against a blind attack at these counts (see the module's note)
               "null_false_alarm": null_false_alarm(len(members), len(nonmembers), rule)}
    return {"metrics": metrics, "roc": thinned_roc(fpr, tpr), "verdict": verdict}
