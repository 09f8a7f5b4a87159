"""Grid cells for attacks that act over many rounds of the collaborative protocol (the GAN attacks of
Hitaj et al.): run the protocol with the adversary in it under the cell's defense, then score what the
adversary's generator produces with an independent oracle and nearest-neighbour similarity."""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import TYPE_CHECKING, Any

import torch

from .collab import ProtocolConfig
from .leak_scores import LeakRule, Oracle, SsimCalibration, holdout_split, score_samples, train_oracle

if TYPE_CHECKING:  # pragma: no cover
    from .grid import Cell
    from .runner import Runner

ORACLE_FRACTION = 0.3  # of the training split: the oracle's data, never given to any participant
TRACE_REFERENCES = 128  # real images of the target class that per-round scores compare against


def protocol_for(cell: "Cell") -> ProtocolConfig:
    """The cell's agreed protocol (grid, then dataset overrides) with the cell's architecture."""
    agreed = cell.protocol()
    if "participant_labels" in agreed:
        agreed["participant_labels"] = tuple(tuple(p) for p in agreed["participant_labels"])
    return ProtocolConfig(**{**agreed, "model": cell.model.name, "model_params": dict(cell.model.params)})


def participants_pool_and_oracle(runner: "Runner", cell: "Cell") -> tuple[Any, Oracle]:
    """(the participants' training pool, the oracle): a stratified 30% of the training split is held out
    for the oracle, so it judges samples with knowledge of the class no participant contributed to.
    Cached per dataset and seed: in memory, and on disk (the trained weights) so that parallel workers
    and resumed runs train each oracle once; the split itself is cheap and recomputed."""
    import inspect

    from .grid import config_hash
    from .leak_scores import OracleNet
    from .results import atomic_write_torch, computed_once
    from .runner import derive_seed

    key = ("oracle", cell.dataset.name, str(sorted(cell.dataset.params.items())), cell.seed,
           str(sorted(cell.grid.oracle.items())))
    if key not in runner.shared:
        train = runner.dataset(cell.dataset, "train")
        seed = derive_seed("oracle", cell.seed)
        pool, oracle_data = holdout_split(train, fraction=ORACLE_FRACTION, seed=seed)
        # train_oracle's defaults are part of the key, so changing them retrains instead of reusing
        training = {name: p.default for name, p in inspect.signature(train_oracle).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        training.update(cell.grid.oracle)  # the grid's `oracle:` settings
        key_obj = {"dataset": {"name": cell.dataset.name, "params": cell.dataset.params}, "seed": cell.seed,
                   "fraction": ORACLE_FRACTION, "training": training, "data_dir": bool(runner.options.data_dir)}

        def read(path) -> Oracle:
            with torch.random.fork_rng(devices=[]):  # building the net draws from the global generator
                model = OracleNet(channels=oracle_data.shape[0], image_size=oracle_data.shape[1],
                                  num_classes=oracle_data.num_classes)
            model.load_state_dict(torch.load(path, weights_only=True))
            return Oracle(model=model, num_classes=oracle_data.num_classes, train_samples=len(oracle_data))

        oracle = computed_once(runner.cache_dir / "oracle" / f"{config_hash(key_obj)}.pt",
                               lambda: train_oracle(oracle_data, seed=seed, **cell.grid.oracle),
                               read=read, write=lambda p, oracle: atomic_write_torch(p, oracle.model.state_dict()))
        runner.shared[key] = (pool, oracle)
    return runner.shared[key]


def ssim_calibration(runner: "Runner", cell: "Cell", pool, target_class: int) -> SsimCalibration | None:
    """The verdict's SSIM calibration for this dataset, seed and target class (None for a fixed
    ``min_ssim``): measured against the pool's images of the class, which samples are compared with,
    on the test split's images (held out from every participant and the oracle). Cached in memory and on
    disk: on MNIST it compares ~300 images with ~1,250 references, once per sweep rather than per worker."""
    import json

    from .grid import config_hash
    from .results import atomic_write_text, computed_once
    from .runner import derive_seed

    rule = cell.grid.gan_verdict
    if not rule.calibrated:
        return None
    key_obj = {"dataset": cell.dataset.as_dict(), "seed": cell.seed, "target_class": target_class,
               "percentile": rule.percentile, "images": rule.calibration_images, "oracle_fraction": ORACLE_FRACTION,
               "data_dir": bool(runner.options.data_dir)}
    key = ("ssim-calibration", config_hash(key_obj))
    if key not in runner.shared:
        def compute() -> SsimCalibration:
            held_out = runner.dataset(cell.dataset, "test")
            return rule.calibrate(pool, held_out, target_class, seed=derive_seed("calibration", cell.seed))

        runner.shared[key] = computed_once(
            runner.cache_dir / "ssim-calibration" / f"{key[1]}.json", compute,
            read=lambda p: SsimCalibration(**json.loads(p.read_text())),
            write=lambda p, c: atomic_write_text(p, json.dumps(dataclasses.asdict(c), sort_keys=True)))
    return runner.shared[key]


def sample_score_fields(score: dict[str, Any], rule: LeakRule) -> dict[str, Any]:
    """The metric and verdict fields every class-representative cell (GAN, model inversion) records, so
    one table holds them all."""
    return {
        "metrics": {
            "leak_rate": score["leak_rate"], "strict_leak_rate": score["strict_leak_rate"],
            "oracle_accuracy": score["oracle_accuracy"], "oracle_confidence": score["oracle_confidence"],
            "ssim_median": score["nn_ssim_distribution"]["median"], "nn_ssim_mean": score["nn_ssim"],
            "nn_l1_mean": score["nn_l1"], "psnr_median": None, "mse_median": None, "label_accuracy": None,
            "recovered_rate": None, "closure_evals_mean": None,
        },
        "distributions": {"nn_ssim": score["nn_ssim_distribution"], "nn_l1": score["nn_l1_distribution"]},
        "verdict": {"defended": score["defended"], "rule": score["verdict_rule"], "metric": "oracle+nn-ssim",
                    "threshold": score["min_ssim"], "max_leak_rate": rule.max_leak_rate,
                    "min_ssim_setting": rule.min_ssim, "calibration": score["calibration"]},
    }


def run_collaborative_cell(runner: "Runner", cell: "Cell", attack, defense) -> dict[str, Any]:
    from .runner import accuracy_fields, cell_identity, derive_seed

    started = time.perf_counter()
    grid = cell.grid
    train, oracle = participants_pool_and_oracle(runner, cell)
    protocol_test = runner.dataset(cell.dataset, "test")
    # the global model is tested every round: the same cap as the accuracy runs
    protocol_test = protocol_test.capped(grid.accuracy.test_size)
    protocol = protocol_for(cell)
    rule = grid.gan_verdict
    calibration = ssim_calibration(runner, cell, train, attack.target_class)

    # the per-round trace compares against a fixed subset of the class (nearest-neighbour SSIM against
    # all of MNIST's ~1,200 images of a class costs seconds per round); the final score uses them all
    of_class = (train.labels == attack.target_class).nonzero().flatten()[:TRACE_REFERENCES]
    trace_references = train.subset(of_class)

    def round_score(samples: torch.Tensor) -> dict[str, Any]:
        # the calibrated cutoff was measured against all references: against this subset it is a bit strict
        s = score_samples(samples, target_class=attack.target_class, oracle=oracle, references=trace_references,
                          rule=rule, calibration=calibration)
        return {k: s[k] for k in ("oracle_accuracy", "nn_ssim", "leak_rate")}

    result = attack.run_collaborative(protocol=protocol, train=train, test=protocol_test, defense=defense,
                                      seed=derive_seed("collaborative", cell.seed), round_scorer=round_score)
    score = score_samples(result.samples, target_class=attack.target_class, oracle=oracle, references=train,
                          rule=rule, calibration=calibration)
    # the image grid: each generated sample under its L1-nearest real image of the target class
    targets = train.images[train.labels == attack.target_class]
    nearest = targets[torch.as_tensor(score["nearest_l1_index"])]
    runner.save_images(cell.key(), train.to_unit(nearest), train.to_unit(result.samples).clamp(0, 1))
    accuracy = runner.accuracy(cell)
    fields = sample_score_fields(score, rule)
    return {
        **cell_identity(cell, defense),
        "targets": score["samples"],
        "threat": {"setting": "collaborative", "shared": "parameter updates (distributed selective SGD)",
                   "participant_labels": [list(labels) for labels in protocol.participant_labels],
                   "adversary": result.adversary, "target_class": attack.target_class,
                   "adversary_influences_victims": bool(attack.inject),
                   "protocol": {k: v for k, v in dataclasses.asdict(protocol).items() if k != "participant_labels"}},
        "metrics": {
            **fields["metrics"],
            "protocol_accuracy": result.protocol.final_accuracy,
            "rounds": len(result.trace), "seconds_per_round": round(result.seconds_per_round, 3),
            "oracle_test_accuracy": round(oracle.accuracy(protocol_test), 4),
        },
        "distributions": fields["distributions"],
        "trace": result.trace,
        **accuracy_fields(accuracy),
        "verdict": fields["verdict"],
        "device": "cpu",
        "wall_seconds": round(time.perf_counter() - started, 3),
        "peak_round_accuracy": max((t["global_accuracy"] for t in result.trace), default=None),
        "mean_round_seconds": statistics.mean(t["seconds"] for t in result.trace) if result.trace else None,
    }
