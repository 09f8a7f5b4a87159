"""Runs a grid: every cell attacks ``targets`` private batches under one defense setting, scores the
reconstructions, joins the (cached) accuracy of training under that defense, and appends one record."""
from __future__ import annotations

import io
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .data import ImageData, resolve_data_dir
from .grid import Cell, ComponentSpec, Grid, config_hash
from .metrics import match_reconstructions, score_reconstruction
from .models import output_width
from .registry import ATTACKS, DATASETS, DEFENSES, MODELS
from .results import ResultsStore, atomic_write_bytes, atomic_write_text, atomic_write_torch, computed_once
from .threat import AttackTask

if TYPE_CHECKING:  # pragma: no cover
    from .executors import CellExecutor

CONVERGED_MSE = 1e-3  # a batch counts as recovered once every matched sample is below this MSE
# targets in one engine program of several cells: four times the engine's default 64 slots, enough for
# full batches and a short tail, while `full` still splits into 54 jobs for a cluster's workers
MAX_PROGRAM_TARGETS = 256


def library_versions() -> dict[str, str]:
    import datasets
    import sklearn

    return {"leakbench": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "datasets": datasets.__version__, "scikit-learn": sklearn.__version__,
            "python": platform.python_version()}


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any JSON-able parts (the same everywhere, unlike ``hash``)."""
    return int(config_hash(list(parts))[:8], 16) & 0x7FFFFFFF


def accuracy_fields(accuracy: dict[str, Any]) -> dict[str, Any]:
    """The accuracy columns every kind of record carries, from a (cached) accuracy run's result."""
    return {"accuracy": accuracy.get("accuracy"),
            "accuracy_details": {k: v for k, v in accuracy.items() if k != "accuracy"},
            "privacy": accuracy.get("privacy") or {}}


def cell_identity(cell: Cell, defense) -> dict[str, Any]:
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


@dataclass
class RunOptions:
    out_dir: Path
    data_dir: str | None = None
    device: str = "cpu"
    cache_dir: Path | None = None
    progress: bool = True


