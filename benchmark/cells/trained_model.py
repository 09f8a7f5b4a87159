"""Model cells: attacks on a finished model (model inversion, Fredrikson et al. 2015): the model is the
one the cell's accuracy run trained under its defense (for protocol defenses such as selective sharing
and dssgd-dp: the final global model of the protocol run without an adversary), and the inverted images
are scored like the GAN cells' samples (oracle, nearest neighbours, the same verdict), so that one table
holds both."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from ..registry import ATTACKS, DEFENSES, register_cell_kind
from ..scoring.class_leak import score_samples
from ..seeding import derive_seed
from .base import CellContext, accuracy_fields, cell_identity
from .class_representatives import (
    ClassRepresentativeCells, oracle_key, participants_pool_and_oracle, sample_score_fields, ssim_calibration,
    verdict_controls,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..run.grid import Cell, Grid


@register_cell_kind("model")
class TrainedModelCells(ClassRepresentativeCells):
    """The model the accuracy run trained under the defense, attacked white-box."""

    def identity(self, cell: "Cell", grid: "Grid") -> dict[str, Any]:
        # the attacked model is the accuracy run's
        return {"attack": cell.attack.as_dict(), "defense": cell.defense.as_dict(),
                "dataset": cell.dataset.as_dict(), "model": cell.model.as_dict(), "seed": cell.seed,
                "gan_verdict": vars(grid.gan_verdict), "accuracy": grid.accuracy.as_dict(), **oracle_key(grid)}

    def run_one(self, context: CellContext, cell: "Cell") -> dict[str, Any]:
        attack = ATTACKS.build(cell.attack.name, cell.attack.params)
        defense = DEFENSES.build(cell.defense.name, cell.defense.params)
        started = time.perf_counter()
        rule = cell.grid.gan_verdict
        accuracy, model = context.trained_model(cell)
        pool, oracle = participants_pool_and_oracle(context, cell)
        calibration = ssim_calibration(context, cell, pool, attack.target_class)
        attack_started = time.perf_counter()
        inversion = attack.attack_model(model.cpu(), input_shape=pool.shape, scale=pool.scale,
                                        seed=derive_seed("attack", cell.seed))
        attack_seconds = time.perf_counter() - attack_started
        score = score_samples(inversion.images, target_class=attack.target_class, oracle=oracle, references=pool,
                              rule=rule, calibration=calibration)
        targets = pool.images[pool.labels == attack.target_class]
        nearest = targets[torch.as_tensor(score["nearest_l1_index"])]
        context.save_samples(cell.key(), pool.to_unit(nearest), pool.to_unit(inversion.images).clamp(0, 1))
        controls = verdict_controls(context, cell, pool, oracle, attack.target_class, calibration)
        fields = sample_score_fields(score, rule, controls)
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
                "oracle_test_accuracy": round(oracle.accuracy(context.dataset(cell.dataset, "test")
                                                              .capped(cell.grid.accuracy.test_size)), 4),
            },
            "distributions": fields["distributions"],
            **accuracy_fields(accuracy),
            "verdict": fields["verdict"],
            "device": "cpu",
            "wall_seconds": round(time.perf_counter() - started, 3),
        }
