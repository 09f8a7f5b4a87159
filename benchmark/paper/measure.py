"""Our side of a paper comparison: the records a row names, our value with its 95% interval, and whether
it agrees with the paper's by the row's rule."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from ..scoring.intervals import bootstrap_interval, leak_interval
from .experiment import Comparison, Experiment, Ours, Trend

@dataclass
class Row:
    setting: str
    quantity: str
    paper: Any
    ours: Any                 # a number, a verdict (bool), or None when no record matched
    low: float | None
    high: float | None
    agrees: bool | None       # None: nothing measured
    rule: str
    note: str
    records: int
    source: str | None


def field_of(record: dict, path: str) -> Any:
    """A dotted path into a record (``defense_params.variance``, ``per_target.token_accuracy.0``); None
    when absent."""
    value: Any = record
    for part in path.split("."):
        if isinstance(value, list) and part.isdigit():  # per_target.token_accuracy.0: the first target's
            value = value[int(part)] if int(part) < len(value) else None
            continue
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-15)
    return a == b


def matching(records: list[dict], where: dict) -> list[dict]:
    return [r for r in records if all(_same(field_of(r, k), v) for k, v in where.items())]


def _bootstrap(values: np.ndarray, stat: str) -> tuple[float, float]:
    """A seeded percentile-bootstrap 95% interval of the median or mean (scipy's ``bootstrap``)."""
    return bootstrap_interval((values,), np.median if stat == "median" else np.mean)


def _missing(record: dict, path: str) -> str:
    """Why a record gives no value at ``path``: absent, or null (e.g. a median over targets of which at
    least half never reached it), with the per-target values where the record has them."""
    head, _, leaf = path.rpartition(".")
    parent = field_of(record, head) if head else record
    if not isinstance(parent, dict) or leaf not in parent:
        return f"records have no {path}"
    per_target = field_of(record, f"per_target.{leaf.removesuffix('_median').removesuffix('_mean')}")
    shown = f"; per target: {', '.join('never' if v is None else str(v) for v in per_target)}" \
        if isinstance(per_target, list) else ""
    return f"{path} is null (not reached within the budget){shown}"


def baseline_does_not_leak(record: dict, records: list[dict]) -> bool:
    """The tables' rule (run.report: a verdict needs an attack that works): True when the record's attack,
    against no defense on the same dataset and model, is itself judged defended, so no defense row of it
    has a verdict. False when it leaks there or no such record exists."""
    same = [r for r in records if r.get("defense_family") == "baseline" and all(
        r.get(k) == record.get(k) for k in ("attack", "attack_params", "dataset", "model"))]
    return bool(same) and all((r.get("verdict") or {}).get("defended") is True for r in same)


def our_value(ours: Ours, found: list[dict], baseline: list[dict] | None, records: list[dict] = ()
              ) -> tuple[Any, float | None, float | None, str]:
    """(value, low, high, a note on what was measured) from the matching records (``records``: all of
    the run's, for the baseline a verdict needs)."""
    record = found[0]
    if ours.value == "verdict":
        verdict = record.get("verdict") or {}
        leak = field_of(record, "metrics.leak_rate")
        psnr = field_of(record, "metrics.psnr_median")
        seen = f"leak rate {100 * leak:.0f}%" if leak is not None else "no leak rate"
        if psnr is not None:
            seen += f", PSNR {psnr:.1f} dB"
        low = high = None
        if leak is not None:  # the verdict's evidence: the leak rate's interval over the record's samples
            samples = len(field_of(record, "per_sample.ssim") or []) or int(record.get("targets") or 0)
            low, high = leak_interval(leak, samples)
            seen += f" (leak rate's interval over {samples} samples)"
        # the baseline row keeps its verdict: "the attack fails undefended" is itself the comparison
        if record.get("defense_family") != "baseline" and baseline_does_not_leak(record, records):
            return None, low, high, (f"no verdict: {record.get('attack')} does not leak against none on this "
                                     f"dataset and model either, so no defense can be credited ({seen})")
        return verdict.get("defended"), low, high, seen
    if ours.per_sample:
        values = np.asarray([v for r in found for v in (field_of(r, f"per_sample.{ours.per_sample}") or [])
                             if v is not None and math.isfinite(v)], dtype=float)
        if not len(values):
            return None, None, None, f"no per-sample {ours.per_sample}"
        value = float(np.median(values) if ours.stat == "median" else values.mean())
        low, high = _bootstrap(values, ours.stat)
        note = f"{ours.stat} of {len(values)} samples"
    else:
        raw = field_of(record, ours.value)
        if raw is None:
            return None, None, None, _missing(record, ours.value)
        value, low, high = float(raw), None, None
        note = ""
        if ours.interval == "wilson":
            samples = len(field_of(record, "per_sample.ssim") or []) or int(record.get("targets") or 0)
            low, high = leak_interval(value, samples)
            note = f"rate over {samples} samples"
    if ours.relative_to is not None:
        if not baseline:
            return None, None, None, f"no record matches relative_to {ours.relative_to}"
        base = field_of(baseline[0], ours.value or "")
        if not base:
            return None, None, None, "the baseline value is zero or absent"
        if ours.min_baseline is not None and base < ours.min_baseline:
            return None, None, None, (f"not read: the baseline {ours.value} is {base:.3g}, below the {ours.min_baseline:g} "
                                      f"a ratio needs (at chance level the ratio is noise); ours {value:.3g}")
        value, low, high = value / base, (low / base if low is not None else None), \
            (high / base if high is not None else None)
    scale = ours.scale
    return (value * scale, low * scale if low is not None else None, high * scale if high is not None else None,
            note)


def measure(comparison: Comparison, records: list[dict]) -> Row:
    found = matching(records, comparison.where)
    rule_text = comparison.rule.describe()
    if not found:
        return Row(comparison.setting, comparison.quantity, comparison.paper, None, None, None, None, rule_text,
                   f"no record matches {comparison.where}", 0, comparison.source)
    baseline = matching(records, comparison.ours.relative_to) if comparison.ours.relative_to else None
    value, low, high, seen = our_value(comparison.ours, found, baseline, records)
    agrees = None if value is None else bool(comparison.rule.agrees(value, comparison.paper))
    note = seen
    if agrees is False:
        note = "; ".join(x for x in (seen, comparison.why_it_may_differ) if x)
    return Row(comparison.setting, comparison.quantity, comparison.paper, value, low, high, agrees, rule_text,
               note, len(found), comparison.source)


def check_trend(trend: Trend, rows: list[Row]) -> tuple[bool | None, bool | None, str]:
    """(the paper's values follow the order, ours do, a sentence) over the rows of ``trend.quantity``."""
    chosen = [r for r in rows if r.quantity == trend.quantity]

    def ordered(values: list[Any]) -> bool | None:
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) != len(values) or len(numbers) < 2:
            return None
        pairs = list(zip(numbers, numbers[1:]))
        return all(b > a for a, b in pairs) if trend.order == "increasing" else all(b < a for a, b in pairs)

    paper, ours = ordered([r.paper for r in chosen]), ordered([r.ours for r in chosen])
    if ours is None:  # a row was not measured: the trend cannot be read off ours
        ours_text = "not measured on every row"
    else:
        ours_text = f"{'' if ours else 'not '}{trend.order}"
    shown = ", ".join("–" if r.ours is None else f"{r.ours:.4g}" for r in chosen)
    sentence = (f"{trend.claim} Paper: {', '.join(str(r.paper) for r in chosen)}; ours: {shown} "
                f"({ours_text} over {', '.join(r.setting for r in chosen)}).")
    return paper, ours, sentence


