"""Ranking a board: the order, the accuracy-vs-leakage Pareto front, the accuracy floor, and the one
paragraph that states them above every rendering (Markdown and HTML)."""
from __future__ import annotations

from scipy.stats import binomtest

from ..cells.base import CLASS_REPRESENTATIVES, RECORD_RECONSTRUCTION, kind_of_attack
from ..registry import ATTACKS, CELL_KINDS
from .schema import Entry

# the harms a board reports apart (the kinds of cell state theirs), in the order of its columns
THREAT_MODELS = (RECORD_RECONSTRUCTION, CLASS_REPRESENTATIVES)

RANKING_RULE = (
    "Entries that meet the protocol's accuracy floor come first, ordered by worst-case leak rate over "
    "the protocol's attacks (lower is better), then by accuracy (higher is better), then by name. "
    "Entries below the floor follow, flagged, in the same order. ★ marks the accuracy-vs-leakage "
    "Pareto front: no other entry has accuracy at least as high and worst-case leak at most as low, "
    "with one of the two strictly better."
)


def percent(v: float | None) -> str:
    """A rate as shown on a board: one decimal, "–" when absent."""
    return "–" if v is None else f"{100 * v:.1f}%"


def leak_interval(leak_rate: float, targets: int) -> tuple[float, float]:
    """The Wilson 95% interval of a leak rate measured on ``targets`` targets (scipy's binomtest)."""
    if targets < 1:
        return 0.0, 1.0
    hits = round(leak_rate * targets)
    ci = binomtest(hits, targets).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def leak_text(leak_rate: float | None, targets: int | None) -> str:
    """A leak rate with its target count and 95% interval, e.g. "50.0% of 2 [9–91%]"."""
    if leak_rate is None:
        return "–"
    if not targets:
        return percent(leak_rate)
    low, high = leak_interval(leak_rate, targets)
    return f"{percent(leak_rate)} of {targets} [{100 * low:.0f}–{100 * high:.0f}%]"


def threat_model_of(attack: str) -> str:
    """The harm an attack's records measure: its kind of cell's threat model ("other" when the attack is
    not registered here, e.g. a plugin that is not installed)."""
    if attack in ATTACKS and ATTACKS.get(attack).setting in CELL_KINDS:
        return kind_of_attack(attack).threat_model
    return "other"


def worst_by_threat(entry: Entry) -> dict[str, tuple[str, dict]]:
    """Per threat model, (attack, scores) of the entry's highest leak rate among that model's attacks:
    reconstruction of a participant's record and class representatives are different harms, so each has
    its own worst case beside the entry's overall one."""
    out: dict[str, tuple[str, dict]] = {}
    for attack, scores in entry.data["attacks"].items():
        model = threat_model_of(attack)
        if model not in out or scores["leak_rate"] > out[model][1]["leak_rate"]:
            out[model] = (attack, scores)
    return out


def common_floor(entries: list[Entry]) -> float | None:
    """The board's accuracy floor, or None when entries differ: the floor is a fraction of the
    no-defense accuracy, which each submission measures on its own hardware."""
    floors = {e.accuracy_floor for e in entries}
    return floors.pop() if len(floors) == 1 else None


def rank(entries: list[Entry]) -> list[Entry]:
    """The board's order: floor met first; then worst-case leak ascending, accuracy descending, name."""
    return sorted(entries, key=lambda e: (e.below_floor, e.worst_leak, -e.accuracy, e.name))


def pareto(entries: list[Entry]) -> set[str]:
    """Names of the entries on the accuracy-vs-leakage Pareto front (over all entries, floor or not)."""
    def dominates(a: Entry, b: Entry) -> bool:
        return (a.accuracy >= b.accuracy and a.worst_leak <= b.worst_leak
                and (a.accuracy > b.accuracy or a.worst_leak < b.worst_leak))

    return {e.name for e in entries if not any(dominates(o, e) for o in entries if o is not e)}


def attack_columns(entries: list[Entry]) -> list[str]:
    """Attack names over a board, in the order the entries list them."""
    return list(dict.fromkeys(a for e in entries for a in e.data["attacks"]))


def board_summary(protocol: str, entries: list[Entry]) -> str:
    """The paragraph above a board: the protocol, its floor and baseline, and the ranking rule."""
    if not entries:
        return f"Protocol `{protocol}`: no entries yet."
    def span(values: set[float]) -> str:
        return percent(min(values)) if len(values) == 1 else f"{percent(min(values))}–{percent(max(values))}"

    baseline = span({e.data["accuracy"]["baseline"] for e in entries})
    floor = span({e.accuracy_floor for e in entries})
    n_below = sum(e.below_floor for e in entries)
    return (f"Protocol `{protocol}`: {len(entries)} entries, {len(pareto(entries))} on the Pareto front, "
            f"{n_below} below the accuracy floor of {floor}. Accuracy without a "
            f"defense: {baseline}; drop is in percentage points against it. Leak rates are measured by "
            f"leakbench under the protocol's attacks, each with the number of targets it was measured on and "
            f"its Wilson 95% interval; the worst case is also given per threat model (record reconstruction, "
            f"class representatives); ε is the defense's privacy budget where it has one.")
