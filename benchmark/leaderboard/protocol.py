"""The leaderboard protocol: one defense run through a fixed, versioned grid.

A protocol is a grid (``configs/leaderboard-v1.yaml``, ``configs/leaderboard-v1-smoke.yaml``: attacks and
their budgets, adaptive variants, dataset, model, seeds, targets, accuracy training) plus how entries are
judged (``configs/_leaderboard.yaml``: accuracy floor, verify tolerance). The submitted defense replaces
the grid's placeholder defense, in the grid and in its subgrids (model inversion and the GAN attack, which
need their own model and data); every number comes from ``Runner.run_cell``, the same scoring and verdict
rule as any grid, and the baseline accuracy from ``Runner.accuracy`` of ``none``. The entry's accuracy is
the first cell's, the main grid's.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
import yaml

from ..cells.base import record_kind
from ..errors import ConfigError
from ..run.grid import Cell, ComponentSpec, parse_grid, read_grid_yaml, resolve_grid_path
from ..run.runner import Runner, RunOptions
from ..threat import attack_key
from ..yaml_config import deep_merge, relative_to
from .sandbox import DefenseSource, SandboxLimits, submitted_defense

PROTOCOLS_FILE = "_leaderboard"


@dataclass(frozen=True)
class Protocol:
    name: str                      # v3, v3-smoke: the board folder
    version: str
    grid: str                      # the shipped grid that states the runs
    accuracy_floor_fraction: float
    tolerance: dict
    superseded_by: str | None = None   # a newer protocol; this one's entries stay readable, no new ones
    one_training_recipe: bool = False  # every part trains with one optimiser, learning rate and batch size

    def grid_raw(self) -> dict:
        return read_grid_yaml(self.grid)


def protocols() -> dict[str, Protocol]:
    raw = yaml.safe_load(resources.files("leakbench.configs").joinpath(f"{PROTOCOLS_FILE}.yaml").read_text())
    return {name: Protocol(name=name, version=str(spec["version"]), grid=spec["grid"],
                           accuracy_floor_fraction=float(spec["accuracy_floor_fraction"]),
                           tolerance=dict(spec["verify"]["tolerance"]), superseded_by=spec.get("superseded_by"),
                           one_training_recipe=bool(spec.get("one_training_recipe", False)))
            for name, spec in raw.items()}


def current_protocols() -> list[str]:
    """The protocols that take submissions (not superseded), in the file's order."""
    return [name for name, p in protocols().items() if p.superseded_by is None]


def load_protocol(name: str, *, for_submission: bool = False) -> Protocol:
    """A protocol by name; ``for_submission`` refuses a superseded one (its board is kept, closed)."""
    known = protocols()
    if name not in known:
        raise ConfigError(f"unknown protocol {name!r}; allowed: {', '.join(sorted(known))}")
    chosen = known[name]
    if for_submission and chosen.superseded_by:
        raise ConfigError(f"protocol {name!r} is superseded by {chosen.superseded_by!r} and takes no new entries; "
                          f"allowed: {', '.join(current_protocols())}")
    return chosen


# What a training recipe is: the optimiser's settings, which must agree across a protocol's parts (the
# epochs and data caps follow each part's model and data).
RECIPE_KEYS = ("optimizer", "lr", "batch_size", "momentum")


def recipe_of(grid) -> dict:
    recipe = {k: getattr(grid.accuracy, k) for k in RECIPE_KEYS}
    if recipe["optimizer"] != "sgd":
        recipe.pop("momentum")  # SGD only
    return recipe


def check_one_recipe(protocol: Protocol, grid) -> None:
    """A protocol with ``one_training_recipe`` trains every part with the same optimiser settings."""
    if not protocol.one_training_recipe:
        return
    parts = {g.name: recipe_of(g) for g in grid.all_grids()}
    first_name, first = next(iter(parts.items()))
    for name, recipe in parts.items():
        if recipe != first:
            raise ConfigError(f"protocol {protocol.name}: grid {name} trains with {recipe}, grid {first_name} with "
                              f"{first}; allowed: one training recipe ({', '.join(RECIPE_KEYS)}) in every part")


@dataclass
class Measured:
    """What one protocol run measured, before it becomes an entry."""

    records: list[dict]
    baseline_accuracy: float
    params: dict
    label: str
    privacy_claim: dict
    seeds: list[int]
    device: str
    wall_seconds: float
    training: list[dict] = field(default_factory=list)  # per part that trains a model: recipe, accuracy, floor


