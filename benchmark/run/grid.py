"""Grids as data: a YAML file of attacks x defense sweeps x datasets x models x seeds, plus sizes.

A grid may ``include:`` other YAML files (paths relative to the including file; a bare name such as
``defaults`` means a grid shipped with leakbench); the including file's keys win, mappings merge.
``load_grid`` validates everything (names, parameters, sizes) before anything runs.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..catalog import load_all
from ..cells.base import kind_of_attack
from ..collab.config import check_protocol_mapping
from ..errors import ConfigError, did_you_mean
from ..params import check_section
from ..registry import ATTACKS, CELL_KINDS, DATASETS, DEFENSES, MODELS
from ..scoring.class_leak import LeakRule
from ..scoring.oracle import ORACLE_PARAMS
from ..scoring.reconstruction import RecognisabilityRule
from ..seeding import config_hash
from ..threat import THREAT_EXTRAS
from ..training import TrainingConfig
from ..yaml_config import read_with_includes, relative_to

if TYPE_CHECKING:  # pragma: no cover
    from ..cells.base import CellKind  # noqa: F401  (the annotation of Cell.kind)

TOP_LEVEL_KEYS = ("name", "description", "include", "datasets", "models", "attacks", "defenses", "seeds",
                  "targets", "split", "threat", "accuracy", "verdict", "protocol", "gan_verdict", "oracle", "subgrids",
                  "batch_cells")
MODEL_STATES = ("random-init", "trained")
THREAT_KEYS = ("model_state", "train_steps", "labels_known", *(p.name for p in THREAT_EXTRAS))


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
        if path.is_file():
            return path
        # a bare file name of a shipped config (include: _defaults.yaml) from a user's own folder
        shipped = resources.files("leakbench.configs").joinpath(path.name)
        if path.name == str(spec) and shipped.is_file():
            return shipped
        raise ConfigError(f"grid file {str(spec)!r} does not exist")
    builtin = _builtin_path(str(spec))
    if builtin.is_file():
        return builtin
    names = builtin_grids()
    raise ConfigError(f"unknown grid {str(spec)!r}.{did_you_mean(spec, names)} Available: {', '.join(names)}, or a path to a .yaml file")


def read_grid_yaml(spec: str | Path) -> dict:
    """A grid file (or shipped grid name) with its ``include:`` files merged in."""
    return read_with_includes(spec, resolve=resolve_grid_path, what="grid", keys=TOP_LEVEL_KEYS,
                              path_keys=("subgrids",))


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

    @property
    def kind(self) -> "CellKind":
        """The kind of cell that runs this cell's attack (``leakbench.cells``)."""
        return kind_of_attack(self.attack.name)

    def config(self, grid: "Grid | None" = None) -> dict:
        """Everything that determines this cell's result (its identity for resuming), as its kind states it."""
        return self.kind.identity(self, grid or self.grid)

    def protocol(self) -> dict:
        """The agreed protocol for this cell: the grid's, with its dataset's overrides."""
        return {**self.grid.protocol, **(self.dataset.protocol or {})}

    def key(self, grid: "Grid | None" = None) -> str:
        return config_hash(self.config(grid))


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
    """Grids run every attack whose setting is a registered kind of cell (``leakbench.cells``)."""
    runnable = [n for n in ATTACKS.list() if ATTACKS.get(n).setting in CELL_KINDS]
    for spec in specs:
        setting = ATTACKS.get(spec.name).setting
        if setting not in CELL_KINDS:
            raise ConfigError(f"grid: attack {spec.name!r} runs in the {setting!r} setting, which no kind of cell "
                              f"runs; allowed here: {', '.join(runnable)}")
    return specs


def _names(raw: Any, key: str) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
        raise ConfigError(f"grid: {key} must be a list of grid names or YAML paths")
    return raw


def parse_grid(raw: dict, *, source: str = "", _seen: tuple = ()) -> Grid:
    load_all()
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"grid: unknown key {unknown[0]!r}.{did_you_mean(unknown[0], TOP_LEVEL_KEYS)} "
                          f"Allowed: {', '.join(TOP_LEVEL_KEYS)}")
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
    for param in THREAT_EXTRAS:
        if param.name in threat:
            threat[param.name] = param.check(threat[param.name], f"grid: threat.{param.name}")
    if threat.get("local_steps", 1) == 1:
        threat.pop("local_lr", None)  # one step's averaged update is the gradient, whatever the rate
    threat = {k: v for k, v in threat.items()
              if not any(p.name == k and p.default == v for p in THREAT_EXTRAS)}
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
        protocol=check_protocol_mapping(raw.get("protocol"), where="grid: protocol"),
        gan_verdict=LeakRule.from_config(raw.get("gan_verdict")),
        oracle=check_section("grid: oracle", raw.get("oracle"), ORACLE_PARAMS),
        source=source, batch_cells=batch_cells,
        subgrids=[load_grid(relative_to(source, s), _seen=_seen) for s in _names(raw.get("subgrids"), "subgrids")],
    )
    for kind in dict.fromkeys(CELL_KINDS.get(ATTACKS.get(a.name).setting) for a in grid.attacks):
        kind().validate(grid)  # what a kind of cell needs of the grid (e.g. a valid agreed protocol)
    model_params = grid.accuracy.model_params
    for m in grid.models:  # the accuracy run's model overrides must be valid for every model
        MODELS.get(m.name).validate_params({**m.params, **model_params})
    check_unique_cells(grid)
    return grid


def check_unique_cells(grid: Grid) -> None:
    """Every cell once: a repeated defense, attack, dataset, model, seed or sweep value (or a subgrid
    that repeats a cell) would be computed twice and give one table row two records."""
    seen: dict[str, Cell] = {}
    for cell in grid.cells():
        key = cell.key()
        if key in seen:
            raise ConfigError(f"grid: the cell {cell.attack.name} vs {cell.defense.name} {cell.defense.params or ''} "
                              f"on {cell.dataset.name}/{cell.model.name}, seed {cell.seed}, comes twice (a repeated "
                              f"entry or sweep value); allowed: each cell once".replace(" {}", "").replace("  ", " "))
        seen[key] = cell


def load_grid(spec: str | Path, *, _seen: tuple = ()) -> Grid:
    """Read, merge includes, and validate a grid (and its subgrids); raises a one-line ConfigError."""
    path = str(resolve_grid_path(spec))
    if path in _seen:
        raise ConfigError(f"grid subgrids cycle: {' -> '.join(_seen + (path,))}")
    return parse_grid(read_grid_yaml(spec), source=path, _seen=_seen + (path,))
