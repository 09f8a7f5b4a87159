"""A board entry from a protocol run: the attacks' scores, the worst case, the accuracy against the
undefended baseline and its floor, and provenance (versions, commit, hardware, date); validated by the
schema before it is written, whole or not at all."""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..cells.base import record_kind
from ..errors import ConfigError
from ..registry import ATTACKS
from ..run.runner import library_versions
from ..storage import atomic_write_text
from ..version import __version__
from .protocol import Measured, Protocol
from .sandbox import DefenseSource
from ..threat import attack_key
from .schema import SCHEMA_VERSION, validate_entry


def _finite(value: Any, digits: int) -> float | None:
    return round(float(value), digits) if value is not None and math.isfinite(float(value)) else None


def attack_scores(record: dict) -> dict:
    """An entry's scores of one attack: the leak rate, the scores the record's kind of cell puts on a
    board (rounded to the digits it states), the number of targets and whether the attack is adaptive."""
    m = record["metrics"]
    variant = "adaptive" if getattr(ATTACKS.get(record["attack"]), "adaptive", False) else "fixed"
    scores = {key: _finite(m.get(key), digits) for key, digits in record_kind(record).board_scores}
    return {"leak_rate": round(float(m["leak_rate"]), 6), **scores, "targets": int(record["targets"]),
            "variant": variant}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _hardware(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    text = f"{platform.system()} {cpu}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(torch.device(device))}"
    return text


def build_entry(measured: Measured, *, protocol: Protocol, name: str, authors: str, link: str | None,
                source: DefenseSource, reported: dict | None = None) -> dict:
    records = measured.records
    attacks = {attack_key(r): attack_scores(r) for r in records}
    if len(attacks) != len(records):  # an entry holds one score per attack: a repeat would hide one
        names = [attack_key(r) for r in records]
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"protocol {protocol.name} runs {', '.join(repeated)} in more than one cell; "
                          f"allowed: each attack once (an entry holds one score per attack)")
    worst = max(attacks, key=lambda a: (attacks[a]["leak_rate"], -list(attacks).index(a)))
    value = round(float(records[0]["accuracy"]), 4)
    baseline = round(measured.baseline_accuracy, 4)
    floor = round(protocol.accuracy_floor_fraction * baseline, 4)
    privacy = records[0].get("privacy") or {}
    reported = dict(reported or {})
    if measured.privacy_claim:
        reported.setdefault("privacy_claimed", measured.privacy_claim)  # a claim, not measured by leakbench
    return {
        "schema_version": SCHEMA_VERSION,
        "protocol": protocol.name,
        "name": name,
        "authors": authors,
        "link": link,
        "defense": {"source": source.as_entry(), "params": measured.params},
        "accuracy": {"value": value, "baseline": baseline, "drop": round(baseline - value, 4)},
        "privacy": ({"epsilon": float(privacy["epsilon"]), "delta": privacy.get("delta")}
                    if "epsilon" in privacy and math.isfinite(float(privacy["epsilon"])) else {}),
        "attacks": attacks,
        "worst_case": {"leak_rate": attacks[worst]["leak_rate"], "attack": worst},
        "flags": {"below_accuracy_floor": value < floor, "accuracy_floor": floor,
                  **({"training_diverged": any(part["diverged"] for part in measured.training),
                      "training": measured.training} if measured.training else {})},
        "reported": reported,
        "provenance": {"leakbench_version": __version__, "commit": _git_commit(), "protocol": protocol.name,
                       "seeds": measured.seeds, "libraries": library_versions(), "hardware": _hardware(measured.device),
                       "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "wall_seconds": round(measured.wall_seconds, 1)},
    }


def entry_path(root: Path, protocol: str, name: str) -> Path:
    return Path(root) / protocol / f"{name}.json"


def validate_and_write(entry: dict, path: Path) -> None:
    """Check the entry with the board's validator, then write it whole (or not at all)."""
    text = json.dumps(entry, indent=2, allow_nan=False) + "\n"
    validate_entry(json.loads(text), source=str(path), folder_protocol=path.parent.name, file_stem=path.stem)
    atomic_write_text(path, text)