@dataclass
class Runner:
    grid: Grid
    options: RunOptions
    _data: dict[str, ImageData] = field(default_factory=dict)
    shared: dict = field(default_factory=dict)  # expensive work shared by cells (e.g. oracles)

    # -- paths -------------------------------------------------------------------------------------
    @property
    def store(self) -> ResultsStore:
        return ResultsStore(self.options.out_dir / "results.jsonl")

    @property
    def cache_dir(self) -> Path:
        return self.options.cache_dir or (self.options.out_dir / "cache")

    # -- shared work -------------------------------------------------------------------------------
    def dataset(self, spec: ComponentSpec, split: str) -> ImageData:
        key = json.dumps([spec.name, spec.params, split], sort_keys=True)
        if key not in self._data:
            self._data[key] = self._decoded(spec, split)
        return self._data[key]

    def _decoded(self, spec: ComponentSpec, split: str) -> ImageData:
        """A split read from the data dir's parquet mirror: decoding its PNGs takes seconds and every
        worker (and every resumed run) needs it, so the decoded tensors are cached on disk, keyed by the
        dataset setting and the mirror files' size and modification time (a changed file is decoded
        again). Embedded data is cheap, and hub downloads are cached by HF ``datasets`` itself."""
        dataset = DATASETS.build(spec.name, spec.params)
        data_dir = resolve_data_dir(self.options.data_dir)
        mirror = data_dir / dataset.registry_name if data_dir is not None else None
        if mirror is None or not mirror.is_dir():
            return dataset.load(split, data_dir=self.options.data_dir)  # its errors name what is missing
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in mirror.glob("*.parquet"))
        key_obj = {"dataset": spec.as_dict(), "split": split, "mirror": str(mirror.resolve()), "files": files}

        def from_bytes(pixels: torch.Tensor, scale: str) -> torch.Tensor:  # the loader's own arithmetic
            unit = pixels.float() / 255.0
            return unit * 2 - 1 if scale == "[-1,1]" else unit

        def compute() -> dict[str, Any]:
            data = dataset.load(split, data_dir=self.options.data_dir)
            images = data.images
            as_bytes = (data.to_unit(images) * 255).round().to(torch.uint8)
            if torch.equal(from_bytes(as_bytes, data.scale), images):
                images = as_bytes  # 4x smaller, and exact
            return {"name": data.name, "images": images, "labels": data.labels,
                    "num_classes": data.num_classes, "scale": data.scale}

        entry = computed_once(self.cache_dir / "data" / f"{config_hash(key_obj)}.pt", compute,
                              read=lambda p: torch.load(p, weights_only=True), write=atomic_write_torch)
        images = entry["images"]
        if images.dtype == torch.uint8:
            images = from_bytes(images, entry["scale"])
        return ImageData(entry["name"], images, entry["labels"], entry["num_classes"], entry["scale"])

    def make_model(self, cell: Cell, data: ImageData, seed: int, **overrides) -> torch.nn.Module:
        spec = MODELS.build(cell.model.name, {**cell.model.params, **overrides})
        model = spec.create(data.shape, data.num_classes, generator=torch.Generator().manual_seed(seed))
        return model.to(self.options.device)

    def accuracy(self, cell: Cell, *, wait: bool = True) -> dict[str, Any] | None:
        """Accuracy of training under this defense setting, cached on disk per (defense, dataset, model,
        seed, training config): it does not depend on the attack, and parallel workers compute each
        setting once (the others wait for it; with ``wait=False`` they get None instead)."""
        path = self.accuracy_cache_path(cell)
        return computed_once(path, lambda: self._train_for_accuracy(cell),
                             read=lambda p: json.loads(p.read_text()),
                             write=lambda p, result: atomic_write_text(p, json.dumps(result, sort_keys=True)),
                             wait=wait)

    def _train_for_accuracy(self, cell: Cell, model: torch.nn.Module | None = None) -> dict[str, Any]:
        """``model``: a fresh model from :meth:`accuracy_model` to train (and leave trained); default a new one."""
        train = self.dataset(cell.dataset, "train")
        test = self.dataset(cell.dataset, "test")
        defense = DEFENSES.build(cell.defense.name, cell.defense.params)
        seed = derive_seed("accuracy", cell.seed)
        model = model if model is not None else self.accuracy_model(cell)
        torch.manual_seed(seed)
        return defense.accuracy_run(model=model, train=train, test=test, config=cell.grid.accuracy, seed=seed)

    def accuracy_model(self, cell: Cell) -> torch.nn.Module:
        """The untrained model of the accuracy run."""
        train = self.dataset(cell.dataset, "train")
        return self.make_model(cell, train, derive_seed("accuracy", cell.seed), **cell.grid.accuracy.model_params)

    def trained_model(self, cell: Cell) -> tuple[dict[str, Any], torch.nn.Module]:
        """(the accuracy result, the model that run trained under the cell's defense), for attacks on the
        finished model. The weights are cached beside the accuracy entry (same key, ``.pt``); computing
        them also fills the accuracy entry, so other cells of the setting do not train again."""
        from .model_cells import trained_model_entry

        return trained_model_entry(self, cell, self.accuracy_cache_path(cell))

    def accuracy_cache_path(self, cell: Cell) -> Path:
        key_obj = {"defense": cell.defense.as_dict(), "dataset": cell.dataset.as_dict(),
                   "model": cell.model.as_dict(), "seed": cell.seed, "accuracy": cell.grid.accuracy.as_dict(),
                   "data_dir": bool(self.options.data_dir)}
        return self.cache_dir / "accuracy" / f"{config_hash(key_obj)}.json"

    # -- one cell, or one program of cells --------------------------------------------------------
    def run_cell(self, cell: Cell) -> dict[str, Any]:
        """One cell's record, computed on its own (the leaderboard protocol's path)."""
        return self.run_job(Job((cell.key(),), (cell.key(),)), cells={cell.key(): cell})[0]

    def run_job(self, job: "Job", cells: dict[str, Cell] | None = None) -> list[dict[str, Any]]:
        """The records of ``job.pending``. A job of several cells is one program: their gradient
        attacks run as one engine call (see :meth:`program_key`); the whole group runs even when only
        some of it is pending, so that a cell's numbers never depend on what a resumed run skips."""
        cells = cells if cells is not None else {c.key(): c for c in self.grid.cells()}
        members = [cells[k] for k in job.cells]
        if len(members) > 1:
            records = self.run_gradient_cells(members)
        else:
            records = [self._run_single(members[0])]
        out = []
        for cell, record in zip(members, records):
            if cell.key() in job.pending:
                record["versions"] = library_versions()
                record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
                out.append(record)
        return out

    def _run_single(self, cell: Cell) -> dict[str, Any]:
        attack = ATTACKS.build(cell.attack.name, cell.attack.params)
        defense = DEFENSES.build(cell.defense.name, cell.defense.params)
        if attack.setting == "collaborative":
            from .collab_cells import run_collaborative_cell

            return run_collaborative_cell(self, cell, attack, defense)
        if attack.setting == "model":
            from .model_cells import run_model_cell

            return run_model_cell(self, cell, attack, defense)
        return self.run_gradient_cells([cell])[0]

    @staticmethod
    def program_key(cell: Cell) -> str | None:
        """Cells with the same key run as one program: gradient cells of a grid that batches cells
        (``batch_cells``, on by default) whose attack solves many tasks in one engine program, and that
        differ only in their defense setting. Their targets attack one architecture and, at a random
        init, the same weights (a target's model depends on the seed and the target, not on the
        defense; pretrained weights differ per defense and are batched as per-instance weights), so the
        engine batches them as the speed issue asks ("defense settings that share a model"). None: the
        cell runs on its own."""
        if not cell.grid.batch_cells or ATTACKS.get(cell.attack.name).setting != "gradient":
            return None
        if not ATTACKS.build(cell.attack.name, cell.attack.params).batches_tasks:
            return None
        return config_hash({**cell.config(), "defense": None, "grid": cell.grid.name})

    def jobs(self, cells: list[Cell]) -> list["Job"]:
        """``cells`` (the pending ones) as jobs, in the order their first cell comes in ``cells``: each
        program whole (fixed by the grid), the other cells one job each. A group of cells with the
        same :meth:`program_key` is cut, in grid order, into programs of at most
        ``MAX_PROGRAM_TARGETS`` targets, so that a cluster still gets enough jobs to spread."""
        groups: dict[str, list[Cell]] = {}
        for cell in self.grid.cells():
            key = self.program_key(cell)
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

    def run_gradient_cells(self, cells: list[Cell]) -> list[dict[str, Any]]:
        """Records of gradient cells that share an attack (one engine call for all their targets)."""
        attack = ATTACKS.build(cells[0].attack.name, cells[0].attack.params)
        setups = [self._gradient_setup(cell, attack) for cell in cells]
        started = time.perf_counter()
        reconstructions = attack.run([t for s in setups for t in s.tasks],
                                     monitors=[m for s in setups for m in s.monitors])
        attack_seconds = time.perf_counter() - started
        accuracies = self._fill_accuracies(cells)
        records, offset = [], 0
        total_evals = sum(r.closure_evals for r in reconstructions) or 1
        for setup in setups:
            recs = reconstructions[offset:offset + len(setup.tasks)]
            offset += len(setup.tasks)
            # the program's time, shared by the cells in proportion to their objective evaluations
            share = attack_seconds * sum(r.closure_evals for r in recs) / total_evals
            accuracy, waited = accuracies[setup.cell.key()]
            records.append(self._gradient_record(setup, recs, share + waited, accuracy=accuracy,
                                                 program_cells=len(cells)))
        return records

    def _fill_accuracies(self, cells: list[Cell]) -> dict[str, tuple[dict[str, Any], float]]:
        """Compute the cells' accuracy entries, first those no other worker is computing: two workers
        that need the same settings then work on different ones instead of queueing behind each other.
        Returns each cell's entry and the seconds it waited for it (part of its wall time, as for a
        lone cell)."""
        out: dict[str, tuple[dict[str, Any], float]] = {}
        waiting = []
        for cell in cells:
            started = time.perf_counter()
            entry = self.accuracy(cell, wait=False)
            out[cell.key()] = (entry, time.perf_counter() - started)
            if entry is None:
                waiting.append(cell)
        for cell in waiting:
            started = time.perf_counter()
            entry = self.accuracy(cell)
            out[cell.key()] = (entry, out[cell.key()][1] + time.perf_counter() - started)
        return out

    def _gradient_setup(self, cell: Cell, attack) -> "_GradientSetup":
        started = time.perf_counter()
        grid = cell.grid
        defense = DEFENSES.build(cell.defense.name, cell.defense.params)
        data = self.dataset(cell.dataset, grid.split)
        batch = defense.victim_batch_size(attack.victim_batch_size())
        need = grid.targets * batch
        if need > len(data):
            raise ValueError(f"{cell.dataset.name}/{grid.split} has {len(data)} samples, the cell needs {need}")
        # the same private batches for every defense and attack of a (dataset, seed, batch size)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(derive_seed("targets", cell.seed)))
        device = self.options.device
        setup = _GradientSetup(cell, defense, data, batch)
        for t in range(grid.targets):
            idx = order[t * batch:(t + 1) * batch]
            x, y = data.images[idx].to(device), data.labels[idx].to(device)
            model = self.make_model(cell, data, derive_seed("model", cell.seed, t))
            if grid.threat["model_state"] == "trained" and grid.threat["train_steps"] > 0:
                self._pretrain(model, defense, cell, grid.threat["train_steps"], t)
            g = torch.Generator().manual_seed(derive_seed("defense", cell.seed, t, cell.defense.as_dict()))
            classes = output_width(model, data.shape)  # the attacker knows the model, so its output width
            shared = defense.share(model, x, F.one_hot(y, classes).float(), generator=g)
            setup.tasks.append(AttackTask(model=model, shared=shared, input_shape=data.shape,
                                          num_classes=classes, batch_size=batch, scale=data.scale,
                                          labels=y.clone() if grid.threat["labels_known"] else None,
                                          defense_params=defense.get_params(),
                                          defense_name=defense.registry_name,
                                          seed=derive_seed("attack", cell.seed, t)))
            setup.truths.append((x, y))
            setup.converge_steps.append(None)
            setup.monitors.append(self._convergence_monitor(data, x, setup.converge_steps, t))
        setup.seconds = time.perf_counter() - started
        return setup

    def _gradient_record(self, setup: "_GradientSetup", reconstructions, attack_seconds: float, *,
                         accuracy: dict[str, Any], program_cells: int) -> dict[str, Any]:
        started = time.perf_counter()
        cell, defense, data, batch = setup.cell, setup.defense, setup.data, setup.batch
        grid = cell.grid
        per_sample: dict[str, list] = {k: [] for k in ("mse", "psnr", "ssim", "label_correct")}
        per_target: dict[str, list] = {k: [] for k in ("closure_evals", "steps", "grad_distance", "diverged",
                                                       "steps_to_converge", "label_method")}
        originals, recons = [], []
        for (x, y), rec, conv in zip(setup.truths, reconstructions, setup.converge_steps):
            recon_unit = data.to_unit(rec.images.detach().cpu()).clamp(0, 1)
            orig_unit = data.to_unit(x.cpu())
            scores = score_reconstruction(recon_unit, orig_unit,
                                          None if rec.labels is None else rec.labels.cpu(), y.cpu())
            for k in per_sample:
                per_sample[k].extend(scores.get(k, []))
            per_target["closure_evals"].append(rec.closure_evals)
            per_target["steps"].append(rec.steps)
            per_target["grad_distance"].append(rec.grad_distance)
            per_target["diverged"].append(rec.diverged)
            per_target["steps_to_converge"].append(conv)
            per_target["label_method"].append(rec.label_method)
            perm = match_reconstructions(recon_unit, orig_unit)
            originals.append(orig_unit)
            recons.append(recon_unit[perm])

        rule = grid.verdict
        leak_flags = rule.recognisable(per_sample[rule.metric])
        leak_rate = sum(leak_flags) / len(leak_flags)
        key = cell.key()
        self.save_images(key, torch.cat(originals), torch.cat(recons))
        record = {
            **cell_identity(cell, defense),
            "targets": grid.targets,
            "threat": {**grid.threat, "setting": "gradient", "batch_size": batch, "shared": "gradient",
                       "weights": "shared",
                       "labels_given_to_attacker": grid.threat["labels_known"]},
            "metrics": {
                "leak_rate": leak_rate,
                "mse_median": statistics.median(per_sample["mse"]),
                "psnr_median": statistics.median(per_sample["psnr"]),
                "ssim_median": statistics.median(per_sample["ssim"]),
                "label_accuracy": (statistics.mean(per_sample["label_correct"])
                                   if per_sample["label_correct"] else None),
                "recovered_rate": sum(m < CONVERGED_MSE for m in per_sample["mse"]) / len(per_sample["mse"]),
                "closure_evals_mean": statistics.mean(per_target["closure_evals"]),
                "diverged": sum(per_target["diverged"]),
            },
            "per_sample": {**per_sample, "recognisable": leak_flags},
            "per_target": per_target,
            **accuracy_fields(accuracy),
            "verdict": {"defended": rule.defended(leak_rate), "rule": rule.describe(),
                        "metric": rule.metric, "threshold": rule.threshold, "max_leak_rate": rule.max_leak_rate},
            "device": self.options.device,
            # this cell's setup, accuracy entry and scoring, plus its share of the program's attack time
            "wall_seconds": round(setup.seconds + attack_seconds + time.perf_counter() - started, 3),
            "program_cells": program_cells,  # cells whose targets ran in the same engine program
        }
        return record

    def _pretrain(self, model, defense, cell: Cell, steps: int, target: int) -> None:
        """Threat model 'trained': the shared weights are those after ``steps`` training steps under the
        defense (the attack can happen at any time during training). They do not depend on the attack,
        so they are cached on disk per (dataset, model, defense, seed, target, steps, training config):
        every attack on the setting, in any worker, reuses one training run."""
        from .training import train_with_defense

        key_obj = {"dataset": cell.dataset.as_dict(), "model": cell.model.as_dict(),
                   "defense": cell.defense.as_dict(), "seed": cell.seed, "target": target, "steps": steps,
                   "accuracy": cell.grid.accuracy.as_dict(), "data_dir": bool(self.options.data_dir)}

        def compute() -> dict[str, torch.Tensor]:
            train = self.dataset(cell.dataset, "train")
            train_with_defense(model, defense, train, train.subset(torch.arange(min(64, len(train)))),
                               cell.grid.accuracy, seed=derive_seed("pretrain", cell.seed, target),
                               max_steps=steps)
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

        state = computed_once(self.cache_dir / "pretrained" / f"{config_hash(key_obj)}.pt", compute,
                              read=lambda p: torch.load(p, weights_only=True), write=atomic_write_torch)
        model.load_state_dict(state)

    @staticmethod
    def _convergence_monitor(data: ImageData, x: torch.Tensor, sink: list, t: int) -> Callable:
        """Records the first step at which every reconstruction of target ``t`` is within CONVERGED_MSE
        of its matched original (ground truth stays on the evaluator's side)."""
        truth = data.to_unit(x.detach().cpu())

        def monitor(step: int, images: torch.Tensor, labels) -> None:
            if sink[t] is not None:
                return
            recon = data.to_unit(images.detach().cpu()).clamp(0, 1)
            perm = match_reconstructions(recon, truth)
            mse = ((recon[perm] - truth) ** 2).flatten(1).mean(1)
            if bool((mse < CONVERGED_MSE).all()):
                sink[t] = step

        return monitor

    def save_images(self, key: str, originals: torch.Tensor, recons: torch.Tensor) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, originals=originals.numpy().astype(np.float32),
                            reconstructions=recons.numpy().astype(np.float32))
        atomic_write_bytes(self.options.out_dir / "reconstructions" / f"{key}.npz", buf.getvalue())

    # -- the whole grid ----------------------------------------------------------------------------
    def pending(self) -> list[Cell]:
        done = self.store.completed_keys(repair=True)
        return [c for c in self.grid.cells() if c.key() not in done]

    def run(self, executor: "CellExecutor | None" = None) -> list[dict]:
        """Run every pending cell on ``executor`` (default: serially, here), appending each record as it
        finishes; returns the new records. Only this process writes results.jsonl."""
        from tqdm import tqdm

        from .executors import SerialExecutor, longest_first

        executor = executor or SerialExecutor()
        out = self.options.out_dir
        out.mkdir(parents=True, exist_ok=True)
        all_cells = self.grid.cells()
        # the cell order lets the report keep the grid's order whatever order workers finish in
        snapshot = {**_grid_snapshot(self.grid), "cell_keys": [c.key() for c in all_cells]}
        atomic_write_text(out / "grid.json", json.dumps(snapshot, indent=2, sort_keys=True))
        cells = self.pending()
        jobs = self.jobs(cells)
        if executor.parallel:
            jobs = longest_first(jobs, {c.key(): c for c in all_cells})
        bar = tqdm(total=len(all_cells), initial=len(all_cells) - len(cells), unit="cell",
                   desc=f"leakbench {self.grid.name}", disable=not self.options.progress, file=sys.stderr)
        written = []
        for record in executor.run(self, jobs):
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


@dataclass
class _GradientSetup:
    """A gradient cell's tasks and what scoring them needs, built before the attack runs."""

    cell: Cell
    defense: Any
    data: ImageData
    batch: int
    tasks: list[AttackTask] = field(default_factory=list)
    truths: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    monitors: list[Callable] = field(default_factory=list)
    converge_steps: list[int | None] = field(default_factory=list)
    seconds: float = 0.0


def _grid_snapshot(grid: Grid) -> dict:
    return {"name": grid.name, "description": grid.description, "source": grid.source,
            "datasets": [d.as_dict() for d in grid.datasets], "models": [m.as_dict() for m in grid.models],
            "attacks": [a.as_dict() for a in grid.attacks], "defenses": [d.as_dict() for d in grid.defenses],
            "seeds": grid.seeds, "targets": grid.targets, "split": grid.split, "threat": grid.threat,
            "accuracy": grid.accuracy.as_dict(), "verdict": vars(grid.verdict), "protocol": dict(grid.protocol), "oracle": dict(grid.oracle), "batch_cells": grid.batch_cells,
            "subgrids": [_grid_snapshot(g) for g in grid.subgrids]}
