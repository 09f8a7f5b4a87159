"""Ranking a board: the order, the accuracy-vs-leakage Pareto front, the accuracy floor, and the one
paragraph that states them above every rendering (Markdown and HTML)."""
from __future__ import annotations

from dataclasses import dataclass

from ..cells.base import CLASS_REPRESENTATIVES, MEMBERSHIP, RECORD_RECONSTRUCTION, kind_of_attack
from ..registry import ATTACKS, CELL_KINDS
from ..scoring.intervals import leak_interval
from ..threat import attack_of_key
from .schema import Entry

# the harms a board reports apart (the kinds of cell state theirs), in the order of its columns; a
# membership leak rate is a TPR at 1% FPR, so it gets a column of its own and never a rank of its own
THREAT_MODELS = (RECORD_RECONSTRUCTION, CLASS_REPRESENTATIVES, MEMBERSHIP)
OVERALL = "overall"
# what a board can be ranked by; the first is the default: reconstructing a participant's own record
# from what it shares is the harm every protocol attack of the DLG family measures, and the one a
# defense of shared updates is for (class representatives are a property of the trained model)
RANKINGS = (RECORD_RECONSTRUCTION, CLASS_REPRESENTATIVES, OVERALL)
DEFAULT_RANKING = RECORD_RECONSTRUCTION


def ranking_rule(by: str = DEFAULT_RANKING) -> str:
    """The paragraph that states how a board ranked by ``by`` is ordered."""
    harm = "over all the protocol's attacks" if by == OVERALL else f"over the protocol's {by} attacks"
    return (
        f"Ranked by the worst leak rate {harm} (lower is better). Each leak rate is measured on a stated "
        f"number of targets and has a Wilson 95% interval; an entry's rank is 1 + the number of entries "
        f"whose interval lies wholly below its own, so entries whose intervals overlap share a rank, "
        f"shown as =N (tied: the targets cannot tell them apart). Within a rank, rows are ordered by leak "
        f"rate, then accuracy (higher is better), then name. Entries below the protocol's accuracy floor, "
        f"or whose training diverged in any part of the protocol, are not ranked (–) and follow, flagged. "
        f"★ marks the accuracy-vs-leakage Pareto front: no other entry has accuracy at least as high and "
        f"this leak rate at most as low, with one of the two strictly better."
    )


RANKING_RULE = ranking_rule()


def percent(v: float | None) -> str:
    """A rate as shown on a board: one decimal, "–" when absent."""
    return "–" if v is None else f"{100 * v:.1f}%"


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
    not registered here, e.g. a plugin that is not installed); ``attack`` is a score's key (``attack_key``)."""
    attack = attack_of_key(attack)
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


@dataclass(frozen=True)
class RankedLeak:
    """The leak rate a board ranks an entry by, with where it comes from and its 95% interval."""
    leak_rate: float
    targets: int | None
    attack: str
    low: float
    high: float


def ranked_leak(entry: Entry, by: str = DEFAULT_RANKING) -> RankedLeak | None:
    """The entry's worst leak rate under ``by`` (a threat model or "overall"); None when the entry has
    no attack of that threat model."""
    if by == OVERALL:
        attack = entry.worst_attack
        scores = entry.data["attacks"][attack]
    else:
        worst = worst_by_threat(entry).get(by)
        if worst is None:
            return None
        attack, scores = worst
    targets = scores.get("targets")
    low, high = leak_interval(scores["leak_rate"], targets) if targets else (scores["leak_rate"], scores["leak_rate"])
    return RankedLeak(scores["leak_rate"], targets, attack, low, high)


def rank(entries: list[Entry], by: str = DEFAULT_RANKING) -> list[Entry]:
    """The board's order: unflagged first; then the ranked leak ascending (missing last), accuracy
    descending, name."""
    def key(e: Entry):
        leak = ranked_leak(e, by)
        return (e.flagged, leak is None, leak.leak_rate if leak else 0.0, -e.accuracy, e.name)
    return sorted(entries, key=key)


def standings(entries: list[Entry], by: str = DEFAULT_RANKING) -> list[tuple[Entry, str]]:
    """Each entry in board order with its rank as shown: "1", "=2" (tied: another entry has the same
    rank), or "–" (flagged, or no leak rate under ``by``). The rank is 1 + the number of ranked entries
    whose 95% interval lies wholly below the entry's own, so overlapping intervals never order entries."""
    ordered = rank(entries, by)
    leaks = {e.name: ranked_leak(e, by) for e in ordered}
    ranked = [e for e in ordered if not e.flagged and leaks[e.name] is not None]
    numbers = {e.name: 1 + sum(leaks[o.name].high < leaks[e.name].low for o in ranked if o is not e) for e in ranked}
    counts: dict[int, int] = {}
    for n in numbers.values():
        counts[n] = counts.get(n, 0) + 1
    return [(e, "–" if e.name not in numbers else
             f"={numbers[e.name]}" if counts[numbers[e.name]] > 1 else str(numbers[e.name])) for e in ordered]


def pareto(entries: list[Entry], by: str = DEFAULT_RANKING) -> set[str]:
    """Names of the entries on the accuracy-vs-leakage Pareto front (over all entries, flagged or not),
    leakage being the ranked leak rate under ``by`` (entries without one are not on it)."""
    leaks = {e.name: ranked_leak(e, by) for e in entries}
    placed = [e for e in entries if leaks[e.name] is not None]

    def dominates(a: Entry, b: Entry) -> bool:
        la, lb = leaks[a.name].leak_rate, leaks[b.name].leak_rate
        return a.accuracy >= b.accuracy and la <= lb and (a.accuracy > b.accuracy or la < lb)

    return {e.name for e in placed if not any(dominates(o, e) for o in placed if o is not e)}


def attack_columns(entries: list[Entry]) -> list[str]:
    """Attack names over a board, in the order the entries list them."""
    return list(dict.fromkeys(a for e in entries for a in e.data["attacks"]))


def board_summary(protocol: str, entries: list[Entry], *, superseded_by: str | None = None) -> str:
    """The paragraph above a board: the protocol, its floor and baseline, what its leak rates are."""
    closed = (f" Superseded by protocol `{superseded_by}`: these entries stay readable and verifiable, "
              f"new ones go to `{superseded_by}`." if superseded_by else "")
    if not entries:
        return f"Protocol `{protocol}`: no entries yet.{closed}"
    def span(values: set[float]) -> str:
        return percent(min(values)) if len(values) == 1 else f"{percent(min(values))}–{percent(max(values))}"

    baseline = span({e.data["accuracy"]["baseline"] for e in entries})
    floor = span({e.accuracy_floor for e in entries})
    n_below = sum(e.below_floor for e in entries)
    n_diverged = sum(e.training_diverged for e in entries)
    return (f"Protocol `{protocol}`: {len(entries)} entries, {len(pareto(entries))} on the Pareto front, "
            f"{n_below} below the accuracy floor of {floor}, {n_diverged} whose training diverged in a part "
            f"of the protocol. Accuracy without a defense: {baseline}; drop is in percentage points against "
            f"it. Leak rates are measured by leakbench under the protocol's attacks, each with the number of "
            f"targets it was measured on and its Wilson 95% interval; the worst case is given per threat "
            f"model ({', '.join(THREAT_MODELS)}) beside the overall one; an attack on a federated-averaging "
            f"update is keyed ATTACK.fedavg; ε is the "
            f"defense's privacy budget where it has one.{closed}")
