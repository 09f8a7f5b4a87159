"""What the kinds of cell that produce *class representatives* share (the GAN attacks in the
collaborative protocol, model inversion of the finished model): the participants' pool and the oracle
held out from it, the verdict's SSIM calibration, and the fields their records carry, so that one
table and one verdict hold them all."""
from __future__ import annotations

import dataclasses
import inspect
import json
from typing import TYPE_CHECKING, Any

import torch

from ..scoring.class_leak import CALIBRATION_VERSION, LeakRule, SsimCalibration, class_leak_controls
from ..scoring.oracle import Oracle, OracleNet, holdout_split, train_oracle
from ..seeding import config_hash, derive_seed
from ..storage import atomic_write_text, atomic_write_torch, computed_once
from .base import CLASS_REPRESENTATIVES, CellContext, CellKind, TableColumn

if TYPE_CHECKING:  # pragma: no cover
    from ..run.grid import Cell, Grid

ORACLE_FRACTION = 0.3  # of the training split: the oracle's data, never given to any participant
TRACE_REFERENCES = 128  # real images that per-round scores compare with (the final score: the rule's)


class ClassRepresentativeCells(CellKind):
    """Base of the kinds whose attacks produce samples of a class (scored by the oracle and nearest real
    images, see ``leakbench.scoring.class_leak``) rather than copies of private records."""

    threat_model = CLASS_REPRESENTATIVES
    columns = (TableColumn("oracle", "oracle_accuracy"), TableColumn("model acc", "protocol_accuracy"))
    # protocol_accuracy: the attacked model's accuracy (model inversion) or the collaborative
    # protocol's final accuracy (GAN), not the entry's accuracy column
    board_scores = (("oracle_accuracy", 4), ("nn_ssim_mean", 4), ("protocol_accuracy", 4))

    def progress(self, metrics: dict[str, Any]) -> str:
        return f"oracle {metrics['oracle_accuracy']:.0%}  NN-SSIM {metrics['nn_ssim_mean']:.2f}"


def oracle_key(grid: "Grid") -> dict:
    """The oracle's settings belong to a cell's identity only when a grid sets them (so cells of grids
    that use the defaults keep their keys)."""
    return {"oracle": dict(grid.oracle)} if grid.oracle else {}


