"""The shared work of a run, behind the narrow interface cells are given (``CellContext``): decoded data
splits, fresh models, accuracy runs of defense settings (cached on disk, computed once across workers),
trained models, and the folder where cells keep what their attacks produced."""
from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cells.base import CellContext, MembershipSplits
from ..data import ImageData, capped_index, resolve_data_dir
from ..registry import DATASETS, DEFENSES, MODELS
from ..seeding import config_hash, derive_seed
from ..storage import atomic_write_bytes, atomic_write_text, atomic_write_torch, computed_once
from ..training import train_with_defense
from .grid import Cell, ComponentSpec


class RunContext(CellContext):
    """One per Runner (and so one per worker process): datasets stay decoded in memory across the cells
    the worker is given; accuracy runs, oracles and decoded splits are shared through ``cache_dir``."""

    def __init__(self, *, out_dir: Path, cache_dir: Path, data_dir: str | None, device: str,
                 disk_cache: bool = True) -> None:
        self.out_dir = out_dir
        self.cache_dir = cache_dir
        self.data_dir = data_dir
        self.device = device
        self.disk_cache = disk_cache
        self.memo: dict = {}
        self._decoded_splits: dict[str, ImageData] = {}

    @property
    def data_key(self) -> bool:
        return bool(self.data_dir)

    def dataset(self, spec: ComponentSpec, split: str) -> ImageData:
        key = json.dumps([spec.name, spec.params, split], sort_keys=True)
        if key not in self._decoded_splits:
            self._decoded_splits[key] = self._decoded(spec, split)
        return self._decoded_splits[key]

    def _decoded(self, spec: ComponentSpec, split: str) -> ImageData:
        """A split read from the data dir's parquet mirror: decoding its PNGs takes seconds and every
        worker (and every resumed run) needs it, so the decoded tensors are cached on disk, keyed by the
        dataset setting and the mirror files' size and modification time (a changed file is decoded
        again). Embedded data is cheap, and hub downloads are cached by HF ``datasets`` itself."""
        dataset = DATASETS.build(spec.name, spec.params)
        data_dir = resolve_data_dir(self.data_dir)
        files = dataset.source_files(split, data_dir)
        if files is None or not self.disk_cache:
            return dataset.load(split, data_dir=self.data_dir)  # its errors name what is missing
        key_obj = {"dataset": spec.as_dict(), "split": split, "mirror": str(data_dir.resolve()),
                   "files": [(str(p.relative_to(data_dir)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]}

        def from_bytes(pixels: torch.Tensor, scale: str) -> torch.Tensor:  # the loader's own arithmetic
            unit = pixels.float() / 255.0
            return unit * 2 - 1 if scale == "[-1,1]" else unit

        def compute() -> dict[str, Any]:
            data = dataset.load(split, data_dir=self.data_dir)
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
        return model.to(self.device)

    def accuracy(self, cell: Cell, *, wait: bool = True) -> dict[str, Any] | None:
        """Accuracy of training under this defense setting, cached on disk per (defense, dataset, model,
        seed, training config): it does not depend on the attack, and parallel workers compute each
        setting once (the others wait for it; with ``wait=False`` they get None instead). The trained
        weights are kept beside it (:meth:`trained_model`), so that attacks on the finished model (model
        inversion, membership inference) never train the setting again."""
        path = self.accuracy_cache_path(cell)
        return computed_once(path, lambda: self.trained_model(cell)[0],
                             read=lambda p: json.loads(p.read_text()),
                             write=lambda p, result: atomic_write_text(p, json.dumps(result, sort_keys=True)),
                             wait=wait)

    def accuracy_splits(self, cell: Cell) -> tuple[ImageData, ImageData]:
        """(the data the accuracy run draws its training records from, the held-out data it tests on)."""
        train = self.dataset(cell.dataset, "train")
        fraction = cell.grid.accuracy.holdout_fraction
        return train.held_out(fraction) if fraction else (train, self.dataset(cell.dataset, "test"))

    def train_for_accuracy(self, cell: Cell, model: torch.nn.Module | None = None) -> dict[str, Any]:
        """``model``: a fresh model from :meth:`accuracy_model` to train (and leave trained); default a new one."""
        train, test = self.accuracy_splits(cell)
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
        accuracy_path = self.accuracy_cache_path(cell)

        def compute() -> dict[str, Any]:
            model = self.accuracy_model(cell)
            result = self.train_for_accuracy(cell, model)
            if not accuracy_path.exists():
                atomic_write_text(accuracy_path, json.dumps(result, sort_keys=True))
            return {"accuracy": result, "state": {k: v.detach().cpu() for k, v in model.state_dict().items()}}

        entry = computed_once(accuracy_path.with_suffix(".pt"), compute,
                              read=lambda p: torch.load(p, weights_only=True), write=atomic_write_torch)
        model = self.accuracy_model(cell)
        model.load_state_dict(entry["state"])
        return entry["accuracy"], model

    def membership_splits(self, cell: Cell) -> MembershipSplits:
        trained_from, held_out = self.accuracy_splits(cell)
        config = cell.grid.accuracy
        # the accuracy run caps its training data with the first draw of its seeded generator
        # (training.train_with_defense and the protocol defenses alike)
        trained = capped_index(len(trained_from), config.train_size,
                               generator=torch.Generator().manual_seed(derive_seed("accuracy", cell.seed)))
        unused = torch.ones(len(trained_from), dtype=torch.bool)
        unused[trained] = False
        spare = torch.nonzero(unused).flatten()
        spare = spare[torch.randperm(len(spare), generator=torch.Generator().manual_seed(
            derive_seed("population", cell.seed)))]
        population = spare[:2 * len(trained)] if len(spare) >= 2 * len(trained) else spare[:0]
        return MembershipSplits(trained_on=trained_from.subset(trained), held_out=held_out,
                                population=trained_from.subset(population))

    def reference_models(self, cell: Cell, count: int) -> tuple[list[torch.nn.Module], list[dict[str, Any]]]:
        """``count`` reference models, each trained without a defense (the accuracy run's recipe otherwise)
        on a seeded random half of the population split; each cached on disk under its own key (a grid
        asking for 8 reuses the first 4 of another), shared by every defense setting of the cell's
        dataset, model, training config and seed, and computed once across workers."""
        splits = self.membership_splits(cell)
        _, held_out = self.accuracy_splits(cell)
        config = replace(cell.grid.accuracy, train_size=None)
        models, results = [], []
        for index in range(count):
            key_obj = {"reference": index, "dataset": cell.dataset.as_dict(), "model": cell.model.as_dict(),
                       "seed": cell.seed, "accuracy": cell.grid.accuracy.as_dict(), "data_dir": self.data_key}
            seed = derive_seed("reference", cell.seed, index)

            def compute(seed: int = seed) -> dict[str, Any]:
                half = torch.randperm(len(splits.population), generator=torch.Generator().manual_seed(seed))
                half = half[:len(splits.population) // 2]
                model = self.make_model(cell, splits.population, seed, **cell.grid.accuracy.model_params)
                torch.manual_seed(seed)
                result = train_with_defense(model, DEFENSES.build("none"), splits.population.subset(half),
                                            held_out, config, seed=seed)
                return {"accuracy": result, "state": {k: v.detach().cpu() for k, v in model.state_dict().items()}}

            entry = computed_once(self.cache_dir / "reference" / f"{config_hash(key_obj)}.pt", compute,
                                  read=lambda p: torch.load(p, weights_only=True), write=atomic_write_torch)
            model = self.make_model(cell, splits.population, seed, **cell.grid.accuracy.model_params)
            model.load_state_dict(entry["state"])
            models.append(model)
            results.append(entry["accuracy"])
        return models, results

    def accuracy_cache_path(self, cell: Cell) -> Path:
        key_obj = {"defense": cell.defense.as_dict(), "dataset": cell.dataset.as_dict(),
                   "model": cell.model.as_dict(), "seed": cell.seed, "accuracy": cell.grid.accuracy.as_dict(),
                   "data_dir": self.data_key}
        return self.cache_dir / "accuracy" / f"{config_hash(key_obj)}.json"

    def save_samples(self, key: str, originals: torch.Tensor, produced: torch.Tensor) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, originals=originals.numpy().astype(np.float32),
                            reconstructions=produced.numpy().astype(np.float32))
        atomic_write_bytes(self.out_dir / "reconstructions" / f"{key}.npz", buf.getvalue())
