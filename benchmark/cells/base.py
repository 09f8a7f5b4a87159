"""Kinds of grid cell as plugins.

A *cell* is one attack against one defense setting on one dataset, model and seed. How a cell runs depends
on the attack's setting: one shared update (``gradient``), rounds of the collaborative protocol
(``collaborative``), the finished model (``model``), ... Each setting is a :class:`CellKind` registered
under its name (``@register_cell_kind("gradient")``); an attack names its kind in ``Attack.setting``.

A kind states everything the rest of leakbench needs to know about it, so that no module tests a
setting by name:

* what identifies a cell (:meth:`CellKind.identity`, the key for resuming and caching), what the grid
  must satisfy (:meth:`CellKind.validate`), and which cells may run together as one program
  (:meth:`CellKind.program_key`);
* how its cells run (:meth:`CellKind.run_one`, or :meth:`CellKind.run` for programs of cells), given
  only a :class:`CellContext`: the narrow view of the runner's shared work (data, models, accuracy runs,
  caches, artefacts);
* how its records read: the threat model they measure, the table columns, the scores a leaderboard
  keeps, and one progress line.

Every record carries what tables, reports and boards read: the fields of :func:`cell_identity` and
:func:`accuracy_fields`, ``targets`` (how many targets or samples were scored), ``threat`` with its
``setting`` (the kind's name), ``metrics`` with ``leak_rate`` (and the metrics its columns show), and
``verdict`` with ``defended``, ``rule`` and ``max_leak_rate``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..registry import ATTACKS, CELL_KINDS

if TYPE_CHECKING:  # pragma: no cover  (types only: the grid imports this module, not the reverse)
    from ..data import ImageData
    from ..run.grid import Cell, ComponentSpec, Grid

# What a kind's records measure, so that boards and tables never mix harms: a private record
# reconstructed from what its owner shared, a representative of a class the attacker was not given, or
# the fact that a record was in the training set.
RECORD_RECONSTRUCTION = "record reconstruction"
CLASS_REPRESENTATIVES = "class representatives"
MEMBERSHIP = "membership"


@dataclass(frozen=True)
class TableColumn:
    """A per-attack column of the accuracy-vs-defendability table: ``"<attack> <label>"`` shows the
    record metric ``metric`` (a key of ``record["metrics"]``) pooled over seeds by ``pool`` (a pandas
    aggregation: "mean", "median", ...), formatted as ``style`` ("percent" or "decibel")."""

    label: str
    metric: str
    pool: str = "mean"
    style: str = "percent"


@dataclass(frozen=True)
class MembershipSplits:
    """What membership inference on an accuracy run's model draws from: the records it trained on, held-out
    records it never saw, and a population split disjoint from both (twice the training records, or empty
    when the training split is too small) on whose random halves reference models train."""

    trained_on: "ImageData"
    held_out: "ImageData"
    population: "ImageData"


class CellContext(ABC):
    """What a cell may use of the run it is part of; the runner provides it. Everything here is shared
    by the cells of a run (and, through the caches on disk, by its workers and resumed runs)."""

    #: where tensors of attacks live ("cpu", "cuda:0")
    device: str
    #: the on-disk cache shared by workers (accuracy runs, oracles, pretrained weights, decoded data)
    cache_dir: Path
    #: in-memory memo shared by the cells one worker runs (oracles, calibrations)
    memo: dict

    @property
    @abstractmethod
    def data_key(self) -> bool:
        """Part of every cache key built on data: whether data came from a local mirror (else the
        embedded default or the hub), so that entries from different sources never mix."""

    @abstractmethod
    def dataset(self, spec: "ComponentSpec", split: str) -> "ImageData":
        """A split of a dataset setting, decoded once per worker."""

    @abstractmethod
    def make_model(self, cell: "Cell", data: "ImageData", seed: int, **overrides) -> torch.nn.Module:
        """A fresh model of the cell's architecture for ``data``'s shape, on :attr:`device`."""

    @abstractmethod
    def accuracy(self, cell: "Cell", *, wait: bool = True) -> dict[str, Any] | None:
        """The accuracy run of the cell's defense setting (cached; ``wait=False``: None while another
        worker computes it)."""

    @abstractmethod
    def trained_model(self, cell: "Cell") -> tuple[dict[str, Any], torch.nn.Module]:
        """(the accuracy run's result, the model it trained under the cell's defense)."""

    @abstractmethod
    def membership_splits(self, cell: "Cell") -> MembershipSplits:
        """The records the cell's accuracy run trained on, its held-out records and a population split."""

    @abstractmethod
    def reference_models(self, cell: "Cell", count: int) -> tuple[list[torch.nn.Module], list[dict[str, Any]]]:
        """(``count`` reference models trained without a defense on random halves of the population split,
        their training results), cached and shared like accuracy runs."""

    @abstractmethod
    def save_samples(self, key: str, originals: torch.Tensor, produced: torch.Tensor) -> None:
        """Keep what a cell's attack produced beside what it is compared with (images on [0, 1], or
        token ids), for the report's figures."""


