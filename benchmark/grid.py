"""Grids as data: a YAML file of attacks x defense sweeps x datasets x models x seeds, plus sizes.

A grid may ``include:`` other YAML files (paths relative to the including file; a bare name such as
``defaults`` means a grid shipped with leakbench); the including file's keys win, mappings merge.
``load_grid`` validates everything (names, parameters, sizes) before anything runs.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .leak_scores import ORACLE_PARAMS, LeakRule
from .params import check_section
from .metrics import RecognisabilityRule
from .registry import ATTACKS, DATASETS, DEFENSES, MODELS, _ensure_builtins
from .training import TrainingConfig

TOP_LEVEL_KEYS = ("name", "description", "include", "datasets", "models", "attacks", "defenses", "seeds",
                  "targets", "split", "threat", "accuracy", "verdict", "protocol", "gan_verdict", "oracle", "subgrids",
                  "batch_cells")
GRID_SETTINGS = ("gradient", "collaborative", "model")  # attack settings a grid can run
THREAT_KEYS = ("model_state", "train_steps", "labels_known")
MODEL_STATES = ("random-init", "trained")


def builtin_grids() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("leakbench.configs").iterdir()
                  if p.name.endswith(".yaml") and not p.name.startswith("_"))


def _builtin_path(name: str):
    return resources.files("leakbench.configs").joinpath(f"{name}.yaml")


def resolve_grid_path(spec: str | Path) -> Path | Any:
    """A path to a YAML file, or the name of a grid shipped with leakbench (``quick``, ``full``)."""
    path = Path(spec)
    # a folder that happens to share a shipped grid's name (say, a previous run's --out quick) is not
    # a grid file: the name still means the shipped grid
    if path.suffix in (".yaml", ".yml") or (path.exists() and not path.is_dir()):
        if not path.is_file():
            raise ConfigError(f"grid file {str(spec)!r} does not exist")
        return path
    builtin = _builtin_path(str(spec))
    if builtin.is_file():
        return builtin
    import difflib

    names = builtin_grids()
    close = difflib.get_close_matches(str(spec), names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown grid {str(spec)!r}.{hint} Available: {', '.join(names)}, or a path to a .yaml file")


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_grid_yaml(spec: str | Path, _seen: tuple = ()) -> dict:
    path = resolve_grid_path(spec)
    key = str(path)
    if key in _seen:
        raise ConfigError(f"grid include cycle: {' -> '.join(_seen + (key,))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"grid {key}:{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"grid {key}: the top level must be a mapping of keys ({', '.join(TOP_LEVEL_KEYS)})")
    includes = raw.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        if not isinstance(inc, str):
            raise ConfigError(f"grid {key}: include entries must be file paths or grid names, got {inc!r}")
        local = Path(str(path)).parent / inc  # relative to the including file, else a packaged grid name
        target = local if local.is_file() else inc
        merged = _deep_merge(merged, read_grid_yaml(target, _seen + (key,)))
    return _deep_merge(merged, raw)


@dataclass(frozen=True)
class ComponentSpec:
    """A registry name with concrete parameters."""

    name: str
    params: dict = field(default_factory=dict)
    protocol: dict | None = None  # datasets only: overrides of the grid's agreed protocol

    def as_dict(self) -> dict:
        out = {"name": self.name, "params": dict(self.params)}
        if self.protocol:
            out["protocol"] = dict(self.protocol)
        return out


@dataclass(frozen=True)
class Cell:
    """One attack against one defense setting on one dataset, model and seed."""

    attack: ComponentSpec
    defense: ComponentSpec
    dataset: ComponentSpec
    model: ComponentSpec
    seed: int
    grid: "Grid" = field(compare=False, repr=False)  # the grid (or subgrid) whose settings apply

    def config(self, grid: "Grid | None" = None) -> dict:
        """Everything that determines this cell's result (its identity for resuming)."""
        grid = grid or self.grid
        setting = ATTACKS.get(self.attack.name).setting
        if setting == "collaborative":
            return {"attack": self.attack.as_dict(), "defense": self.defense.as_dict(),
                    "dataset": self.dataset.as_dict(), "model": self.model.as_dict(), "seed": self.seed,
                    "protocol": self.protocol(), "gan_verdict": vars(grid.gan_verdict),
                    "accuracy": grid.accuracy.as_dict(), **_oracle_key(grid)}
        if setting == "model":  # the attacked model is the accuracy run's
            return {"attack": self.attack.as_dict(), "defense": self.defense.as_dict(),
                    "dataset": self.dataset.as_dict(), "model": self.model.as_dict(), "seed": self.seed,
                    "gan_verdict": vars(grid.gan_verdict), "accuracy": grid.accuracy.as_dict(),
                    **_oracle_key(grid)}
        return {
            "attack": self.attack.as_dict(), "defense": self.defense.as_dict(),
            "dataset": self.dataset.as_dict(), "model": self.model.as_dict(), "seed": self.seed,
            "targets": grid.targets, "split": grid.split, "threat": dict(grid.threat),
            "accuracy": grid.accuracy.as_dict(), "verdict": vars(grid.verdict),
            # batching changes a float32 trajectory's rounding, so a cell run alone is another result
            **({} if grid.batch_cells else {"batch_cells": False}),
        }

    def protocol(self) -> dict:
        """The agreed protocol for this cell: the grid's, with its dataset's overrides."""
        return {**self.grid.protocol, **(self.dataset.protocol or {})}

    def key(self, grid: "Grid | None" = None) -> str:
        return config_hash(self.config(grid))


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Grid:
    name: str
    description: str
    datasets: list[ComponentSpec]
    models: list[ComponentSpec]
    attacks: list[ComponentSpec]
    defenses: list[ComponentSpec]
    seeds: list[int]
    targets: int
    split: str
    threat: dict
    accuracy: TrainingConfig
    verdict: RecognisabilityRule
    protocol: dict = field(default_factory=dict)      # the agreed protocol of collaborative attack cells
    gan_verdict: Any = None                           # LeakRule of collaborative attack cells
    oracle: dict = field(default_factory=dict)        # train_oracle settings that differ from its defaults
    source: str = ""
    # gradient cells that differ only in their defense setting run as one engine program (Runner.program_key)
    batch_cells: bool = True

    subgrids: list["Grid"] = field(default_factory=list)

    def all_grids(self) -> list["Grid"]:
        """This grid and its subgrids, depth first."""
        return [self] + [g for sub in self.subgrids for g in sub.all_grids()]

    def cells(self) -> list[Cell]:
        """This grid's product of cells, then each subgrid's (with the subgrid's own settings)."""
        own = [Cell(a, d, ds, m, s, self) for ds, m, s, d, a in
               itertools.product(self.datasets, self.models, self.seeds, self.defenses, self.attacks)]
        return own + [c for sub in self.subgrids for c in sub.cells()]


