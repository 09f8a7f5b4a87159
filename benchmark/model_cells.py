"""Grid cells for attacks on a finished model (model inversion, Fredrikson et al. 2015): the model is the
one the cell's accuracy run trained under its defense (for protocol defenses such as selective sharing
and dssgd-dp: the final global model of the protocol run without an adversary), and the inverted images
are scored like the GAN cells' samples (oracle, nearest neighbours, the same verdict), so that one table
holds both."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .collab_cells import participants_pool_and_oracle, sample_score_fields, ssim_calibration
from .leak_scores import score_samples

if TYPE_CHECKING:  # pragma: no cover
    from .grid import Cell
    from .runner import Runner


def trained_model_entry(runner: "Runner", cell: "Cell", accuracy_path: Path) -> tuple[dict[str, Any], torch.nn.Module]:
    """(accuracy result, trained model), the weights cached at ``accuracy_path`` with suffix ``.pt``.
    Training also writes the accuracy entry when it is missing, so the setting's other cells reuse it."""
    from .results import atomic_write_text, atomic_write_torch, computed_once

    def compute() -> dict[str, Any]:
        model = runner.accuracy_model(cell)
        result = runner._train_for_accuracy(cell, model)
        if not accuracy_path.exists():
            atomic_write_text(accuracy_path, json.dumps(result, sort_keys=True))
        return {"accuracy": result, "state": {k: v.detach().cpu() for k, v in model.state_dict().items()}}

    entry = computed_once(accuracy_path.with_suffix(".pt"), compute,
                          read=lambda p: torch.load(p, weights_only=True), write=atomic_write_torch)
    model = runner.accuracy_model(cell)
    model.load_state_dict(entry["state"])
    return entry["accuracy"], model


def run_model_cell(runner: "Runner", cell: "Cell", attack, defense) -> dict[str, Any]:
    from .runner import accuracy_fields, cell_identity, derive_seed

    started = time.perf_counter()
    rule = cell.grid.gan_verdict
    accuracy, model = runner.trained_model(cell)
    pool, oracle = participants_pool_and_oracle(runner, cell)
    calibration = ssim_calibration(runner, cell, pool, attack.target_class)
    attack_started = time.perf_counter()
    inversion = attack.attack_model(model.cpu(), input_shape=pool.shape, scale=pool.scale,
                                    seed=derive_seed("attack", cell.seed))
    attack_seconds = time.perf_counter() - attack_started
    score = score_samples(inversion.images, target_class=attack.target_class, oracle=oracle, references=pool,
                          rule=rule, calibration=calibration)
    targets = pool.images[pool.labels == attack.target_class]
    nearest = targets[torch.as_tensor(score["nearest_l1_index"])]
    runner.save_images(cell.key(), pool.to_unit(nearest), pool.to_unit(inversion.images).clamp(0, 1))
    fields = sample_score_fields(score, rule)
    return {
        **cell_identity(cell, defense),
        "targets": score["samples"],
        "threat": {"setting": "model", "shared": "the trained model (white box: exact input gradients)",
                   "target_class": attack.target_class,
                   "model_trained_by": "the accuracy run under the defense (protocol defenses: the final "
                                       "global model of the protocol run, no adversary)"},
        "metrics": {
            **fields["metrics"],
            # the attacked model's accuracy, the column the GAN cells fill with the attacked protocol's
            "protocol_accuracy": accuracy.get("accuracy"),
            "model_cost_median": round(float(inversion.costs.median()), 4),
            "inversion_steps_mean": round(float(inversion.steps.float().mean()), 1),
            "stop_reasons": {r: inversion.stop_reasons.count(r) for r in sorted(set(inversion.stop_reasons))},
            "attack_seconds": round(attack_seconds, 3),
            "oracle_test_accuracy": round(oracle.accuracy(runner.dataset(cell.dataset, "test")
                                                          .capped(cell.grid.accuracy.test_size)), 4),
        },
        "distributions": fields["distributions"],
        **accuracy_fields(accuracy),
        "verdict": fields["verdict"],
        "device": "cpu",
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