@dataclass
class CalibrationResult:
    threshold: float | None          # fitted on the calibration rows
    shipped: float
    fit_agree: tuple[int, int]       # (agreeing, rows) on the calibration rows, fitted threshold
    held_out_agree: tuple[int, int]  # on the other verdict rows, fitted threshold
    shipped_fit_agree: tuple[int, int]
    shipped_held_out_agree: tuple[int, int]
    text: str


def calibrate(experiment: Experiment, records: list[dict]) -> CalibrationResult | None:
    """Fit the per-sample threshold on the calibration rows (the value that agrees with the most of the
    paper's verdicts there; of a tie, the middle of the best run of candidates), then count agreement
    on the held-out verdict rows, for the fitted and the shipped threshold."""
    cal = experiment.calibration
    if cal is None:
        return None
    rows = []  # (setting, paper verdict, per-sample values)
    for c in experiment.comparisons:
        if c.ours.value != "verdict":
            continue
        found = matching(records, c.where)
        values = [v for r in found for v in (field_of(r, f"per_sample.{cal.metric}") or []) if v is not None]
        if values:
            rows.append((c.setting, bool(c.paper), np.asarray(values, dtype=float)))

    def agreement(threshold: float, part: list) -> tuple[int, int]:
        agree = sum((np.mean(v >= threshold) <= cal.max_leak_rate) == paper for _, paper, v in part)
        return int(agree), len(part)

    fit = [r for r in rows if r[0] in cal.on]
    held = [r for r in rows if r[0] not in cal.on]
    if not fit:
        return CalibrationResult(None, cal.shipped_threshold, (0, 0), (0, 0), (0, 0), (0, 0),
                                 "No calibration row was measured.")
    candidates = np.round(np.arange(0.01, 1.0, 0.01), 2)
    scores = np.array([agreement(t, fit)[0] for t in candidates])
    best = np.flatnonzero(scores == scores.max())
    runs = np.split(best, np.flatnonzero(np.diff(best) != 1) + 1)  # consecutive runs of best candidates
    longest = max(runs, key=len)
    threshold = float(candidates[longest[len(longest) // 2]])
    result = CalibrationResult(threshold, cal.shipped_threshold, agreement(threshold, fit), agreement(threshold, held),
                               agreement(cal.shipped_threshold, fit), agreement(cal.shipped_threshold, held), "")

    def frac(pair: tuple[int, int]) -> str:
        return f"{pair[0]}/{pair[1]}"

    result.text = (
        f"The verdict's threshold (a sample leaks when {cal.metric} >= t; a defense holds when at most "
        f"{cal.max_leak_rate:g} of samples leak) fitted on {', '.join(cal.on)} is t = {threshold:.2f}: it agrees "
        f"with the paper on {frac(result.fit_agree)} of those rows and on {frac(result.held_out_agree)} of the "
        f"held-out rows ({', '.join(r[0] for r in held) or 'none'}). The shipped t = {cal.shipped_threshold:g}, "
        f"chosen before this experiment: {frac(result.shipped_fit_agree)} and {frac(result.shipped_held_out_agree)}.")
    return result


def measure_experiment(experiment: Experiment, records: list[dict]) -> tuple[list[Row], list[tuple]]:
    rows = [measure(c, records) for c in experiment.comparisons]
    trends = [(t, *check_trend(t, rows)) for t in experiment.trends]
    return rows, trends