def _component_list(raw: Any, key: str, registry, *, sweeps: bool) -> list[ComponentSpec]:
    if raw is None:
        raise ConfigError(f"grid: missing key {key!r} (a list of {registry.kind} entries)")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"grid: {key!r} must be a non-empty list of {registry.kind} entries")
    out: list[ComponentSpec] = []
    for i, entry in enumerate(raw):
        where = f"{key}[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"grid: {where} must be a name or a mapping with 'name'")
        allowed = {"name", "params"} | ({"sweep"} if sweeps else set()) | ({"protocol"} if key == "datasets" else set())
        extra = sorted(set(entry) - allowed)
        if extra:
            raise ConfigError(f"grid: {where}: unknown key {extra[0]!r}; allowed: {', '.join(sorted(allowed))}")
        cls = registry.get(entry["name"])
        params = entry.get("params") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"grid: {where}.params must be a mapping of parameter: value")
        sweep = entry.get("sweep") or {}
        if not isinstance(sweep, dict) or not all(isinstance(v, list) and v for v in sweep.values()):
            raise ConfigError(f"grid: {where}.sweep must map parameter names to non-empty lists of values")
        names = list(sweep)
        for combo in itertools.product(*(sweep[n] for n in names)) if names else [()]:
            given = {**params, **dict(zip(names, combo))}
            checked = cls.validate_params(given)  # ConfigError names the component and parameter
            protocol = entry.get("protocol")
            if protocol is not None and not isinstance(protocol, dict):
                raise ConfigError(f"grid: {where}.protocol must be a mapping of protocol fields")
            out.append(ComponentSpec(entry["name"], dict(checked), protocol=protocol or None))
    return out


def _runnable_attacks(specs: list[ComponentSpec]) -> list[ComponentSpec]:
    """Grids run gradient attacks (one shared update), collaborative ones (rounds of the protocol) and
    attacks on the finished model (model inversion, on the model the accuracy run trained)."""
    runnable = [n for n in ATTACKS.list() if ATTACKS.get(n).setting in GRID_SETTINGS]
    for spec in specs:
        setting = ATTACKS.get(spec.name).setting
        if setting not in GRID_SETTINGS:
            raise ConfigError(f"grid: attack {spec.name!r} runs in the {setting!r} setting, which grids do not "
                              f"run yet; allowed here: {', '.join(runnable)}")
    return specs


def _protocol(raw: Any) -> dict:
    """The agreed protocol (``leakbench.collab.ProtocolConfig`` fields), checked by building it."""
    from .collab import ProtocolConfig

    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("grid: protocol must be a mapping of ProtocolConfig fields")
    extra = sorted(set(raw) - _protocol_fields())
    if extra:
        raise ConfigError(f"grid: protocol: unknown key {extra[0]!r}; allowed: {', '.join(sorted(_protocol_fields()))}")
    if "participant_labels" in raw:
        labels = raw["participant_labels"]
        if not isinstance(labels, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in labels):
            raise ConfigError(f"grid: protocol.participant_labels = {labels!r} is invalid; allowed: a list of "
                              f"label lists, one per participant")
        raw = {**raw, "participant_labels": tuple(tuple(p) for p in labels)}
    ProtocolConfig(**{**raw, "model": None})  # its own checks raise one-line ConfigErrors
    return raw


