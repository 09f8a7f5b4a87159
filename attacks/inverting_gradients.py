"""Inverting Gradients (Geiping et al. 2020, "Inverting Gradients: How easy is it to break privacy in
federated learning?").

The dummy images minimise 1 - cos(dummy update, shared update), every parameter's gradient in one
vector, plus ``tv`` times their total variation (the image prior), with Adam on the sign of the
gradient, the step size divided by 10 at 3/8, 5/8 and 7/8 of the iterations, and the images clamped to
the data's range after each step. The labels are given by the threat model or read off the output
layer's gradient (iDLG) beforehand. ``restarts`` independent starts; the one whose final update is
closest in cosine distance to the shared one is kept (the distance the attacker sees).

Defaults are the paper's and its reference code's for CIFAR-10 (inversefed's ``options.py`` and
breaching's ``config/attack/invertinggradients.yaml``): 24,000 iterations, step 0.1, signed, boxed,
step decay, TV weight 1e-4 (inversefed's CIFAR default; breaching's 0.2 weighs a TV defined per pixel
with padding, not this one), one restart (both codes' default). The quick grid runs far fewer
iterations.

``engine: batched`` (the default) solves every (target, restart) of a call as instances of one
vectorised objective (``engine.build_objective``) minimised by ``BatchedAdam``: one forward/backward
per tick over all running instances, finished ones replaced by waiting ones. ``engine: reference`` runs
the same algorithm one instance at a time with ``torch.optim.Adam`` and ``MultiStepLR``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..params import Param
from ..registry import register_attack
from ..threat import IDENTITY_MAP, AttackerMap, AttackTask, Monitor, Reconstruction
from .base import Attack
from .batched_adam import BatchedAdam
from .batched_lbfgs import DIVERGED
from .dlg import analytic_labels, attacker_model, dummy_inputs
from .engine import build_objective, evaluating, fast_path, group_key, initial_row, restart_seed
from .gradient_matching import matched_distance, total_variation

#: fractions of the iterations after which the step size is multiplied by DECAY (Geiping et al. 2020,
#: sec. 4; inversefed's MultiStepLR milestones "3/8 5/8 7/8")
DECAY_AT = (3 / 8, 5 / 8, 7 / 8)
DECAY = 0.1


def box_bounds(scale: str) -> tuple[float, float]:
    """The data's range: what the box constraint clamps the dummy images to."""
    return (-1.0, 1.0) if scale == "[-1,1]" else (0.0, 1.0)


def decay_milestones(steps: int, decay: bool) -> tuple[int, ...]:
    return tuple(int(steps * f) for f in DECAY_AT) if decay else ()


