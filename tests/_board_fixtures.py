"""Fixture leaderboard entries for the board tests (never committed under leaderboards/): plausible
numbers, one entry below the accuracy floor, and a Pareto front of several entries."""
from __future__ import annotations

import copy
import json
from pathlib import Path

PROTOCOL = "v3-smoke"
FLOOR = 0.5
BASELINE = 0.95

# name -> (accuracy, {attack: leak rate}, epsilon or None)
BOARD = {
    "dp-sgd-strong": (0.82, {"dlg": 0.0, "dlg-adaptive": 0.125, "gan-active": 0.05}, 2.1),
    "clipped-noise": (0.91, {"dlg": 0.25, "dlg-adaptive": 0.5, "gan-active": 0.1}, None),
    "selective": (0.88, {"dlg": 0.5, "dlg-adaptive": 0.5, "gan-active": 0.2}, None),
    "prune-light": (0.94, {"dlg": 1.0, "dlg-adaptive": 1.0, "gan-active": 0.3}, None),
    "quant-int8": (0.90, {"dlg": 1.0, "dlg-adaptive": 0.75, "gan-active": 0.3}, None),
    "noise-heavy": (0.32, {"dlg": 0.0, "dlg-adaptive": 0.0, "gan-active": 0.0}, None),
}


def make_entry(name: str, accuracy: float, leaks: dict[str, float], epsilon: float | None = None, *,
               protocol: str = PROTOCOL, floor: float = FLOOR, authors: str = "A. Tester",
               params: dict | None = None, targets: int = 4) -> dict:
    """A schema-valid entry whose derived fields (drop, worst case, flag) follow from its inputs."""
    attacks = {}
    for attack, leak in leaks.items():
        variant = "adaptive" if attack.endswith("-adaptive") else "fixed"
        if attack.startswith("gan"):
            attacks[attack] = {"leak_rate": leak, "oracle_accuracy": min(1.0, leak + 0.4),
                               "nn_ssim_mean": 0.1 + 0.5 * leak, "targets": targets, "variant": variant}
        else:
            attacks[attack] = {"leak_rate": leak, "psnr_median": 8.0 + 30.0 * leak,
                               "ssim_median": 0.05 + 0.8 * leak, "targets": targets, "variant": variant}
    worst_attack = max(attacks, key=lambda a: attacks[a]["leak_rate"])
    return {
        "schema_version": 1, "protocol": protocol, "name": name, "authors": authors,
        "link": f"https://example.org/{name}",
        "defense": {"source": "builtin:gaussian-noise", "params": params if params is not None else {"variance": 0.01}},
        "accuracy": {"value": accuracy, "baseline": BASELINE, "drop": BASELINE - accuracy},
        "privacy": {"epsilon": epsilon, "delta": 1e-5} if epsilon is not None else {},
        "attacks": attacks,
        "worst_case": {"leak_rate": attacks[worst_attack]["leak_rate"], "attack": worst_attack},
        "flags": {"below_accuracy_floor": accuracy < floor, "accuracy_floor": floor},
        "reported": {"accuracy": accuracy + 0.01},
        "provenance": {"leakbench_version": "0.1.0", "commit": "0123abc", "protocol": protocol, "seeds": [0],
                       "libraries": {"torch": "2.13.0"}, "hardware": "2-core CPU",
                       "date": "2026-11-21T04:00:00+00:00", "wall_seconds": 123.4},
    }


def board_entries() -> dict[str, dict]:
    return {name: make_entry(name, acc, leaks, eps) for name, (acc, leaks, eps) in BOARD.items()}


def write_entry(root: Path, data: dict, *, protocol: str | None = None, name: str | None = None) -> Path:
    path = Path(root) / (protocol or data["protocol"]) / f"{name or data['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def write_board(root: Path, entries: dict[str, dict] | None = None) -> list[Path]:
    return [write_entry(root, copy.deepcopy(e)) for e in (entries or board_entries()).values()]
