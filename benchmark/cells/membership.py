"""Membership cells: was a record in the training set? The attacked model is the one the cell's accuracy
run trained under its defense (for protocol defenses: the final global model of the protocol run); the
members are drawn from the records that run trained on, as many non-members from the held-out split it
never saw (the two sets are disjoint by construction). Attacks that need reference models (offline
LiRA) get them from the run's cache, shared by every defense setting (``CellContext.reference_models``).

The record's leak rate is the attack's TPR at 1% FPR, and the verdict compares it with a multiple of that
FPR (``leakbench.scoring.membership``), so that tables, figures and boards read membership cells like
any other. For a defense with a DP guarantee, the record also holds the highest TPR at 1% FPR that its
epsilon allows, beside the empirical lower bound on epsilon the attack proves."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from ..errors import ConfigError
from ..registry import ATTACKS, DEFENSES, register_cell_kind
from ..scoring.membership import MembershipRule, dp_tpr_bound, score_membership
from ..seeding import derive_seed
from ..training import evaluate
from .base import MEMBERSHIP, CellContext, CellKind, TableColumn, accuracy_fields, cell_identity

if TYPE_CHECKING:  # pragma: no cover
    from ..run.grid import Cell, Grid


@register_cell_kind("membership")
class MembershipCells(CellKind):
    """Membership inference on the model the accuracy run trained under the defense."""

    threat_model: ClassVar[str] = MEMBERSHIP
    columns: ClassVar[tuple[TableColumn, ...]] = (
        TableColumn("AUC", "auc", style="number"),
        TableColumn("TPR@0.1%", "tpr_at_0.1%_fpr"),
        TableColumn("eps lower bound", "epsilon_lower_bound", pool="max", style="number"),
    )
    board_scores: ClassVar[tuple[tuple[str, int], ...]] = (("auc", 4), ("epsilon_lower_bound", 3))

    def identity(self, cell: "Cell", grid: "Grid") -> dict[str, Any]:
        # the attacked model is the accuracy run's; reference models follow from the same settings
        return {"attack": cell.attack.as_dict(), "defense": cell.defense.as_dict(), "dataset": cell.dataset.as_dict(),
                "model": cell.model.as_dict(), "seed": cell.seed, "accuracy": grid.accuracy.as_dict()}

    def preflight(self, context: CellContext, cells: list["Cell"]) -> None:
        for cell in cells:
            attack = ATTACKS.build(cell.attack.name, cell.attack.params)
            if not attack.reference_count:
                continue
            splits = context.membership_splits(cell)
            if not len(splits.population):
                raise ConfigError(
                    f"accuracy.train_size = {cell.grid.accuracy.train_size} leaves no population for the reference "
                    f"models of {cell.attack.name} on {cell.dataset.name}: the training split must hold 3 x the "
                    f"{len(splits.trained_on)} trained-on records; allowed: a train_size of at most a third of it")

    def run_one(self, context: CellContext, cell: "Cell") -> dict[str, Any]:
        attack = ATTACKS.build(cell.attack.name, cell.attack.params)
        defense = DEFENSES.build(cell.defense.name, cell.defense.params)
        started = time.perf_counter()
        accuracy, model = context.trained_model(cell)
        splits = context.membership_splits(cell)
        count = min(attack.members, len(splits.trained_on), len(splits.held_out))
        members = splits.trained_on.subset(_draw(len(splits.trained_on), count, "members", cell.seed))
        nonmembers = splits.held_out.subset(_draw(len(splits.held_out), count, "non-members", cell.seed))
        references, reference_results = (context.reference_models(cell, attack.reference_count)
                                         if attack.reference_count else ([], []))
        attack_started = time.perf_counter()
        model = model.cpu()
        references = [r.cpu() for r in references]
        member_scores = attack.scores(model, members.images, members.labels, references)
        nonmember_scores = attack.scores(model, nonmembers.images, nonmembers.labels, references)
        attack_seconds = time.perf_counter() - attack_started
        privacy = accuracy.get("privacy") or {}
        rule = MembershipRule(max_tpr_ratio=attack.max_tpr_ratio)
        score = score_membership(member_scores, nonmember_scores, rule=rule, delta=float(privacy.get("delta") or 0.0))
        metrics = score["metrics"]
        if privacy.get("epsilon") is not None:
            metrics["dp_tpr_bound"] = dp_tpr_bound(float(privacy["epsilon"]), float(privacy.get("delta") or 0.0),
                                                   rule.fpr)
        metrics["generalisation_gap"] = _gap(model, members, nonmembers)
        metrics["attack_seconds"] = round(attack_seconds, 3)
        if reference_results:
            metrics["reference_models"] = len(reference_results)
            metrics["reference_accuracy_mean"] = round(float(np.mean([r["accuracy"] for r in reference_results])), 4)
        return {
            **cell_identity(cell, defense),
            # the leak rate (TPR) is a rate over the members: its interval on a board is over them
            "targets": metrics["members"],
            "threat": {"setting": "membership", "shared": "the trained model (black box: its outputs)",
                       "members_from": "the records the accuracy run trained on",
                       "nonmembers_from": "the held-out split the accuracy run tests on",
                       "reference_models": ("trained without a defense on random halves of a population split "
                                            "disjoint from members and non-members" if references else None),
                       "model_trained_by": "the accuracy run under the defense (protocol defenses: the final "
                                           "global model of the protocol run, no adversary)"},
            "metrics": metrics,
            "roc": score["roc"],
            **accuracy_fields(accuracy),
            "verdict": score["verdict"],
            "device": "cpu",
            "wall_seconds": round(time.perf_counter() - started, 3),
        }

    def progress(self, metrics: dict[str, Any]) -> str:
        return f"AUC {metrics['auc']:.3f}, TPR@1%FPR {metrics['tpr_at_1%_fpr']:.1%}"


def _draw(length: int, count: int, what: str, seed: int) -> torch.Tensor:
    return torch.randperm(length, generator=torch.Generator().manual_seed(derive_seed(what, seed)))[:count]


def _gap(model: torch.nn.Module, members, nonmembers) -> float:
    """Accuracy on the members minus accuracy on the non-members: the generalisation gap attacks exploit."""
    return round(evaluate(model, members) - evaluate(model, nonmembers), 4)