class CellKind(ABC):
    """How grids run the cells of one attack setting. Subclasses are registered with
    ``@register_cell_kind(name)`` and hold no state: one instance serves every cell of its kind."""

    registry_name: ClassVar[str] = ""
    #: the harm its records measure (RECORD_RECONSTRUCTION, CLASS_REPRESENTATIVES, ...)
    threat_model: ClassVar[str] = RECORD_RECONSTRUCTION
    #: its cells take long (minutes): a process pool starts them first so that the run does not end
    #: on one long cell
    long_running: ClassVar[bool] = False
    #: per-attack table columns beside the leak rate and the verdict
    columns: ClassVar[tuple[TableColumn, ...]] = ()
    #: (metric, digits) a leaderboard entry keeps of each record, beside the leak rate
    board_scores: ClassVar[tuple[tuple[str, int], ...]] = ()

    @abstractmethod
    def identity(self, cell: "Cell", grid: "Grid") -> dict[str, Any]:
        """Everything that determines the cell's result (hashed into its key) under ``grid``'s settings."""

    def validate(self, grid: "Grid") -> None:
        """Checks of the grid that only this kind needs (raise ConfigError); the default has none."""

    def preflight(self, context: CellContext, cells: list["Cell"]) -> None:
        """Checks of this kind's cells against the data (sizes, labels, ...) before any cell runs; raise a
        one-line ConfigError naming the grid key and what is allowed. The default has none."""

    def program_key(self, cell: "Cell") -> str | None:
        """Cells with the same key run together as one program (one :meth:`run` call); None: alone."""
        return None

    def run(self, context: CellContext, cells: list["Cell"]) -> list[dict[str, Any]]:
        """The records of ``cells`` (one, or one program's), in order. By default each cell runs on its
        own (:meth:`run_one`); a kind whose cells share a program overrides this."""
        return [self.run_one(context, cell) for cell in cells]

    def run_one(self, context: CellContext, cell: "Cell") -> dict[str, Any]:
        """One cell's record (see the module's docstring for the fields every record carries)."""
        raise NotImplementedError(f"{type(self).__name__} runs no cell: implement run_one or run")

    def progress(self, metrics: dict[str, Any]) -> str:
        """A few scores of a record for a progress line."""
        return ""


def kind_of_attack(name: str) -> CellKind:
    """The kind of cell that runs attack ``name`` (its ``setting``); a one-line error for an unregistered
    attack or setting."""
    return CELL_KINDS.get(ATTACKS.get(name).setting)()


def record_kind(record: dict[str, Any]) -> CellKind:
    """The kind of cell that wrote ``record`` (its ``threat.setting``)."""
    return CELL_KINDS.get(record["threat"]["setting"])()


def accuracy_fields(accuracy: dict[str, Any]) -> dict[str, Any]:
    """The accuracy columns every kind of record carries, from a (cached) accuracy run's result."""
    return {"accuracy": accuracy.get("accuracy"),
            "accuracy_details": {k: v for k, v in accuracy.items() if k != "accuracy"},
            "privacy": accuracy.get("privacy") or {}}


def cell_identity(cell: "Cell", defense) -> dict[str, Any]:
    """The fields that say which cell a record is, shared by every kind of cell."""
    return {
        "key": cell.key(), "grid": cell.grid.name,
        "attack": cell.attack.name, "attack_params": cell.attack.params,
        "defense": cell.defense.name, "defense_params": cell.defense.params,
        "defense_label": defense.label(), "defense_family": defense.family,
        "dataset": cell.dataset.name, "dataset_params": cell.dataset.params,
        "model": cell.model.name, "model_params": cell.model.params,
        "seed": cell.seed,
    }
