"""Runs a grid: each pending cell (or program of cells, see ``program_key``) goes to its kind of cell
(``leakbench.cells``) with the run's shared context, and every record is appended to ``results.jsonl``
as it finishes. The runner knows no kind of cell by name."""
from __future__ import annotations

import json
import platform
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from .. import cells as _cells  # noqa: F401  (registers the built-in kinds of cell)
from ..cells.base import CellKind
from ..data import resolve_data_dir
from ..errors import ConfigError
from ..registry import DATASETS
from ..storage import atomic_write_text
from ..version import __version__
from .context import RunContext
from .grid import Cell, ComponentSpec, Grid
from .results import ResultsStore, missing_field

if TYPE_CHECKING:  # pragma: no cover  (executors import the runner: their workers build one)
    from .executors import CellExecutor

# targets in one engine program of several cells: four times the engine's default 64 slots, enough for
# full batches and a short tail, while `full` still splits into 54 jobs for a cluster's workers
MAX_PROGRAM_TARGETS = 256


def library_versions() -> dict[str, str]:
    return {"leakbench": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "datasets": version("datasets"), "scikit-learn": version("scikit-learn"),
            "python": platform.python_version()}


def program_key(cell: Cell) -> str | None:
    """Cells with the same key run as one program (one call of their kind's ``run``); None: alone. Which
    cells may share a program is their kind's decision (``CellKind.program_key``)."""
    return cell.kind.program_key(cell)


@dataclass
class RunOptions:
    out_dir: Path
    data_dir: str | None = None
    device: str = "cpu"
    cache_dir: Path | None = None
    progress: bool = True
    disk_cache: bool = True  # False: decoded data stays in memory (validate writes nothing)