def _protocol_fields() -> set[str]:
    from dataclasses import fields as dc_fields

    from .collab import ProtocolConfig

    return {f.name for f in dc_fields(ProtocolConfig)} - {"model", "model_params"}


def _names(raw: Any, key: str) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
        raise ConfigError(f"grid: {key} must be a list of grid names or YAML paths")
    return raw


def _relative(source: str, name: str) -> str | Path:
    local = Path(source).parent / name if source else None
    return local if local is not None and local.is_file() else name


def parse_grid(raw: dict, *, source: str = "", _seen: tuple = ()) -> Grid:
    _ensure_builtins()
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], TOP_LEVEL_KEYS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"grid: unknown key {unknown[0]!r}.{hint} Allowed: {', '.join(TOP_LEVEL_KEYS)}")
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           and s >= 0 for s in seeds):
        raise ConfigError(f"grid: seeds = {seeds!r} is invalid; allowed: a list of non-negative integers")
    targets = raw.get("targets", 4)
    if isinstance(targets, bool) or not isinstance(targets, int) or targets < 1:
        raise ConfigError(f"grid: targets = {targets!r} is invalid; allowed: an integer >= 1")
    split = raw.get("split", "test")
    if split not in ("train", "test"):
        raise ConfigError(f"grid: split = {split!r} is invalid; allowed: 'train', 'test'")
    threat = {"model_state": "random-init", "train_steps": 0, "labels_known": False, **(raw.get("threat") or {})}
    extra = sorted(set(threat) - set(THREAT_KEYS))
    if extra:
        raise ConfigError(f"grid: threat: unknown key {extra[0]!r}; allowed: {', '.join(THREAT_KEYS)}")
    if threat["model_state"] not in MODEL_STATES:
        raise ConfigError(f"grid: threat.model_state = {threat['model_state']!r} is invalid; allowed: "
                          f"{', '.join(MODEL_STATES)}")
    steps = threat["train_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"grid: threat.train_steps = {steps!r} is invalid; allowed: an integer >= 0")
    if not isinstance(threat["labels_known"], bool):
        raise ConfigError(f"grid: threat.labels_known = {threat['labels_known']!r} is invalid; allowed: true, false")
    batch_cells = raw.get("batch_cells", True)
    if not isinstance(batch_cells, bool):
        raise ConfigError(f"grid: batch_cells = {batch_cells!r} is invalid; allowed: true, false")
    grid = Grid(
        name=str(raw.get("name") or Path(source).stem or "grid"),
        description=str(raw.get("description", "")),
        datasets=_component_list(raw.get("datasets"), "datasets", DATASETS, sweeps=False),
        models=_component_list(raw.get("models"), "models", MODELS, sweeps=False),
        attacks=_runnable_attacks(_component_list(raw.get("attacks"), "attacks", ATTACKS, sweeps=True)),
        defenses=_component_list(raw.get("defenses"), "defenses", DEFENSES, sweeps=True),
        seeds=list(seeds), targets=targets, split=split, threat=threat,
        accuracy=TrainingConfig.from_config(raw.get("accuracy")),
        verdict=RecognisabilityRule.from_config(raw.get("verdict")),
        protocol=_protocol(raw.get("protocol")),
        gan_verdict=LeakRule.from_config(raw.get("gan_verdict")),
        oracle=check_section("grid: oracle", raw.get("oracle"), ORACLE_PARAMS),
        source=source, batch_cells=batch_cells,
        subgrids=[load_grid(_relative(source, s), _seen=_seen) for s in _names(raw.get("subgrids"), "subgrids")],
    )
    if any(ATTACKS.get(a.name).setting == "collaborative" for a in grid.attacks):
        for ds in grid.datasets:  # every dataset's agreed protocol must be valid
            _protocol({**grid.protocol, **(ds.protocol or {})})
    model_params = grid.accuracy.model_params
    for m in grid.models:  # the accuracy run's model overrides must be valid for every model
        MODELS.get(m.name).validate_params({**m.params, **model_params})
    return grid


def load_grid(spec: str | Path, *, _seen: tuple = ()) -> Grid:
    """Read, merge includes, and validate a grid (and its subgrids); raises a one-line ConfigError."""
    path = str(resolve_grid_path(spec))
    if path in _seen:
        raise ConfigError(f"grid subgrids cycle: {' -> '.join(_seen + (path,))}")
    return parse_grid(read_grid_yaml(spec), source=path, _seen=_seen + (path,))


def _oracle_key(grid: "Grid") -> dict:
    """The oracle's settings belong to a cell's identity only when a grid sets them (so cells of grids
    that use the defaults keep their keys)."""
    return {"oracle": dict(grid.oracle)} if grid.oracle else {}