@register_attack("inverting-gradients")
class InvertingGradients(Attack):
    """Cosine gradient distance + total variation, signed Adam with step decay, boxed, best of restarts."""

    # both engines replay FedAvg's local steps: build_objective and matched_distance take task.local_training
    replays_local_training = True

    params = (
        Param("batch_size", int, 1, "victim batch size attacked (a large-batch defense overrides it)", low=1),
        Param("steps", int, 24000, "Adam iterations per restart (paper and breaching: 24,000)", low=1),
        Param("lr", float, 0.1, "Adam step size (paper: 0.1)", low=1e-8),
        Param("tv", float, 1e-4, "weight of the total-variation prior (inversefed's CIFAR-10 default 1e-4)",
              low=0.0),
        Param("restarts", int, 1, "independent starts; the one with the lowest cosine distance is kept "
              "(inversefed and breaching: 1)", low=1, high=64),
        Param("signed", bool, True, "Adam on the sign of the objective's gradient (paper: true)"),
        Param("lr_decay", bool, True, "step size x0.1 at 3/8, 5/8 and 7/8 of the iterations (paper: true)"),
        Param("boxed", bool, True, "clamp the images to the data's range after each step (paper: true)"),
        Param("stop_distance", float, 0.0,
              "stop a start once its objective (attacker-visible) falls below this; 0 runs every iteration",
              low=0.0),
        Param("engine", str, "batched",
              "'batched': every target and restart of a cell in one vectorised program; "
              "'reference': one torch.optim.Adam run at a time", choices=("batched", "reference")),
        Param("slots", int, 64, "batched engine: instances advanced together", low=1),
        Param("compile", bool, "auto",
              "batched engine: torch.compile the objective; 'auto': when targets x restarts x steps reaches "
              "engine.AUTO_MIN_EVALUATIONS (falls back to eager with one warning where it cannot compile)",
              also=("auto",)),
    )

    @property
    def batches_tasks(self) -> bool:
        return self.engine == "batched"

    def labels(self, task: AttackTask) -> tuple[torch.Tensor, str]:
        """The labels the images are optimised for, and how they were obtained."""
        if task.labels is not None:
            return task.labels.reshape(-1).long(), "given"
        return analytic_labels(task), "analytic" if task.batch_size == 1 else "analytic-batch-heuristic"

    def optimiser(self, task: AttackTask) -> BatchedAdam:
        return BatchedAdam(steps=self.steps, lr=self.lr, signed=self.signed, gamma=DECAY,
                           milestones=decay_milestones(self.steps, self.lr_decay),
                           bounds=box_bounds(task.scale) if self.boxed else None, slots=self.slots,
                           stop_loss=self.stop_distance)

    # ---------------------------------------------------------------- one instance at a time
    def run_one(self, task: AttackTask, *, monitor: Monitor | None = None) -> Reconstruction:
        return self.invert_one(task, IDENTITY_MAP, monitor=monitor, engine="reference")

    def invert_one(self, task: AttackTask, space: AttackerMap, *, monitor: Monitor | None,
                   engine: str) -> Reconstruction:
        """The plain loop: each restart a ``torch.optim.Adam`` run on the dummy images, the dummy update
        mapped through ``space`` (the identity, or what an adaptive attacker replays of the defense)."""
        model = attacker_model(task)
        target = [t.detach() for t in task.shared]
        labels, method = self.labels(task)
        weight = next(model.parameters())
        onehot = F.one_hot(labels.to(weight.device), task.num_classes).to(weight.dtype)
        low, high = box_bounds(task.scale)
        starts = []
        for restart in range(self.restarts):
            x, _ = dummy_inputs(task, torch.Generator().manual_seed(restart_seed(task.seed, restart)))
            x.requires_grad_(True)
            adam = torch.optim.Adam([x], lr=self.lr)
            schedule = torch.optim.lr_scheduler.MultiStepLR(
                adam, milestones=list(decay_milestones(self.steps, self.lr_decay)), gamma=DECAY)
            good, taken, evals, stopped = x.detach().clone(), 0, 0, "steps"
            for _ in range(self.steps):
                value = matched_distance(model, x, onehot, target, space, cosine=True, local=task.local_training)
                if self.tv:
                    value = value + self.tv * total_variation(x)
                grad, = torch.autograd.grad(value, [x])
                evals += 1
                value = value.detach()
                if not (math.isfinite(float(value)) and bool(torch.isfinite(grad).all())):
                    stopped = DIVERGED
                    break
                good = x.detach().clone()
                if self.stop_distance > 0 and float(value) < self.stop_distance:
                    stopped = "converged"
                    break
                x.grad = grad.sign() if self.signed else grad
                adam.step()
                schedule.step()
                if self.boxed:
                    with torch.no_grad():
                        x.clamp_(low, high)
                taken += 1
                if monitor is not None and restart == 0:
                    monitor(taken, x.detach(), labels)
            final = good if stopped == DIVERGED else x.detach().clone()
            starts.append((final, taken, evals, stopped))
        with torch.enable_grad():
            scores = [float(matched_distance(model, final, onehot, target, space, cosine=True, create_graph=False,
                                           local=task.local_training))
                      for final, *_ in starts]
        return self._pick(starts, scores, labels, method, engine)

    def _pick(self, starts, scores: Sequence[float], labels: torch.Tensor, method: str,
              engine: str) -> Reconstruction:
        """The start closest in cosine distance to the shared update (inversefed's 'loss' scoring)."""
        finite = [s if math.isfinite(s) else math.inf for s in scores]
        best = min(range(len(starts)), key=finite.__getitem__)
        images, _, _, stopped = starts[best]
        return Reconstruction(images, labels, sum(s[1] for s in starts), sum(s[2] for s in starts), finite[best],
                              stopped == DIVERGED, method,
                              extra={"engine": engine, "stopped": stopped, "restarts": len(starts),
                                     "chosen_restart": best})

    # ---------------------------------------------------------------- the batched engine
    def run(self, tasks, *, monitors=None):
        if self.engine == "reference" or not tasks:
            return super().run(tasks, monitors=monitors)
        monitors = list(monitors) if monitors is not None else [None] * len(tasks)
        out: list[Reconstruction | None] = [None] * len(tasks)
        groups: dict[tuple, list[int]] = {}
        for i, task in enumerate(tasks):
            groups.setdefault((group_key(task), task.scale), []).append(i)
        for members in groups.values():
            recs = self._solve_group([tasks[i] for i in members], [monitors[i] for i in members])
            for i, rec in zip(members, recs):
                out[i] = rec
        return out  # type: ignore[return-value]

    def _solve_group(self, tasks: list[AttackTask], monitors: list[Monitor | None]) -> list[Reconstruction]:
        """Every (task, restart) as one instance of one objective, minimised by one BatchedAdam."""
        r = self.restarts
        instances = [t for t in tasks for _ in range(r)]
        labelled = [self.labels(t) for t in tasks]
        weight = next(tasks[0].model.parameters())
        x0 = torch.stack([initial_row(t, restart_seed(t.seed, k), False) for t in tasks for k in range(r)])
        x0 = x0.to(weight.device, weight.dtype)
        with evaluating(tasks):
            objective = build_objective(instances, [lab for lab, _ in labelled for _ in range(r)],
                                        compile=fast_path(self.compile, len(instances) * self.steps),
                                        distance="cosine", tv=self.tv)

            def on_step(inst: int, step: int, row: torch.Tensor) -> None:
                task_index, restart = divmod(inst, r)
                if restart == 0 and monitors[task_index] is not None:  # the evaluator follows the first start
                    monitors[task_index](step, objective.split(row[None])[0][0].detach(), labelled[task_index][0])

            result = self.optimiser(tasks[0]).minimize(
                objective, x0, on_step=on_step if any(m is not None for m in monitors) else None)
            ids = torch.arange(len(instances), device=x0.device)
            scores = torch.cat([objective.scores(ids[i:i + self.slots], result.x[i:i + self.slots])
                                for i in range(0, len(instances), self.slots)]).tolist()
        images, _ = objective.split(result.x)
        recs = []
        for i, (labels, method) in enumerate(labelled):
            rows = range(i * r, (i + 1) * r)
            starts = [(images[k].detach().clone(), int(result.steps[k]), int(result.evals[k]), result.status[k])
                      for k in rows]
            recs.append(self._pick(starts, [scores[k] for k in rows], labels, method, "batched"))
        return recs