class Runner:
    def __init__(self, grid: Grid, options: RunOptions) -> None:
        self.grid = grid
        self.options = options
        self.context = RunContext(out_dir=options.out_dir, cache_dir=self.cache_dir, data_dir=options.data_dir,
                                  device=options.device, disk_cache=options.disk_cache)

    # -- paths -------------------------------------------------------------------------------------
    @property
    def store(self) -> ResultsStore:
        return ResultsStore(self.options.out_dir / "results.jsonl")

    @property
    def cache_dir(self) -> Path:
        return self.options.cache_dir or (self.options.out_dir / "cache")

    # -- shared work (the context's, for callers outside a cell) ---------------------------------
    def dataset(self, spec: ComponentSpec, split: str):
        return self.context.dataset(spec, split)

    def accuracy(self, cell: Cell, *, wait: bool = True) -> dict[str, Any] | None:
        return self.context.accuracy(cell, wait=wait)

    def trained_model(self, cell: Cell):
        return self.context.trained_model(cell)

    def accuracy_cache_path(self, cell: Cell) -> Path:
        return self.context.accuracy_cache_path(cell)

    def claim_folder(self, *, force: bool = False) -> None:
        """The output folder belongs to one grid: resuming (or extending) the grid whose results it holds
        is fine; another grid's results are a one-line ConfigError naming that grid, unless ``force``,
        which removes the old results (tables, records, samples; the cache of shared work stays)."""
        out = self.options.out_dir
        found = self._grid_in(out)
        if found is None:
            return
        names, keys = found
        if names <= {g.name for g in self.grid.all_grids()} and keys <= {c.key() for c in self.grid.cells()}:
            return
        name = ", ".join(sorted(names))
        if not force:
            raise ConfigError(f"--out {str(out)!r} holds the results of grid {name!r} ({len(keys)} cells); allowed: "
                              f"the same grid (to resume it), another --out, or --force to start the folder afresh")
        for stale in ("results.jsonl", "grid.json", "table.md", "table.csv", "table.tex", "summary.csv"):
            (out / stale).unlink(missing_ok=True)
        for figure in [*out.glob("reconstructions_*.png"), *out.glob("reconstructions_*.md"), *out.glob("roc_*.png")]:
            figure.unlink()
        shutil.rmtree(out / "reconstructions", ignore_errors=True)

    def _grid_in(self, out: Path) -> tuple[set[str], set[str]] | None:
        """(grid names, keys of finished cells) of the results in ``out``, or None when it holds none. The
        name is grid.json's; records written before it (or without it) name their own (sub)grids."""
        records = [r for r in self.store.records() if missing_field(r) is None] if self.store.path.exists() else []
        keys = {r["key"] for r in records if isinstance(r.get("key"), str)}
        try:
            names = {str(json.loads((out / "grid.json").read_text())["name"])}
        except (OSError, ValueError, KeyError, TypeError):
            if not records:
                return None
            names = {str(r.get("grid")) for r in records}
        return names, keys

    def preflight(self) -> None:
        """Everything that can be checked before a cell runs: every dataset split the grid reads loads
        (a missing or damaged dataset is bad input), and each kind of cell checks its cells against the
        data (e.g. enough samples for the targets). Raises a one-line ConfigError."""
        cells = self.grid.cells()
        # first, cheaply, every split any cell reads (its targets' split, and the accuracy run's, which
        # every kind of cell joins: train and test, or train alone with a held-out fraction) is in the mirror or can be downloaded: a missing dataset
        # or an unreachable hub is named at once, before any split is decoded
        data_dir = resolve_data_dir(self.context.data_dir)
        for grid in self.grid.all_grids():
            for spec in grid.datasets:
                dataset = DATASETS.build(spec.name, spec.params)
                for split in dict.fromkeys((grid.split, *grid.accuracy.splits())):
                    dataset.check_available(split, data_dir)
        for grid in self.grid.all_grids():
            for dataset in grid.datasets:
                self.context.dataset(dataset, grid.split)
        by_kind: dict[str, list[Cell]] = {}
        for cell in cells:
            by_kind.setdefault(cell.kind.registry_name, []).append(cell)
        for kind_cells in by_kind.values():
            kind_cells[0].kind.preflight(self.context, kind_cells)

    # -- one cell, or one program of cells --------------------------------------------------------
    def run_cell(self, cell: Cell) -> dict[str, Any]:
        """One cell's record, computed on its own (the leaderboard protocol's path)."""
        return self.run_job(Job((cell.key(),), (cell.key(),)), cells={cell.key(): cell})[0]

    def run_job(self, job: "Job", cells: dict[str, Cell] | None = None) -> list[dict[str, Any]]:
        """The records of ``job.pending``. A job of several cells is one program, run by their kind in
        one call; the whole program runs even when only some of it is pending, so that a cell's numbers
        never depend on what a resumed run skips."""
        cells = cells if cells is not None else {c.key(): c for c in self.grid.cells()}
        members = [cells[k] for k in job.cells]
        kind: CellKind = members[0].kind
        records = kind.run(self.context, members)
        out = []
        for cell, record in zip(members, records):
            if cell.key() in job.pending:
                record["versions"] = library_versions()
                record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
                out.append(record)
        return out

    def jobs(self, cells: list[Cell]) -> list["Job"]:
        """``cells`` (the pending ones) as jobs, in the order their first cell comes in ``cells``: each
        program whole (fixed by the grid), the other cells one job each. A group of cells with the
        same :func:`program_key` is cut, in grid order, into programs of at most
        ``MAX_PROGRAM_TARGETS`` targets, so that a cluster still gets enough jobs to spread."""
        groups: dict[str, list[Cell]] = {}
        for cell in self.grid.cells():
            key = program_key(cell)
            if key is not None:
                groups.setdefault(key, []).append(cell)
        program_of: dict[str, tuple[str, ...]] = {}
        for members in groups.values():
            per_program = max(1, MAX_PROGRAM_TARGETS // members[0].grid.targets)
            for start in range(0, len(members), per_program):
                chunk = tuple(c.key() for c in members[start:start + per_program])
                for key in chunk:
                    program_of[key] = chunk
        pending = {c.key() for c in cells}
        jobs, seen = [], set()
        for cell in cells:
            program = program_of.get(cell.key(), (cell.key(),))
            if program not in seen:
                seen.add(program)
                jobs.append(Job(program, tuple(k for k in program if k in pending)))
        return jobs

    # -- the whole grid ----------------------------------------------------------------------------
    def pending(self) -> list[Cell]:
        done = self.store.completed_keys(repair=True)
        return [c for c in self.grid.cells() if c.key() not in done]

    def run(self, executor: "CellExecutor | None" = None) -> list[dict]:
        """Run every pending cell on ``executor`` (default: serially, here, in grid order), appending each
        record as it finishes; returns the new records. Only this process writes results.jsonl."""
        out = self.options.out_dir
        out.mkdir(parents=True, exist_ok=True)
        all_cells = self.grid.cells()
        # the cell order lets the report keep the grid's order whatever order workers finish in
        snapshot = {**grid_snapshot(self.grid), "cell_keys": [c.key() for c in all_cells]}
        atomic_write_text(out / "grid.json", json.dumps(snapshot, indent=2, sort_keys=True))
        cells = self.pending()
        jobs = self.jobs(cells)
        if executor is None:
            by_key = {c.key(): c for c in all_cells}
            finished = (record for job in jobs for record in self.run_job(job, by_key))
        else:
            finished = executor.run(self, jobs)
        bar = tqdm(total=len(all_cells), initial=len(all_cells) - len(cells), unit="cell",
                   desc=f"leakbench {self.grid.name}", disable=not self.options.progress, file=sys.stderr)
        written = []
        for record in finished:
            self.store.append(record)
            written.append(record)
            bar.set_postfix_str(f"{record['attack']} vs {record['defense_label']}")
            bar.update(1)
        bar.close()
        return written


@dataclass(frozen=True)
class Job:
    """What an executor runs as one unit: the keys of cells computed together, and those of them whose
    records are wanted (the pending ones)."""

    cells: tuple[str, ...]
    pending: tuple[str, ...]


def grid_snapshot(grid: Grid) -> dict:
    return {"name": grid.name, "description": grid.description, "source": grid.source,
            "datasets": [d.as_dict() for d in grid.datasets], "models": [m.as_dict() for m in grid.models],
            "attacks": [a.as_dict() for a in grid.attacks], "defenses": [d.as_dict() for d in grid.defenses],
            "seeds": grid.seeds, "targets": grid.targets, "split": grid.split, "threat": grid.threat,
            "accuracy": grid.accuracy.as_dict(), "verdict": vars(grid.verdict), "protocol": dict(grid.protocol), "oracle": dict(grid.oracle), "batch_cells": grid.batch_cells,
            "subgrids": [grid_snapshot(g) for g in grid.subgrids]}
