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
from .leak_scores import Oracle, holdout_split, score_samples, train_oracle

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
    Cached per dataset and seed."""
    from .runner import derive_seed

    key = ("oracle", cell.dataset.name, str(sorted(cell.dataset.params.items())), cell.seed)
    if key not in runner.shared:
        train = runner.dataset(cell.dataset, "train")
        seed = derive_seed("oracle", cell.seed)
        pool, oracle_data = holdout_split(train, fraction=ORACLE_FRACTION, seed=seed)
        runner.shared[key] = (pool, train_oracle(oracle_data, seed=seed))
    return runner.shared[key]


def run_collaborative_cell(runner: "Runner", cell: "Cell", attack, defense) -> dict[str, Any]:
    from .runner import cell_identity, derive_seed

    started = time.perf_counter()
    grid = cell.grid
    train, oracle = participants_pool_and_oracle(runner, cell)
    protocol_test = runner.dataset(cell.dataset, "test")
    # the global model is tested every round: the same cap as the accuracy runs
    protocol_test = protocol_test.capped(grid.accuracy.test_size)
    protocol = protocol_for(cell)
    rule = grid.gan_verdict

    # the per-round trace compares against a fixed subset of the class (nearest-neighbour SSIM against
    # all of MNIST's ~1,200 images of a class costs seconds per round); the final score uses them all
    of_class = (train.labels == attack.target_class).nonzero().flatten()[:TRACE_REFERENCES]
    trace_references = train.subset(of_class)

    def round_score(samples: torch.Tensor) -> dict[str, Any]:
        s = score_samples(samples, target_class=attack.target_class, oracle=oracle, references=trace_references,
                          rule=rule)
        return {k: s[k] for k in ("oracle_accuracy", "nn_ssim", "leak_rate")}

    result = attack.run_collaborative(protocol=protocol, train=train, test=protocol_test, defense=defense,
                                      seed=derive_seed("collaborative", cell.seed), round_scorer=round_score)
    score = score_samples(result.samples, target_class=attack.target_class, oracle=oracle, references=train,
                          rule=rule)
    # the image grid: each generated sample under its L1-nearest real image of the target class
    targets = train.images[train.labels == attack.target_class]
    nearest = targets[torch.as_tensor(score["nearest_l1_index"])]
    runner.save_images(cell.key(), train.to_unit(nearest), train.to_unit(result.samples).clamp(0, 1))
    accuracy = runner.accuracy(cell)
    return {
        **cell_identity(cell, defense),
        "targets": score["samples"],
        "threat": {"setting": "collaborative", "shared": "parameter updates (distributed selective SGD)",
                   "participant_labels": [list(labels) for labels in protocol.participant_labels],
                   "adversary": result.adversary, "target_class": attack.target_class,
                   "adversary_influences_victims": bool(attack.inject),
                   "protocol": {k: v for k, v in dataclasses.asdict(protocol).items() if k != "participant_labels"}},
        "metrics": {
            "leak_rate": score["leak_rate"],
            "oracle_accuracy": score["oracle_accuracy"], "oracle_confidence": score["oracle_confidence"],
            "ssim_median": score["nn_ssim_distribution"]["median"], "nn_ssim_mean": score["nn_ssim"],
            "nn_l1_mean": score["nn_l1"], "psnr_median": None, "mse_median": None, "label_accuracy": None,
            "recovered_rate": None, "closure_evals_mean": None,
            "protocol_accuracy": result.protocol.final_accuracy,
            "rounds": len(result.trace), "seconds_per_round": round(result.seconds_per_round, 3),
            "oracle_test_accuracy": round(oracle.accuracy(protocol_test), 4),
        },
        "distributions": {"nn_ssim": score["nn_ssim_distribution"], "nn_l1": score["nn_l1_distribution"]},
        "trace": result.trace,
        "accuracy": accuracy.get("accuracy"),
        "accuracy_details": {k: v for k, v in accuracy.items() if k != "accuracy"},
        "privacy": accuracy.get("privacy") or {},
        "verdict": {"defended": score["defended"], "rule": rule.describe(), "metric": "oracle+nn-ssim",
                    "threshold": rule.min_ssim, "max_leak_rate": rule.max_leak_rate},
        "device": "cpu",
        "wall_seconds": round(time.perf_counter() - started, 3),
        "peak_round_accuracy": max((t["global_accuracy"] for t in result.trace), default=None),
        "mean_round_seconds": statistics.mean(t["seconds"] for t in result.trace) if result.trace else None,
    }
