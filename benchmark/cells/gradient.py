"""Gradient cells (FedSGD, one shared update): each target is a private batch; the victim computes its
update on the shared weights, the defense transforms what is shared, and the attack reconstructs the batch
from it. The cell scores every reconstruction against its matched original (MSE, PSNR, SSIM, labels),
joins the accuracy run of the defense setting, and keeps the images.

Cells of a grid that batches cells (``batch_cells``, on by default) whose attack solves many tasks in one
engine program, and that differ only in their defense setting, run as one program: their targets attack
one architecture and, at a random init, the same weights (a target's model depends on the seed and the
target, not on the defense; pretrained weights differ per defense and are batched as per-instance
weights), so the engine batches them as the speed issue asks ("defense settings that share a model").
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ..data import ImageData
from ..errors import ConfigError
from ..models import output_width
from ..registry import ATTACKS, DEFENSES, register_cell_kind
from ..scoring.reconstruction import censored_median, match_reconstructions, score_reconstruction
from ..scoring.update import update_distortion
from ..seeding import config_hash, derive_seed
from ..storage import atomic_write_torch, computed_once
from ..threat import AttackTask, local_training_of, parameter_gradients, threat_settings
from ..training import train_with_defense
from .base import RECORD_RECONSTRUCTION, CellContext, CellKind, TableColumn, accuracy_fields, cell_identity

if TYPE_CHECKING:  # pragma: no cover
    from ..run.grid import Cell, Grid

CONVERGED_MSE = 1e-3  # a batch counts as recovered once every matched sample is below this MSE
# DLG Table 2's "iterations required" as measured here: the first attack iteration (an L-BFGS step; for
# dlg-batched a cyclic step of eq. 5) after which every sample of the private batch, matched one-to-one
# to the reconstructions, is within CONVERGED_MSE of it on the [0, 1] scale; checked after every
# iteration. The evaluator's measurement (it uses the true batch): the attack never sees it.
RECOVERY_CHECK_EVERY = 1
RECOVERY_RULE = (f"first iteration with every matched sample at MSE < {CONVERGED_MSE:g} ([0, 1] scale), "
                 f"checked every {RECOVERY_CHECK_EVERY} iteration")
IMAGE_METRICS = ("mse", "psnr", "ssim")  # what score_reconstruction computes per sample


@register_cell_kind("gradient")
class GradientCells(CellKind):
    """One shared update per target (FedSGD): reconstruct the private batch from it."""

    threat_model = RECORD_RECONSTRUCTION
    columns = (TableColumn("PSNR", "psnr_median", pool="median", style="decibel"),)
    board_scores = (("psnr_median", 3), ("ssim_median", 4))

    def identity(self, cell: "Cell", grid: "Grid") -> dict[str, Any]:
        return {
            "attack": cell.attack.as_dict(), "defense": cell.defense.as_dict(),
            "dataset": cell.dataset.as_dict(), "model": cell.model.as_dict(), "seed": cell.seed,
            "targets": grid.targets, "split": grid.split, "threat": dict(grid.threat),
            "accuracy": grid.accuracy.as_dict(), "verdict": vars(grid.verdict),
            # batching changes a float32 trajectory's rounding, so a cell run alone is another result
            **({} if grid.batch_cells else {"batch_cells": False}),
        }

    def validate(self, grid: "Grid") -> None:
        if grid.verdict.metric not in IMAGE_METRICS:
            raise ConfigError(f"grid: verdict.metric = {grid.verdict.metric!r} cannot judge image reconstructions; "
                              f"allowed: {', '.join(IMAGE_METRICS)}")
        local = [k for k in ("local_steps", "local_batch_size") if k in grid.threat]  # kept only when not default
        replaying = [n for n in ATTACKS.list() if getattr(ATTACKS.get(n), "replays_local_training", False)]
        for spec in grid.attacks if local else ():
            if spec.name not in replaying:
                raise ConfigError(f"grid: attack {spec.name!r} does not replay federated averaging's local steps "
                                  f"(threat.{local[0]} = {grid.threat[local[0]]!r}); allowed: {', '.join(replaying)}")

    def program_key(self, cell: "Cell") -> str | None:
        """Cells with the same key run as one engine program (see the module's docstring)."""
        if not cell.grid.batch_cells:
            return None
        if not ATTACKS.build(cell.attack.name, cell.attack.params).batches_tasks:
            return None
        return config_hash({**cell.config(), "defense": None, "grid": cell.grid.name})

    def preflight(self, context: CellContext, cells: list["Cell"]) -> None:
        """Each cell draws ``targets`` disjoint private batches from its split: there must be enough."""
        for cell in cells:
            grid = cell.grid
            data = context.dataset(cell.dataset, grid.split)
            attack = ATTACKS.build(cell.attack.name, cell.attack.params)
            defense = DEFENSES.build(cell.defense.name, cell.defense.params)
            batch = defense.victim_batch_size(attack.victim_batch_size())
            others = (defense.aggregated_clients() - 1) * batch  # the other clients of a secure aggregate
            if grid.targets * batch + others > len(data):
                raise ConfigError(
                    f"grid: targets = {grid.targets} is too many for {cell.attack.name} vs {defense.label()} on "
                    f"{cell.dataset.name}/{grid.split}: {grid.targets} private batches of {batch}"
                    f"{f' and {others} samples of the other clients' if others else ''} need "
                    f"{grid.targets * batch + others} samples, the split has {len(data)}; allowed: targets <= "
                    f"{max(0, (len(data) - others) // batch)}")

    def progress(self, metrics: dict[str, Any]) -> str:
        return f"PSNR {metrics['psnr_median']:.1f} dB"

    def run(self, context: CellContext, cells: list["Cell"]) -> list[dict[str, Any]]:
        """Records of gradient cells that share an attack (one engine call for all their targets)."""
        attack = ATTACKS.build(cells[0].attack.name, cells[0].attack.params)
        setups = [self._setup(context, cell, attack) for cell in cells]
        started = time.perf_counter()
        reconstructions = attack.run([t for s in setups for t in s.tasks],
                                     monitors=[m for s in setups for m in s.monitors])
        attack_seconds = time.perf_counter() - started
        accuracies = self._fill_accuracies(context, cells)
        records, offset = [], 0
        total_evals = sum(r.closure_evals for r in reconstructions) or 1
        for setup in setups:
            recs = reconstructions[offset:offset + len(setup.tasks)]
            offset += len(setup.tasks)
            # the program's time, shared by the cells in proportion to their objective evaluations
            share = attack_seconds * sum(r.closure_evals for r in recs) / total_evals
            accuracy, waited = accuracies[setup.cell.key()]
            records.append(self._record(context, setup, recs, share + waited, accuracy=accuracy,
                                        program_cells=len(cells)))
        return records

    @staticmethod
    def _fill_accuracies(context: CellContext, cells: list["Cell"]) -> dict[str, tuple[dict[str, Any], float]]:
        """Compute the cells' accuracy entries, first those no other worker is computing: two workers
        that need the same settings then work on different ones instead of queueing behind each other.
        Returns each cell's entry and the seconds it waited for it (part of its wall time, as for a
        lone cell)."""
        out: dict[str, tuple[dict[str, Any], float]] = {}
        waiting = []
        for cell in cells:
            started = time.perf_counter()
            entry = context.accuracy(cell, wait=False)
            out[cell.key()] = (entry, time.perf_counter() - started)
            if entry is None:
                waiting.append(cell)
        for cell in waiting:
            started = time.perf_counter()
            entry = context.accuracy(cell)
            out[cell.key()] = (entry, out[cell.key()][1] + time.perf_counter() - started)
        return out

    def _setup(self, context: CellContext, cell: "Cell", attack) -> "_GradientSetup":
        started = time.perf_counter()
        grid = cell.grid
        defense = DEFENSES.build(cell.defense.name, cell.defense.params)
        data = context.dataset(cell.dataset, grid.split)
        batch = defense.victim_batch_size(attack.victim_batch_size())
        need = grid.targets * batch
        if need > len(data):
            raise ValueError(f"{cell.dataset.name}/{grid.split} has {len(data)} samples, the cell needs {need}")
        # the same private batches for every defense and attack of a (dataset, seed, batch size)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(derive_seed("targets", cell.seed)))
        device = context.device
        setup = _GradientSetup(cell, defense, data, batch)
        clients = defense.aggregated_clients()
        local = local_training_of(grid.threat, clients)
        bn_mode = threat_settings(grid.threat)["bn_mode"]
        for t in range(grid.targets):
            idx = order[t * batch:(t + 1) * batch]
            if clients > 1:  # secure aggregation: the other clients' samples, disjoint from every victim's
                rest = order[grid.targets * batch:]
                pick = torch.randperm(len(rest), generator=torch.Generator().manual_seed(
                    derive_seed("other-clients", cell.seed, t)))[:(clients - 1) * batch]
                idx = torch.cat([idx, rest[pick]])
            x, y = data.images[idx].to(device), data.labels[idx].to(device)
            model = context.make_model(cell, data, derive_seed("model", cell.seed, t))
            if grid.threat["model_state"] == "trained" and grid.threat["train_steps"] > 0:
                self._pretrain(context, model, defense, cell, grid.threat["train_steps"], t)
            g = torch.Generator().manual_seed(derive_seed("defense", cell.seed, t, cell.defense.as_dict()))
            classes = output_width(model, data.shape)  # the attacker knows the model, so its output width
            soft = F.one_hot(y, classes).float()
            victim = _victim_model(model, bn_mode)  # one copy (resnet18: 11M parameters) for both updates
            shared = defense.share_after_local_training(victim, x, soft, local, generator=g)
            setup.distortions.append(update_distortion(
                _own_undefended_update(victim, x[:batch], soft[:batch], grid.threat), shared))
            setup.tasks.append(AttackTask(model=_attacker_model(model, bn_mode), shared=shared,
                                          input_shape=data.shape,
                                          num_classes=classes, batch_size=len(x), scale=data.scale,
                                          labels=y.clone() if grid.threat["labels_known"] else None,
                                          defense_params=defense.get_params(),
                                          defense_name=defense.registry_name,
                                          attacker_map=defense.attacker_map(shared),
                                          seed=derive_seed("attack", cell.seed, t),
                                          local_training=None if local.fedsgd(batch) else local))
            x, y = x[:batch], y[:batch]  # the victim's own samples are what a leak is measured on
            setup.truths.append((x, y))
            setup.converge_steps.append(None)
            setup.monitors.append(self._convergence_monitor(data, x, setup.converge_steps, t))
        setup.seconds = time.perf_counter() - started
        return setup

    def _record(self, context: CellContext, setup: "_GradientSetup", reconstructions, attack_seconds: float, *,
                         accuracy: dict[str, Any], program_cells: int) -> dict[str, Any]:
        started = time.perf_counter()
        cell, defense, data = setup.cell, setup.defense, setup.data
        grid = cell.grid
        per_sample: dict[str, list] = {k: [] for k in ("mse", "psnr", "ssim", "label_correct")}
        per_target: dict[str, list] = {k: [] for k in ("closure_evals", "steps", "grad_distance", "diverged",
                                                       "iterations_to_recover", "label_method")}
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
            per_target["iterations_to_recover"].append(conv)
            per_target["label_method"].append(rec.label_method)
            perm = match_reconstructions(recon_unit, orig_unit)
            originals.append(orig_unit)
            recons.append(recon_unit[perm])

        for k in ("gradient_rms", "relative_distortion"):
            per_target[k] = [d[k] for d in setup.distortions]
        rule = grid.verdict
        leak_flags = rule.recognisable(per_sample[rule.metric])
        leak_rate = sum(leak_flags) / len(leak_flags)
        key = cell.key()
        context.save_samples(key, torch.cat(originals), torch.cat(recons))
        record = {
            **cell_identity(cell, defense),
            "targets": grid.targets,
            "threat": self._threat_record(setup),
            "metrics": {
                "leak_rate": leak_rate,
                "mse_median": statistics.median(per_sample["mse"]),
                "psnr_median": statistics.median(per_sample["psnr"]),
                "ssim_median": statistics.median(per_sample["ssim"]),
                "label_accuracy": (statistics.mean(per_sample["label_correct"])
                                   if per_sample["label_correct"] else None),
                "recovered_rate": sum(m < CONVERGED_MSE for m in per_sample["mse"]) / len(per_sample["mse"]),
                "closure_evals_mean": statistics.mean(per_target["closure_evals"]),
                "iterations_to_recover_median": censored_median(per_target["iterations_to_recover"]),
                "diverged": sum(per_target["diverged"]),
                "gradient_rms_median": statistics.median(per_target["gradient_rms"]),
                "relative_distortion_median": _median_of_known(per_target["relative_distortion"]),
            },
            "per_sample": {**per_sample, "recognisable": leak_flags},
            "per_target": per_target,
            "recovery_rule": RECOVERY_RULE,
            **accuracy_fields(accuracy),
            "verdict": {"defended": rule.defended(leak_rate), "rule": rule.describe(),
                        "metric": rule.metric, "threshold": rule.threshold, "max_leak_rate": rule.max_leak_rate},
            "device": context.device,
            # this cell's setup, accuracy entry and scoring, plus its share of the program's attack time
            "wall_seconds": round(setup.seconds + attack_seconds + time.perf_counter() - started, 3),
            "program_cells": program_cells,  # cells whose targets ran in the same engine program
        }
        return record

    @staticmethod
    def _threat_record(setup: "_GradientSetup") -> dict[str, Any]:
        """What the victim did and what the attacker was given (every threat key, defaults filled in)."""
        grid, clients = setup.cell.grid, setup.defense.aggregated_clients()
        threat = threat_settings(grid.threat)
        fedsgd = local_training_of(grid.threat).fedsgd(setup.batch)
        if not any(isinstance(m, _BatchNorm) for m in setup.tasks[0].model.modules()):
            bn_given = None
        elif threat["bn_mode"] == "eval":
            bn_given = "the victim's running statistics, with the weights"
        else:
            bn_given = "nothing: it normalises its dummies by their own batch statistics, as the victim did"
        return {**threat, "setting": "gradient", "batch_size": setup.batch, "weights": "shared",
                "shared": "gradient" if fedsgd else "averaged local update (w0 - w_steps) / local_lr",
                "local_lr": None if threat["local_steps"] == 1 else threat["local_lr"],
                "aggregated_clients": clients, "attacked_batch_size": setup.batch * clients,
                "batchnorm_given_to_attacker": bn_given,
                "labels_given_to_attacker": grid.threat["labels_known"]}

    def _pretrain(self, context: CellContext, model, defense, cell: "Cell", steps: int, target: int) -> None:
        """Threat model 'trained': the shared weights are those after ``steps`` training steps under the
        defense (the attack can happen at any time during training). They do not depend on the attack,
        so they are cached on disk per (dataset, model, defense, seed, target, steps, training config):
        every attack on the setting, in any worker, reuses one training run."""
        key_obj = {"dataset": cell.dataset.as_dict(), "model": cell.model.as_dict(),
                   "defense": cell.defense.as_dict(), "seed": cell.seed, "target": target, "steps": steps,
                   "accuracy": cell.grid.accuracy.as_dict(), "data_dir": context.data_key}

        def compute() -> dict[str, torch.Tensor]:
            train = context.dataset(cell.dataset, "train")
            train_with_defense(model, defense, train, train.subset(torch.arange(min(64, len(train)))),
                               cell.grid.accuracy, seed=derive_seed("pretrain", cell.seed, target),
                               max_steps=steps)
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

        state = computed_once(context.cache_dir / "pretrained" / f"{config_hash(key_obj)}.pt", compute,
                              read=lambda p: torch.load(p, weights_only=True), write=atomic_write_torch)
        model.load_state_dict(state)

    @staticmethod
    def _convergence_monitor(data: ImageData, x: torch.Tensor, sink: list, t: int) -> Callable:
        """Records the first iteration at which every reconstruction of target ``t`` is within
        CONVERGED_MSE of its matched original (RECOVERY_RULE; ground truth stays on the evaluator's side)."""
        truth = data.to_unit(x.detach().cpu())

        def monitor(step: int, images: torch.Tensor, labels) -> None:
            if sink[t] is not None or step % RECOVERY_CHECK_EVERY:
                return
            recon = data.to_unit(images.detach().cpu()).clamp(0, 1)
            perm = match_reconstructions(recon, truth)
            mse = ((recon[perm] - truth) ** 2).flatten(1).mean(1)
            if bool((mse < CONVERGED_MSE).all()):
                sink[t] = step

        return monitor


def _median_of_known(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _running_statistics(model: torch.nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())


def _victim_model(model: torch.nn.Module, bn_mode: str) -> torch.nn.Module:
    """The model the victim computes its update with. BatchNorm with running statistics normalises by the
    batch's statistics in train mode (and updates its running ones: a copy keeps the shared model's) or
    by the running statistics in eval mode. Models without running statistics are used as they are."""
    if not _running_statistics(model):
        return model
    return copy.deepcopy(model).train(bn_mode == "train")


def _attacker_model(model: torch.nn.Module, bn_mode: str) -> torch.nn.Module:
    """The model the attacker is given. In eval mode it holds the running statistics the victim used;
    in train mode the attacker normalises its dummies by their own batch statistics, as the victim did
    (the victim's batch statistics are not shared): its BatchNorm layers lose their running buffers, so
    they use batch statistics in any mode, as the engine's functional calls need."""
    if not _running_statistics(model) or bn_mode == "eval":
        return model
    from torch.func import replace_all_batch_norm_modules_

    return replace_all_batch_norm_modules_(copy.deepcopy(model))


def _own_undefended_update(model: torch.nn.Module, x: torch.Tensor, soft: torch.Tensor, threat: dict
                           ) -> list[torch.Tensor]:
    """What the victim alone would share without a defense under the grid's threat (one gradient, or its
    federated-averaging update): the reference of ``relative_distortion``, so secure aggregation's mixing
    counts as distortion too."""
    local = local_training_of(threat, 1)
    if local.fedsgd(len(x)):
        return parameter_gradients(model, x, soft)
    return DEFENSES.build("none").share_after_local_training(model, x, soft, local)


@dataclass
class _GradientSetup:
    """A gradient cell's tasks and what scoring them needs, built before the attack runs."""

    cell: "Cell"
    defense: Any
    data: ImageData
    batch: int
    tasks: list[AttackTask] = field(default_factory=list)
    truths: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    monitors: list[Callable] = field(default_factory=list)
    converge_steps: list[int | None] = field(default_factory=list)
    distortions: list[dict] = field(default_factory=list)  # per target: scoring.update.update_distortion
    seconds: float = 0.0