def participants_pool_and_oracle(context: CellContext, cell: "Cell") -> tuple[Any, Oracle]:
    """(the participants' training pool, the oracle): a stratified 30% of the training split is held out
    for the oracle, so it judges samples with knowledge of the class no participant contributed to.
    Cached per dataset and seed: in memory, and on disk (the trained weights) so that parallel workers
    and resumed runs train each oracle once; the split itself is cheap and recomputed."""
    key = ("oracle", cell.dataset.name, str(sorted(cell.dataset.params.items())), cell.seed,
           str(sorted(cell.grid.oracle.items())))
    if key not in context.memo:
        train = context.dataset(cell.dataset, "train")
        seed = derive_seed("oracle", cell.seed)
        pool, oracle_data = holdout_split(train, fraction=ORACLE_FRACTION, seed=seed)
        # train_oracle's defaults are part of the key, so changing them retrains instead of reusing
        training = {name: p.default for name, p in inspect.signature(train_oracle).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        training.update(cell.grid.oracle)  # the grid's `oracle:` settings
        key_obj = {"dataset": {"name": cell.dataset.name, "params": cell.dataset.params}, "seed": cell.seed,
                   "fraction": ORACLE_FRACTION, "training": training, "data_dir": context.data_key}

        def read(path) -> Oracle:
            with torch.random.fork_rng(devices=[]):  # building the net draws from the global generator
                model = OracleNet(channels=oracle_data.shape[0], image_size=oracle_data.shape[1],
                                  num_classes=oracle_data.num_classes)
            model.load_state_dict(torch.load(path, weights_only=True))
            return Oracle(model=model, num_classes=oracle_data.num_classes, train_samples=len(oracle_data))

        oracle = computed_once(context.cache_dir / "oracle" / f"{config_hash(key_obj)}.pt",
                               lambda: train_oracle(oracle_data, seed=seed, **cell.grid.oracle),
                               read=read, write=lambda p, oracle: atomic_write_torch(p, oracle.model.state_dict()))
        context.memo[key] = (pool, oracle)
    return context.memo[key]


def ssim_calibration(context: CellContext, cell: "Cell", pool, target_class: int) -> SsimCalibration | None:
    """The verdict's SSIM calibration for this dataset, seed and target class (None for a fixed
    ``min_ssim``): measured against the pool's images of the class, which samples are compared with,
    on the test split's images (held out from every participant and the oracle). Cached in memory and on
    disk: on MNIST it compares ~300 images with ~1,250 references, once per sweep rather than per worker."""
    rule = cell.grid.gan_verdict
    if not rule.calibrated:
        return None
    key_obj = {"dataset": cell.dataset.as_dict(), "seed": cell.seed, "target_class": target_class,
               "percentile": rule.percentile, "images": rule.calibration_images, "oracle_fraction": ORACLE_FRACTION,
               "references_per_class": rule.references_per_class,
               "data_dir": context.data_key, "version": CALIBRATION_VERSION}
    key = ("ssim-calibration", config_hash(key_obj))
    if key not in context.memo:
        def compute() -> SsimCalibration:
            held_out = context.dataset(cell.dataset, "test")
            return rule.calibrate(pool, held_out, target_class, seed=derive_seed("calibration", cell.seed))

        context.memo[key] = computed_once(
            context.cache_dir / "ssim-calibration" / f"{key[1]}.json", compute,
            read=lambda p: SsimCalibration(**json.loads(p.read_text())),
            write=lambda p, c: atomic_write_text(p, json.dumps(dataclasses.asdict(c), sort_keys=True)))
    return context.memo[key]


def verdict_controls(context: CellContext, cell: "Cell", pool, oracle: Oracle, target_class: int,
                     calibration: SsimCalibration | None) -> dict[str, dict]:
    """The leak rate of each control of the verdict (``class_leak_controls``: real held-out images of the
    class, of other classes, pixel-permuted class images, Gaussian blobs, the class-mean image) on the
    half of the test split the SSIM bar was not calibrated on. Cached like the calibration (it depends on
    the oracle too), so every record of a dataset, seed and target class carries the same numbers."""
    rule = cell.grid.gan_verdict
    key_obj = {"dataset": cell.dataset.as_dict(), "seed": cell.seed, "target_class": target_class,
               "rule": dataclasses.asdict(rule), "calibration": None if calibration is None else calibration.threshold,
               "oracle_fraction": ORACLE_FRACTION, "data_dir": context.data_key, "version": CALIBRATION_VERSION,
               **oracle_key(cell.grid)}
    key = ("verdict-controls", config_hash(key_obj))
    if key not in context.memo:
        def compute() -> dict[str, dict]:
            return class_leak_controls(oracle=oracle, references=pool, held_out=context.dataset(cell.dataset, "test"),
                                       target_class=target_class, rule=rule, calibration=calibration,
                                       seed=derive_seed("calibration", cell.seed), images=rule.calibration_images)

        context.memo[key] = computed_once(
            context.cache_dir / "verdict-controls" / f"{key[1]}.json", compute,
            read=lambda p: json.loads(p.read_text()),
            write=lambda p, c: atomic_write_text(p, json.dumps(c, sort_keys=True)))
    return context.memo[key]


def sample_score_fields(score: dict[str, Any], rule: LeakRule, controls: dict[str, dict] | None = None
                        ) -> dict[str, Any]:
    """The metric and verdict fields every class-representative cell (GAN, model inversion) records, so
    one table holds them all: the verdict with its rule, calibration, the share of samples meeting each
    of its conditions, and its controls' leak rates."""
    return {
        "metrics": {
            "leak_rate": score["leak_rate"], "class_mean_ssim": score["class_mean_ssim"],
            "oracle_accuracy": score["oracle_accuracy"], "oracle_confidence": score["oracle_confidence"],
            "ssim_median": score["nn_ssim_distribution"]["median"], "nn_ssim_mean": score["nn_ssim"],
            "nn_l1_mean": score["nn_l1"], "psnr_median": None, "mse_median": None, "label_accuracy": None,
            "recovered_rate": None, "closure_evals_mean": None,
        },
        "distributions": {"nn_ssim": score["nn_ssim_distribution"], "nn_l1": score["nn_l1_distribution"]},
        "verdict": {"defended": score["defended"], "rule": score["verdict_rule"], "metric": "oracle+nn-ssim",
                    "threshold": score["min_ssim"], "max_leak_rate": rule.max_leak_rate,
                    "min_ssim_setting": rule.min_ssim, "min_confidence": rule.min_confidence,
                    "calibration": score["calibration"], "conditions": score["conditions"], "controls": controls},
    }
