"""Text gradient cells (DLG Section 4.2): each target is one sentence of a text dataset. The victim masks
15% of its tokens (seeded), computes the masked-LM loss's gradient with the shared weights, the defense
transforms what is shared (noise, pruning and quantization act on it as on an image model's gradient),
and the attack recovers the sentence from it. The cell scores token accuracy and exact match per
sentence and keeps the recovered text after the steps Table 1 shows, in the record itself."""
from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models import MaskedLMVictim
from ..registry import ATTACKS, DEFENSES, MODELS, register_cell_kind
from ..scoring.text import score_tokens
from ..seeding import derive_seed
from ..text import TextData
from ..threat import THREAT_EXTRAS, TextAttackTask
from .base import (
    RECORD_RECONSTRUCTION,
    CellContext,
    CellKind,
    TableColumn,
    accuracy_fields,
    cell_identity,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..run.grid import Cell, Grid

MASKED_FRACTION = 0.15  # BERT's and the paper's: "15% of the words are replaced with a [MASK] token"
TEXT_METRICS = ("token_accuracy", "exact_match")


def masked_positions(length: int, generator: torch.Generator) -> torch.Tensor:
    """15% (at least one) of a sentence's own positions, [CLS] and [SEP] excluded, drawn from ``generator``."""
    inner = length - 2
    count = max(1, round(MASKED_FRACTION * inner))
    return 1 + torch.randperm(inner, generator=generator)[:count].sort().values


@register_cell_kind("text-gradient")
class TextGradientCells(CellKind):
    """One shared masked-LM update per sentence: recover the sentence from it."""

    threat_model = RECORD_RECONSTRUCTION
    columns = (TableColumn("token acc", "token_accuracy_mean"), TableColumn("exact", "exact_match_rate"))
    board_scores = (("token_accuracy_mean", 4), ("exact_match_rate", 4))

    def identity(self, cell: Cell, grid: Grid) -> dict[str, Any]:
        return {"attack": cell.attack.as_dict(), "defense": cell.defense.as_dict(),
                "dataset": cell.dataset.as_dict(), "model": cell.model.as_dict(), "seed": cell.seed,
                "targets": grid.targets, "split": grid.split, "threat": dict(grid.threat),
                "verdict": vars(grid.verdict), "masked_fraction": MASKED_FRACTION}

    def validate(self, grid: Grid) -> None:
        if grid.verdict.metric not in TEXT_METRICS:
            raise ConfigError(f"grid: verdict.metric = {grid.verdict.metric!r} cannot judge text attacks; allowed: "
                              f"{', '.join(TEXT_METRICS)} (e.g. verdict: {{metric: token_accuracy, threshold: 0.5}})")
        if grid.threat["model_state"] != "random-init":
            raise ConfigError(f"grid: threat.model_state = {grid.threat['model_state']!r} is not supported by text "
                              f"attacks; allowed: 'random-init' (as in the paper)")
        for param in THREAT_EXTRAS:  # FedSGD only: the text victim shares one gradient
            if param.name in grid.threat:  # (a grid keeps these keys only when they are not the default)
                raise ConfigError(f"grid: threat.{param.name} = {grid.threat[param.name]!r} is not supported by text "
                                  f"attacks; allowed: {param.default!r} (one gradient, as in the paper)")
        for spec in grid.defenses:
            if DEFENSES.build(spec.name, spec.params).aggregated_clients() > 1:
                raise ConfigError(f"grid: defense {spec.name} {spec.params} aggregates several clients, which text "
                                  f"attacks do not simulate; allowed: defenses of one client")

    def preflight(self, context: CellContext, cells: list[Cell]) -> None:
        """Text data, enough sentences, one sentence per victim batch, and a model long enough."""
        for cell in cells:
            grid = cell.grid
            data = context.dataset(cell.dataset, grid.split)
            if not isinstance(data, TextData):
                raise ConfigError(f"grid: attack {cell.attack.name!r} needs a text dataset, {cell.dataset.name!r} is "
                                  f"not one; allowed: a dataset of modality 'text' (e.g. table1-sentences)")
            if grid.targets > len(data):
                raise ConfigError(f"grid: targets = {grid.targets} is too many for {cell.dataset.name}: it has "
                                  f"{len(data)} sentences; allowed: targets <= {len(data)}")
            defense = DEFENSES.build(cell.defense.name, cell.defense.params)
            if defense.victim_batch_size(1) != 1:
                raise ConfigError(f"grid: defense {defense.label()!r} changes the victim's batch, which text attacks "
                                  f"do not support; allowed: defenses that transform one sentence's update")
            spec = MODELS.build(cell.model.name, cell.model.params)
            positions = getattr(spec, "max_positions", None)
            if positions is None:
                raise ConfigError(f"grid: model {cell.model.name!r} is not a masked language model; allowed with "
                                  f"{cell.attack.name!r}: bert-mlm")
            if data.shape[0] > positions:
                raise ConfigError(f"grid: model {cell.model.name!r} max_positions = {positions} is too short for "
                                  f"{cell.dataset.name} ({data.shape[0]} tokens); allowed: >= {data.shape[0]}")

    def progress(self, metrics: dict[str, Any]) -> str:
        return f"token acc {100 * metrics['token_accuracy_mean']:.0f}%"

    def run_one(self, context: CellContext, cell: Cell) -> dict[str, Any]:
        started = time.perf_counter()
        grid = cell.grid
        attack = ATTACKS.build(cell.attack.name, cell.attack.params)
        defense = DEFENSES.build(cell.defense.name, cell.defense.params)
        data = context.dataset(cell.dataset, grid.split)
        vocabulary = data.vocabulary
        per_target: dict[str, list] = {k: [] for k in (
            "text", "recovered", "history", "token_accuracy", "exact_match", "masked", "grad_distance",
            "closure_evals", "steps", "diverged")}
        for t in range(grid.targets):
            ids = torch.tensor(data.token_ids[t], device=context.device)
            positions = masked_positions(len(ids), torch.Generator().manual_seed(derive_seed("mask", cell.seed, t)))
            masked = ids.clone()
            masked[positions] = vocabulary.mask_id
            model = context.make_model(cell, data, derive_seed("model", cell.seed, t))
            victim = MaskedLMVictim(model, positions.to(context.device))
            g = torch.Generator().manual_seed(derive_seed("defense", cell.seed, t, cell.defense.as_dict()))
            shared = defense.share(victim, masked[None], F.one_hot(ids[positions], data.num_classes).float(),
                                   generator=g)
            task = TextAttackTask(model=model, shared=shared, sequence_length=len(ids), masked_count=len(positions),
                                  mask_token_id=vocabulary.mask_id, defense_params=defense.get_params(),
                                  defense_name=defense.registry_name, seed=derive_seed("attack", cell.seed, t))
            rec = attack.run([task])[0]
            scores = score_tokens(rec.token_ids, data.token_ids[t])
            per_target["text"].append(data.texts[t])
            per_target["recovered"].append(vocabulary.decode(rec.token_ids))
            per_target["history"].append({str(step): vocabulary.decode(tokens) for step, tokens in rec.history.items()})
            per_target["token_accuracy"].append(scores["token_accuracy"])
            per_target["exact_match"].append(scores["exact_match"])
            per_target["masked"].append(vocabulary.pieces(ids[positions].tolist()))
            per_target["grad_distance"].append(rec.grad_distance)
            per_target["closure_evals"].append(rec.closure_evals)
            per_target["steps"].append(rec.steps)
            per_target["diverged"].append(rec.diverged)
        rule = grid.verdict
        leak_flags = rule.recognisable(per_target[rule.metric])
        leak_rate = sum(leak_flags) / len(leak_flags)
        return {
            **cell_identity(cell, defense),
            # no accuracy column: the masked LM is not trained here (the paper attacks it at its random init)
            **accuracy_fields({"accuracy": None}),
            "targets": grid.targets,
            "threat": {**grid.threat, "setting": "text-gradient", "batch_size": 1, "shared": "gradient",
                       "weights": "shared", "masked_fraction": MASKED_FRACTION, "labels_given_to_attacker": False},
            "metrics": {
                "leak_rate": leak_rate,
                "token_accuracy_mean": statistics.mean(per_target["token_accuracy"]),
                "exact_match_rate": statistics.mean(per_target["exact_match"]),
                "closure_evals_mean": statistics.mean(per_target["closure_evals"]),
                "diverged": sum(per_target["diverged"]),
            },
            "per_target": {**per_target, "recognisable": leak_flags},
            "verdict": {"defended": rule.defended(leak_rate), "rule": rule.describe(), "metric": rule.metric,
                        "threshold": rule.threshold, "max_leak_rate": rule.max_leak_rate},
            "device": context.device,
            "wall_seconds": round(time.perf_counter() - started, 3),
        }
