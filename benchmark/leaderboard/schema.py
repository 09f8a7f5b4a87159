"""The leaderboard entry schema: one JSON file per entry under ``leaderboards/<protocol>/<name>.json``,
validated here (the single source of truth for what an entry holds) and loaded as :class:`Entry`.

Every number in an entry was measured by leakbench; anything a submitter claims lives under
``reported`` and is never ranked.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import ConfigError

SCHEMA_VERSION = 1
DEFAULT_ROOT = Path("leaderboards")
NAME_PATTERN = r"[a-z0-9][a-z0-9._-]*"
NAME_RE = re.compile(NAME_PATTERN + r"\Z")
NAME_MAX = 64
_SOURCE_RE = re.compile(r"(builtin:[a-z0-9][a-z0-9._-]*|entry-point:[A-Za-z0-9][A-Za-z0-9._-]*"
                        r"|file:[^:\s]+\.py:[A-Za-z_][A-Za-z0-9_]*)\Z")
_SOURCE_ALLOWED = "builtin:NAME, file:PATH.py:ClassName or entry-point:NAME"
_LINK_RE = re.compile(r"https?://[^\s\"'<>]+\Z")
# A drop is baseline - value; writers may round each of the three numbers, so allow rounding slack.
DROP_TOLERANCE = 1e-4
VARIANTS = ("fixed", "adaptive")


def check_name(name: str) -> str:
    """An entry (or protocol) name as the board accepts it; a one-line ConfigError otherwise."""
    if not isinstance(name, str) or not NAME_RE.match(name) or len(name) > NAME_MAX:
        raise ConfigError(f"--name {name!r} is invalid; allowed: {NAME_PATTERN}, at most {NAME_MAX} characters")
    return name


class _Checker:
    """Checks one entry; every failure is a one-line ConfigError naming the file and the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, value: Any, allowed: str, *, note: str = "") -> None:
        raise ConfigError(f"{self.source}: {key} is {_describe(value)}{note}; allowed: {allowed}")

    def keys(self, key: str, obj: Any, required: tuple[str, ...], optional: tuple[str, ...] = (),
             *, extra_ok: bool = False) -> dict:
        if not isinstance(obj, dict):
            self.fail(key or "the entry", obj, "an object with keys " + ", ".join(required + optional))
        for k in required:
            if k not in obj:
                raise ConfigError(f"{self.source}: {_join(key, k)} is missing; required keys of "
                                  f"{key or 'an entry'}: {', '.join(required)}")
        if not extra_ok:
            for k in obj:
                if k not in required + optional:
                    raise ConfigError(f"{self.source}: {_join(key, k)} is not a known key; allowed: "
                                      f"{', '.join(required + optional)}")
        return obj

    def number(self, key: str, value: Any, *, lo: float | None = None, hi: float | None = None,
               nullable: bool = False, integer: bool = False) -> float | None:
        if value is None and nullable:
            return None
        kind = "an integer" if integer else "a number"
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or (isinstance(value, float) and not math.isfinite(value)) \
                or (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = (f" in [{lo:g}, {hi:g}]" if lo is not None and hi is not None
                      else f" >= {lo:g}" if lo is not None else "")
            self.fail(key, value, f"{kind}{bounds}{' or null' if nullable else ''}",
                      note=" (a string)" if isinstance(value, str) else "")
        return value

    def rate(self, key: str, value: Any, *, nullable: bool = False) -> float | None:
        return self.number(key, value, lo=0.0, hi=1.0, nullable=nullable)

    def string(self, key: str, value: Any, *, pattern: re.Pattern | None = None, allowed: str = "a non-empty string",
               nullable: bool = False) -> str | None:
        if value is None and nullable:
            return None
        if not isinstance(value, str) or not value.strip() or (pattern is not None and not pattern.match(value)):
            self.fail(key, value, allowed + (" or null" if nullable else ""))
        return value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _describe(value: Any) -> str:
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return json.dumps(shown)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    return f"a {'list' if isinstance(value, list) else 'object' if isinstance(value, dict) else type(value).__name__}"


TOP_KEYS = ("schema_version", "protocol", "name", "authors", "link", "defense", "accuracy", "privacy",
            "attacks", "worst_case", "flags", "reported", "provenance")
# Per attack: the leak rate and variant always; then reconstruction scores (DLG family) or
# generated-sample scores (GAN attacks), numbers or null where the attack produced none.
_ATTACK_NUMBERS: dict[str, Callable[[_Checker, str, Any], Any]] = {
    "psnr_median": lambda c, k, v: c.number(k, v, nullable=True),
    "ssim_median": lambda c, k, v: c.number(k, v, lo=-1.0, hi=1.0, nullable=True),
    "oracle_accuracy": lambda c, k, v: c.rate(k, v, nullable=True),
    "nn_ssim_mean": lambda c, k, v: c.number(k, v, lo=-1.0, hi=1.0, nullable=True),
    "targets": lambda c, k, v: c.number(k, v, lo=0, integer=True),
    "label_accuracy": lambda c, k, v: c.rate(k, v, nullable=True),
    "protocol_accuracy": lambda c, k, v: c.rate(k, v, nullable=True),
    # membership inference (its leak rate is a TPR at 1% FPR)
    "auc": lambda c, k, v: c.rate(k, v, nullable=True),
    "epsilon_lower_bound": lambda c, k, v: c.number(k, v, lo=0.0, nullable=True),
    # text reconstruction
    "token_accuracy_mean": lambda c, k, v: c.rate(k, v, nullable=True),
    "exact_match_rate": lambda c, k, v: c.rate(k, v, nullable=True),
}
# the scores each kind of cell puts on a board (its ``board_scores``): an attack's entry has one family
# (tests/test_board.py checks every registered kind's against this)
_SCORE_FAMILIES = (("psnr_median", "ssim_median"), ("oracle_accuracy", "nn_ssim_mean"),
                   ("auc", "epsilon_lower_bound"), ("token_accuracy_mean", "exact_match_rate"))
_PROVENANCE_REQUIRED = ("leakbench_version", "commit", "protocol", "seeds", "libraries", "hardware", "date",
                        "wall_seconds")


def validate_entry(data: Any, *, source: str, folder_protocol: str | None = None,
                   file_stem: str | None = None) -> Entry:
    """Check one entry against the schema; return it as an :class:`Entry` or raise ConfigError.

    ``folder_protocol`` and ``file_stem`` are the folder and file name it was read from, which must
    agree with its ``protocol`` and ``name``."""
    c = _Checker(source)
    c.keys("", data, TOP_KEYS)
    if data["schema_version"] != SCHEMA_VERSION or isinstance(data["schema_version"], bool):
        c.fail("schema_version", data["schema_version"], str(SCHEMA_VERSION))
    protocol = c.string("protocol", data["protocol"], pattern=NAME_RE, allowed=f"a protocol name ({NAME_PATTERN})")
    if folder_protocol is not None and protocol != folder_protocol:
        c.fail("protocol", protocol, f"{json.dumps(folder_protocol)}, the folder the entry lives in")
    name = c.string("name", data["name"], pattern=NAME_RE, allowed=f"{NAME_PATTERN}, at most {NAME_MAX} characters")
    if len(name) > NAME_MAX:
        c.fail("name", name, f"at most {NAME_MAX} characters")
    if file_stem is not None and name != file_stem:
        c.fail("name", name, f"{json.dumps(file_stem)}, the file's name without .json")
    c.string("authors", data["authors"])
    c.string("link", data["link"], pattern=_LINK_RE, allowed="an http(s) URL without spaces or quotes", nullable=True)

    defense = c.keys("defense", data["defense"], ("source", "params"))
    c.string("defense.source", defense["source"], pattern=_SOURCE_RE, allowed=_SOURCE_ALLOWED)
    if not isinstance(defense["params"], dict):
        c.fail("defense.params", defense["params"], "an object of parameter names to values")

    acc = c.keys("accuracy", data["accuracy"], ("value", "baseline", "drop"))
    value = c.rate("accuracy.value", acc["value"])
    baseline = c.rate("accuracy.baseline", acc["baseline"])
    drop = c.number("accuracy.drop", acc["drop"], lo=-1.0, hi=1.0)
    if abs(drop - (baseline - value)) > DROP_TOLERANCE:
        c.fail("accuracy.drop", drop, f"accuracy.baseline - accuracy.value = {baseline - value:.6g} "
                                      f"(to {DROP_TOLERANCE:g})")

    privacy = c.keys("privacy", data["privacy"], (), ("epsilon", "delta"))
    if privacy:
        if "epsilon" not in privacy:
            raise ConfigError(f"{source}: privacy.epsilon is missing; allowed: {{}} or an object with epsilon "
                              f"(and delta)")
        c.number("privacy.epsilon", privacy["epsilon"], lo=0.0)
        if "delta" in privacy:
            c.number("privacy.delta", privacy["delta"], lo=0.0, hi=1.0, nullable=True)

    attacks = data["attacks"]
    if not isinstance(attacks, dict) or not attacks:
        c.fail("attacks", attacks, "a non-empty object of attack name to scores")
    for attack, scores in attacks.items():
        key = f"attacks.{attack}"
        if not NAME_RE.match(attack):
            raise ConfigError(f"{source}: {key} is not a valid attack name; allowed: {NAME_PATTERN}")
        c.keys(key, scores, ("leak_rate", "variant"), tuple(_ATTACK_NUMBERS))
        c.rate(f"{key}.leak_rate", scores["leak_rate"])
        if scores["variant"] not in VARIANTS:
            c.fail(f"{key}.variant", scores["variant"], " or ".join(json.dumps(v) for v in VARIANTS))
        for field, check in _ATTACK_NUMBERS.items():
            if field in scores:
                check(c, f"{key}.{field}", scores[field])
        if not any(all(f in scores for f in family) for family in _SCORE_FAMILIES):
            raise ConfigError(f"{source}: {key} has no scores; required: "
                              + " or ".join(" and ".join(family) for family in _SCORE_FAMILIES))

    worst = c.keys("worst_case", data["worst_case"], ("leak_rate", "attack"))
    worst_leak = c.rate("worst_case.leak_rate", worst["leak_rate"])
    highest = max(scores["leak_rate"] for scores in attacks.values())
    if worst_leak != highest:
        c.fail("worst_case.leak_rate", worst_leak, f"{highest:g}, the highest leak rate over attacks")
    worst_attacks = [a for a, scores in attacks.items() if scores["leak_rate"] == highest]
    if worst["attack"] not in worst_attacks:
        c.fail("worst_case.attack", worst["attack"], " or ".join(json.dumps(a) for a in worst_attacks))

    flags = c.keys("flags", data["flags"], ("below_accuracy_floor", "accuracy_floor"),
                   ("training_diverged", "training"))
    floor = c.rate("flags.accuracy_floor", flags["accuracy_floor"])
    if flags["below_accuracy_floor"] is not (value < floor):
        c.fail("flags.below_accuracy_floor", flags["below_accuracy_floor"],
               f"{json.dumps(value < floor)}, since accuracy.value {value:g} "
               f"{'<' if value < floor else '>='} flags.accuracy_floor {floor:g}")
    if ("training" in flags) != ("training_diverged" in flags):
        raise ConfigError(f"{source}: flags.training and flags.training_diverged go together; allowed: both or neither")
    if "training" in flags:
        parts = flags["training"]
        if not isinstance(parts, list) or not parts:
            c.fail("flags.training", parts, "a non-empty list of the protocol's training parts")
        for i, part in enumerate(parts):
            key = f"flags.training[{i}]"
            c.keys(key, part, ("part", "accuracy", "baseline", "floor", "diverged"), extra_ok=True)
            acc, part_floor = c.rate(f"{key}.accuracy", part["accuracy"]), c.rate(f"{key}.floor", part["floor"])
            c.rate(f"{key}.baseline", part["baseline"])
            if part["diverged"] is not (acc < part_floor):
                c.fail(f"{key}.diverged", part["diverged"], f"{json.dumps(acc < part_floor)}, since its accuracy "
                                                           f"{acc:g} {'<' if acc < part_floor else '>='} its floor {part_floor:g}")
        diverged = any(part["diverged"] for part in parts)
        if flags["training_diverged"] is not diverged:
            c.fail("flags.training_diverged", flags["training_diverged"],
                   f"{json.dumps(diverged)}, whether any of flags.training diverged")

    if not isinstance(data["reported"], dict):
        c.fail("reported", data["reported"], "an object (free-form claims of the submitter; may be empty)")

    # provenance may record more about the environment than these keys; the required ones are checked
    prov = c.keys("provenance", data["provenance"], _PROVENANCE_REQUIRED, extra_ok=True)
    c.string("provenance.leakbench_version", prov["leakbench_version"])
    c.string("provenance.commit", prov["commit"], allowed="the git commit leakbench ran from", nullable=True)
    if prov["protocol"] != protocol:
        c.fail("provenance.protocol", prov["protocol"], f"{json.dumps(protocol)}, the entry's protocol")
    seeds = prov["seeds"]
    if not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        c.fail("provenance.seeds", seeds, "a non-empty list of integers")
    libraries = prov["libraries"]
    if not isinstance(libraries, dict) or any(not isinstance(v, str) for v in libraries.values()):
        c.fail("provenance.libraries", libraries, "an object of library name to version string")
    c.string("provenance.hardware", prov["hardware"])
    date = c.string("provenance.date", prov["date"], allowed="an ISO 8601 date-time with its UTC offset")
    try:
        parsed = datetime.fromisoformat(date)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        c.fail("provenance.date", date, "an ISO 8601 date-time with its UTC offset, e.g. 2026-11-21T04:00:00+00:00")
    c.number("provenance.wall_seconds", prov["wall_seconds"], lo=0.0)
    return Entry(path=Path(source), data=data)


@dataclass(frozen=True)
class Entry:
    """One validated leaderboard entry (``data`` is the JSON object as read)."""
    path: Path
    data: dict

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def protocol(self) -> str:
        return self.data["protocol"]

    @property
    def accuracy(self) -> float:
        return self.data["accuracy"]["value"]

    @property
    def worst_leak(self) -> float:
        return self.data["worst_case"]["leak_rate"]

    @property
    def worst_attack(self) -> str:
        return self.data["worst_case"]["attack"]

    @property
    def accuracy_floor(self) -> float:
        return self.data["flags"]["accuracy_floor"]

    @property
    def below_floor(self) -> bool:
        return self.data["flags"]["below_accuracy_floor"]

    @property
    def training_diverged(self) -> bool:
        return bool(self.data["flags"].get("training_diverged", False))

    @property
    def flagged(self) -> bool:
        """Ranked after the others: below the accuracy floor, or a part of its training diverged (it
        "defends" by not learning)."""
        return self.below_floor or self.training_diverged

    @property
    def diverged_parts(self) -> list[str]:
        return [p["part"] for p in self.data["flags"].get("training", []) if p["diverged"]]

    @property
    def epsilon(self) -> float | None:
        return self.data["privacy"].get("epsilon")

    @property
    def defense_label(self) -> str:
        defense = self.data["defense"]
        source = defense["source"].removeprefix("builtin:")
        params = ", ".join(f"{k}={v if isinstance(v, (int, float, str)) else json.dumps(v)}"
                           for k, v in defense["params"].items())
        return f"{source}({params})" if params else source


def load_entry(path: str | Path) -> Entry:
    """Read and validate one entry file; its folder names its protocol, its file name its name."""
    path = Path(path)
    if path.suffix != ".json":
        raise ConfigError(f"{path}: not an entry; allowed: leaderboards/<protocol>/<name>.json")
    try:
        data = json.loads(path.read_text(), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror}); allowed: a readable JSON file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({str(exc).splitlines()[0]}); allowed: one JSON object") from None
    except ValueError as exc:  # NaN or Infinity, or a repeated key
        raise ConfigError(f"{path}: {exc}; allowed: finite JSON numbers or null, each key once") from None
    return validate_entry(data, source=str(path), folder_protocol=path.parent.name, file_stem=path.stem)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """An object whose keys are unique: json would silently keep the last of two equal keys."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {json.dumps(key)} appears twice in one object")
        seen[key] = value
    return seen


def protocols_under(root: Path) -> list[str]:
    """The protocols that have a board folder under ``root``."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and NAME_RE.match(p.name))


def load_board(protocol: str, root: Path = DEFAULT_ROOT) -> list[Entry]:
    """Every entry of one protocol, validated."""
    folder = Path(root) / protocol
    return [load_entry(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
