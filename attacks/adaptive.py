"""Adaptive gradient-matching attacks: DLG and iDLG that know the defense, as a leaderboard must assume
(the defense's code and public parameters are known; its randomness is not).

What each one adapts to is the defense's own description of its deterministic part
(``Defense.attacker_map``, handed over in ``AttackTask.attacker_map``): the dummy gradient is mapped
through it before it is compared with the shared update, so the match happens in the defense's output
space. Pruning describes the coordinates that survived; quantization replays its rounding with a
straight-through estimator; noise, and a submitted defense that does not opt in, describe the identity.
No defense is recognised by its name.

The generic part, for every defense: ``restarts`` dummy initialisations times a small sweep of L-BFGS step
sizes, plus one run on the cosine distance (Geiping et al. 2020's scale-invariant objective), keeping the
run whose final dummy update is closest in cosine distance to the shared one. That distance is what the
attacker sees; the choice never looks at the private data. Where a defense's transform is not
differentiable the replayed map passes gradients straight through (BPDA, Athalye et al. 2018); where it is
random the replay averages fresh draws (EOT); both break the gradient-obfuscation defenses of the kind
Balunovic et al. 2022 and Wu et al. 2023 ("Learning to invert") attacked.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..params import Param
from ..registry import register_attack
from ..threat import IDENTITY_MAP, AttackTask, Monitor, Reconstruction
from .base import Attack
from .dlg import analytic_labels, attacker_model, dummy_inputs
from .engine import restart_seed
from .gradient_matching import LBFGSRun, matched_distance, run_steps
from .inverting_gradients import InvertingGradients


class _Adaptive(Attack):
    adaptive: ClassVar[bool] = True  # marks attacks that use what the threat model reveals of the defense
    label_method: ClassVar[str] = ""
    replays_local_training = True  # matched_distance replays FedAvg's local steps (task.local_training)

    params = (
        Param("batch_size", int, 1, "victim batch size attacked (a large-batch defense overrides it)", low=1),
        Param("steps", int, 300, "L-BFGS steps per run (each run: one restart at one step size)", low=1),
        Param("restarts", int, 2, "dummy initialisations per step size", low=1, high=64),
        Param("lr_sweep", list, [1.0, 0.1], "L-BFGS step sizes tried"),
        Param("max_iter", int, 20, "objective evaluations per L-BFGS step at most", low=1),
        Param("history_size", int, 100, "L-BFGS history", low=1),
        Param("stop_distance", float, 0.0, "stop a run once its gradient distance falls below this", low=0.0),
        Param("cosine_restart", bool, True,
              "one more run that minimises the cosine distance (scale-invariant, as Inverting Gradients) "
              "at the first step size"),
    )

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        lrs = self.lr_sweep
        if (not isinstance(lrs, (list, tuple)) or not lrs
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in lrs)):
            raise ConfigError(f"{self.owner_name()}: parameter 'lr_sweep' = {lrs!r} is invalid; "
                              f"allowed: a non-empty list of numbers > 0")
        self.lr_sweep = [float(v) for v in lrs]

    def _labels(self, task: AttackTask) -> torch.Tensor | None:
        """Labels fixed before the search (iDLG), or None when they are optimised with the images."""
        return None

    def run_one(self, task: AttackTask, *, monitor: Monitor | None = None) -> Reconstruction:
        space = task.attacker_map or IDENTITY_MAP
        model = attacker_model(task)
        target = [t.detach() for t in task.shared]
        fixed_labels = self._labels(task)
        best: dict | None = None
        total_evals, total_steps = 0, 0
        runs = [(restart, lr, False) for restart in range(self.restarts) for lr in self.lr_sweep]
        if self.cosine_restart:
            runs.append((self.restarts, self.lr_sweep[0], True))
        for restart, lr, cosine in runs:
            # the same dummy for every step size of one restart, a new one per restart
            g = torch.Generator().manual_seed(restart_seed(task.seed, restart))
            x, logits = dummy_inputs(task, g)
            x.requires_grad_(True)
            if fixed_labels is None:
                logits.requires_grad_(True)
                variables = [x, logits]
                labels_now = lambda: logits.detach().argmax(-1)  # noqa: E731
                soft = lambda: F.softmax(logits, -1)  # noqa: E731
            else:
                onehot = F.one_hot(fixed_labels.to(x.device), task.num_classes).float()
                variables = [x]
                labels_now = lambda: fixed_labels  # noqa: E731
                soft = lambda: onehot  # noqa: E731
            run = LBFGSRun(variables, lambda: matched_distance(model, x, soft(), target, space, cosine=cosine,
                                                          local=task.local_training),
                           lr=lr, max_iter=self.max_iter, history_size=self.history_size)
            steps = run_steps([run], self.steps, lambda i: 0, lambda: (x.detach(), labels_now()), None,
                              self.stop_distance)
            total_evals += run.closure_evals
            total_steps += steps
            # attacker-visible choice between runs: the cosine distance of each run's final dummy update
            # (comparable across the two objectives and scale-invariant), never the private data
            with torch.enable_grad():
                final = math.inf if run.diverged else float(matched_distance(
                    model, x.detach(), soft().detach(), target, space, cosine=True, create_graph=False,
                    local=task.local_training))
            distance = final if math.isfinite(final) else math.inf
            if best is None or distance < best["distance"]:
                best = {"distance": distance, "images": x.detach().clone(), "labels": labels_now(),
                        "diverged": run.diverged, "restart": restart, "lr": lr, "objective":
                        "cosine" if cosine else "l2"}
        assert best is not None
        if monitor is not None:
            monitor(total_steps, best["images"], best["labels"])
        return Reconstruction(best["images"], best["labels"], total_steps, total_evals, best["distance"],
                              best["diverged"], self.label_method,
                              extra={"adapted_to": space.name, "chosen_restart": best["restart"],
                                     "chosen_lr": best["lr"], "chosen_objective": best["objective"]})


@register_attack("dlg-adaptive")
class AdaptiveDLG(_Adaptive):
    """DLG that matches in the defense's output space, with restarts and a step-size sweep."""

    label_method = "optimised"


@register_attack("idlg-adaptive")
class AdaptiveIDLG(_Adaptive):
    """iDLG (analytic labels) that matches in the defense's output space, with restarts and a step-size sweep."""

    label_method = "analytic"

    def _labels(self, task: AttackTask) -> torch.Tensor:
        return analytic_labels(task)


@register_attack("inverting-gradients-adaptive")
class AdaptiveInvertingGradients(InvertingGradients):
    """Inverting Gradients matching in the defense's output space: its cosine distance is taken between
    the shared update and the dummy update mapped through ``Defense.attacker_map`` (rescaling is already
    invisible to it; pruning masks and rounding are replayed), one start at a time (a replayed map may
    run in the submission sandbox, outside any vectorised program). Defaults as ``inverting-gradients``
    but 2 restarts, as the other adaptive attacks."""

    adaptive: ClassVar[bool] = True
    params = tuple(Param("restarts", int, 2, p.help, low=1, high=64) if p.name == "restarts" else p
                   for p in InvertingGradients.params if p.name not in ("engine", "slots", "compile"))
    engine = "reference"
    compile = False

    def run_one(self, task: AttackTask, *, monitor: Monitor | None = None) -> Reconstruction:
        space = task.attacker_map or IDENTITY_MAP
        rec = self.invert_one(task, space, monitor=monitor, engine="reference")
        rec.extra["adapted_to"] = space.name
        return rec
