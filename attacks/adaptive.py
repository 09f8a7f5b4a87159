"""Adaptive gradient-matching attacks: DLG and iDLG that know the defense's registered name and public
parameters (``AttackTask.defense_name`` / ``defense_params``), as a leaderboard must assume.

What each one adapts to:

* ``pruning``: the zeroed coordinates carry no information, so only the coordinates that survived (non-zero
  in the shared update) are matched;
* ``quantization``: the dummy gradient goes through the same quantiser (fp16, bf16 or per-tensor int8) with a
  straight-through estimator, so the match happens in the defense's output space;
* noise (``gaussian-noise``, ``laplacian-noise``) and any other or unknown defense (e.g. a submitted one): the
  output-space transform is the identity (noise has no deterministic part to invert), so only the generic
  part applies.

The generic part, for every defense: ``restarts`` dummy initialisations times a small sweep of L-BFGS step
sizes, keeping the run with the lowest final gradient distance. That distance is what the attacker sees;
the choice never looks at the private data.
"""
from __future__ import annotations

import math
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..params import Param
from ..registry import register_attack
from ..threat import AttackTask, Monitor, Reconstruction, soft_cross_entropy
from .base import Attack
from .dlg import _attacker_model, _dummy, analytic_labels
from .gradient_matching import LBFGSRun, run_steps

OutputSpace = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def _straight_through(g: torch.Tensor, quantised: torch.Tensor) -> torch.Tensor:
    """The quantised value forward, the identity backward (rounding has no useful derivative)."""
    return g + (quantised - g).detach()


def output_space(task: AttackTask) -> tuple[str, OutputSpace]:
    """(what was adapted, a differentiable map from a dummy gradient to what the defense would share)."""
    name, params = task.defense_name, task.defense_params
    if name == "pruning":
        masks = [(t != 0).to(t.dtype) for t in task.shared]
        return "surviving-coordinates", lambda grads: [g * m for g, m in zip(grads, masks)]
    if name == "quantization":
        from ..defenses.quantization import FP16_MAX, int8_roundtrip

        fmt = params.get("format")
        if fmt == "fp16":
            q = lambda g: g.detach().clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(g.dtype)  # noqa: E731
        elif fmt == "bf16":
            q = lambda g: g.detach().to(torch.bfloat16).to(g.dtype)  # noqa: E731
        elif fmt == "int8":
            q = lambda g: int8_roundtrip(g.detach())  # noqa: E731
        else:
            return "identity", lambda grads: grads
        return f"quantiser-{fmt}-ste", lambda grads: [_straight_through(g, q(g)) for g in grads]
    return "identity", lambda grads: grads


def matched_distance(model: torch.nn.Module, dummy_x: torch.Tensor, soft_labels: torch.Tensor,
                     target: list[torch.Tensor], space: OutputSpace) -> torch.Tensor:
    """DLG's eq. 4 after mapping the dummy gradient into the defense's output space."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(soft_cross_entropy(model(dummy_x), soft_labels), params, create_graph=True)
    return sum(((g - t) ** 2).sum() for g, t in zip(space(list(grads)), target))


class _Adaptive(Attack):
    adaptive: ClassVar[bool] = True  # marks attacks that read the defense's public parameters
    label_method: ClassVar[str] = ""

    params = (
        Param("batch_size", int, 1, "victim batch size attacked (a large-batch defense overrides it)", low=1),
        Param("steps", int, 300, "L-BFGS steps per run (each run: one restart at one step size)", low=1),
        Param("restarts", int, 2, "dummy initialisations per step size", low=1, high=64),
        Param("lr_sweep", list, [1.0, 0.1], "L-BFGS step sizes tried"),
        Param("max_iter", int, 20, "objective evaluations per L-BFGS step at most", low=1),
        Param("history_size", int, 100, "L-BFGS history", low=1),
        Param("stop_distance", float, 0.0, "stop a run once its gradient distance falls below this", low=0.0),
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
        adapted, space = output_space(task)
        model = _attacker_model(task)
        target = [t.detach() for t in task.shared]
        fixed_labels = self._labels(task)
        best: dict | None = None
        total_evals, total_steps = 0, 0
        for restart in range(self.restarts):
            for lr in self.lr_sweep:
                # the same dummy for every step size of one restart, a new one per restart
                g = torch.Generator().manual_seed((task.seed * 1_000_003 + restart) % 2**31)
                x, logits = _dummy(task, g)
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
                run = LBFGSRun(variables, lambda: matched_distance(model, x, soft(), target, space),
                               lr=lr, max_iter=self.max_iter, history_size=self.history_size)
                steps = run_steps([run], self.steps, lambda i: 0, lambda: (x.detach(), labels_now()), None,
                                  self.stop_distance)
                total_evals += run.closure_evals
                total_steps += steps
                distance = run.distance if math.isfinite(run.distance) else math.inf
                # attacker-visible choice: the lowest final gradient distance, never the private data
                if best is None or distance < best["distance"]:
                    best = {"distance": distance, "images": x.detach().clone(), "labels": labels_now(),
                            "diverged": run.diverged, "restart": restart, "lr": lr}
        assert best is not None
        if monitor is not None:
            monitor(total_steps, best["images"], best["labels"])
        return Reconstruction(best["images"], best["labels"], total_steps, total_evals, best["distance"],
                              best["diverged"], self.label_method,
                              extra={"adapted_to": adapted, "chosen_restart": best["restart"],
                                     "chosen_lr": best["lr"]})


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