def run_protocol(source: DefenseSource, params: dict, *, name: str, protocol: Protocol,
                 data_dir: str | None = None, limits: SandboxLimits | None = None, device: str = "cpu",
                 overrides: dict | None = None, first_cell_only: bool = False,
                 progress: Callable[[str], None] | None = None) -> Measured:
    """Run ``protocol``'s cells against the defense. ``overrides`` deep-merge into the protocol's grid
    (tests use a tiny budget); ``first_cell_only`` runs the accuracy run and the first attack cell, in
    the same order as a full run, which is what ``verify`` samples."""
    # one intra-op thread: the protocol's models are tiny (it is also the fastest), and CPU results then
    # do not depend on the machine's core count, which verify relies on
    torch.set_num_threads(1)
    started = time.perf_counter()
    raw = deep_merge(protocol.grid_raw(), overrides or {})
    with submitted_defense(source, params, name=name, limits=limits) as submitted, \
            tempfile.TemporaryDirectory(prefix="leakbench-board-") as tmp:
        defense = {"name": submitted.registry_name, "params": submitted.params}
        grid = protocol_grid(raw, defense, source=str(resolve_grid_path(protocol.grid)))
        check_one_recipe(protocol, grid)
        runner = Runner(grid, RunOptions(out_dir=Path(tmp), data_dir=data_dir, device=device, progress=False))
        runner.preflight()  # a missing dataset or too many targets is bad input: fail before any cell runs
        cells = grid.cells()[:1] if first_cell_only else grid.cells()
        if progress:  # said only once everything checkable was checked, so bad input stays one line
            progress(f"leakbench: {name} ({source.as_entry()}) under protocol {protocol.name}: {len(cells)} cells")
        records = []
        for cell in cells:
            record = runner.run_cell(cell)
            records.append(record)
            if progress:
                progress(progress_line(record))
        training = training_parts(runner, cells, records, protocol)
        baseline = training[0]["baseline"]
        details = records[0]["accuracy_details"]
        claim = submitted.privacy_claim(steps=int(details.get("train_steps") or 0),
                                        sample_rate=float(details.get("train_batch_size") or 1)
                                        / max(1, int(details.get("train_samples") or 1)))
        return Measured(records=records, baseline_accuracy=float(baseline), params=submitted.params,
                        label=submitted.label, privacy_claim=claim, seeds=list(grid.seeds), device=device,
                        wall_seconds=time.perf_counter() - started, training=training)


def training_parts(runner: Runner, cells: list[Cell], records: list[dict], protocol: Protocol) -> list[dict]:
    """Per grid of the protocol that trained a model under the defense (the main grid first): its recipe,
    the accuracy it reached, the same training's accuracy without a defense, and whether it fell below
    the protocol's floor fraction of that (diverged: an entry that wins by not training is flagged)."""
    parts: dict[str, dict] = {}
    for cell, record in zip(cells, records):
        grid = cell.grid
        if grid.name in parts or record.get("accuracy") is None:
            continue
        base = runner.accuracy(Cell(cell.attack, ComponentSpec("none", {}), cell.dataset, cell.model, cell.seed, grid))
        baseline = round(float(base["accuracy"]), 4)
        floor = round(protocol.accuracy_floor_fraction * baseline, 4)
        accuracy = round(float(record["accuracy"]), 4)
        parts[grid.name] = {"part": grid.name, "model": cell.model.name, "dataset": cell.dataset.name,
                            **recipe_of(grid), "epochs": grid.accuracy.epochs, "accuracy": accuracy,
                            "baseline": baseline, "floor": floor, "diverged": accuracy < floor}
    return list(parts.values())


def protocol_grid(raw: dict, defense: dict, *, source: str):
    """The protocol's grid with ``defense`` in place of the placeholder, in the grid and in every subgrid
    (model inversion and the GAN attack need their own model and dataset, so they are subgrids: each
    cell keeps its own grid's settings). ``raw["subgrids"]`` lists grid names or paths relative to
    ``source``, or inline grid mappings (tests' tiny budgets)."""
    raw = dict(raw)
    subgrids = raw.pop("subgrids", None) or []
    if not isinstance(subgrids, list):
        raise ConfigError(f"grid {source}: subgrids must be a list of grid names or mappings")
    grid = parse_grid({**raw, "defenses": [defense]}, source=source)
    for sub in subgrids:
        if isinstance(sub, dict):
            grid.subgrids.append(protocol_grid(sub, defense, source=source))
        elif isinstance(sub, str):
            path = resolve_grid_path(relative_to(source, sub))
            grid.subgrids.append(protocol_grid(read_grid_yaml(path), defense, source=str(path)))
        else:
            raise ConfigError(f"grid {source}: subgrids entry {sub!r} is invalid; allowed: a grid name or mapping")
    return grid


def progress_line(record: dict) -> str:
    """One line per attack cell while a submission runs."""
    m = record["metrics"]
    return (f"  {attack_key(record):<18} leak {m['leak_rate']:.0%}  {record_kind(record).progress(m)}  "
            f"accuracy {record['accuracy']:.1%}  ({record['wall_seconds']:.1f} s)")
