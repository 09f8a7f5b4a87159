"""The gradient-matching objective shared by the DLG family, and the L-BFGS loop that minimises it."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from ..threat import Monitor, soft_cross_entropy


def gradient_distance(model: nn.Module, dummy_x: torch.Tensor, soft_labels: torch.Tensor,
                      target: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over parameters of ||grad' - grad||^2 (DLG eq. 4), differentiable w.r.t. the dummies.

    Coordinates a defense zeroed stay in the sum (the non-adaptive attacker matches the update as
    shared); adaptive variants may pass a masked target and model.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    loss = soft_cross_entropy(model(dummy_x), soft_labels)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return sum(((g - t) ** 2).sum() for g, t in zip(grads, target))


class LBFGSRun:
    """Runs ``torch.optim.LBFGS`` on a set of leaf tensors and keeps the bookkeeping a result needs:
    closure evaluations, last distance, divergence. The optimiser follows the DLG reference setup
    (lr 1, max_iter 20 per step, history 100) unless told otherwise."""

    def __init__(self, variables: list[torch.Tensor], objective: Callable[[], torch.Tensor], *,
                 lr: float = 1.0, max_iter: int = 20, history_size: int = 100,
                 fresh_each_step: bool = False) -> None:
        self.variables = variables
        self.objective = objective
        self.optimizer = torch.optim.LBFGS(variables, lr=lr, max_iter=max_iter, history_size=history_size)
        self.closure_evals = 0
        self.distance = math.inf
        self.diverged = False
        self.fresh_each_step = fresh_each_step

    def closure(self) -> torch.Tensor:
        self.optimizer.zero_grad()
        distance = self.objective()
        # grad w.r.t. the dummies only: backward() would also fill the model's parameter grads
        grads = torch.autograd.grad(distance, self.variables)
        for v, g in zip(self.variables, grads):
            v.grad = g
        self.closure_evals += 1
        self.distance = float(distance.detach())
        return distance.detach()

    def step(self) -> bool:
        """One L-BFGS step; returns False once the run has diverged (non-finite distance or variables)."""
        saved = [v.detach().clone() for v in self.variables]
        if self.fresh_each_step:
            self.optimizer.state.clear()  # start this step's L-BFGS history afresh
        self.optimizer.step(self.closure)
        finite = math.isfinite(self.distance) and all(bool(torch.isfinite(v).all()) for v in self.variables)
        if not finite:
            self.diverged = True
            with torch.no_grad():  # keep the last finite state as the reconstruction
                for v, s in zip(self.variables, saved):
                    v.copy_(s)
        return finite


def run_steps(runs: list[LBFGSRun], steps: int, schedule: Callable[[int], int],
              snapshot: Callable[[], tuple[torch.Tensor, torch.Tensor | None]],
              monitor: Monitor | None, stop_distance: float) -> int:
    """Step ``runs[schedule(i)]`` for i in range(steps); returns the number of steps taken."""
    taken = 0
    for i in range(steps):
        run = runs[schedule(i)]
        ok = run.step()
        taken = i + 1
        if monitor is not None:
            images, labels = snapshot()
            monitor(taken, images, labels)
        if not ok:
            break
        if stop_distance > 0 and run.distance < stop_distance and all(r.distance < stop_distance for r in runs):
            break
    return taken
