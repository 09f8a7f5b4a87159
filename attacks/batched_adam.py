"""Many independent Adam runs in one program (the optimiser of Inverting Gradients).

``BatchedAdam`` runs M independent minimisations, up to ``slots`` of them at a time in one vectorised
objective call per tick, and follows, per instance, ``torch.optim.Adam`` (single-tensor update, no
weight decay, no amsgrad) with the options Inverting Gradients uses (Geiping et al. 2020, and its
reference code): the objective's gradient replaced by its sign (``signed``), the step size multiplied by
``gamma`` at each of ``milestones`` (``torch.optim.lr_scheduler.MultiStepLR`` stepped once per step),
and the variables clamped into ``bounds`` after each step (the box constraint to the data's range).

Why hand-written: torch's Adam keeps one state per parameter tensor, so M instances in one tensor would
share one step count and one schedule; here each instance has its own moments, step count and step
size, so an instance loaded into a freed slot starts its own schedule, and K instances in one program
follow K separate ``torch.optim.Adam`` runs (tested in float64).

Finished instances stop costing work: an instance finishes when its step budget is spent, when its
objective falls below ``stop_loss`` (attacker-visible), or when it diverges (non-finite value or
gradient: its last point with a finite objective is kept). Its row is dropped from the batch at once (the
state is four rows, so compaction is cheap) and the next waiting instance takes its place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .batched_lbfgs import CONVERGED, DIVERGED, STEPS, Objective, StepCallback


@dataclass
class BatchedAdamResult:
    x: torch.Tensor          # (M, D) final variables (the last finitely evaluated point of a diverged one)
    loss: torch.Tensor       # (M,) the last objective value computed (before the last step, as torch's closure)
    steps: torch.Tensor      # (M,) Adam steps taken
    evals: torch.Tensor      # (M,) objective evaluations computed
    status: list[str]        # per instance: steps, converged or diverged
    ticks: int = 0           # batched objective calls


def step_size_factor(step: int, milestones: Sequence[int], gamma: float) -> float:
    """The factor ``MultiStepLR`` applies to the step with index ``step`` (0-based)."""
    return gamma ** sum(step >= m for m in milestones)


class BatchedAdam:
    """Per-instance ``torch.optim.Adam`` (+ sign, step decay, box) for many instances at once."""

    def __init__(self, *, steps: int, lr: float = 0.1, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, signed: bool = True, milestones: Sequence[int] = (), gamma: float = 0.1,
                 bounds: tuple[float, float] | None = None, slots: int = 64, stop_loss: float = 0.0) -> None:
        if steps < 1 or slots < 1:
            raise ValueError("steps and slots must be >= 1")
        self.steps, self.lr, self.betas, self.eps, self.signed = steps, lr, betas, eps, signed
        self.milestones, self.gamma, self.bounds = tuple(milestones), gamma, bounds
        self.slots, self.stop_loss = slots, stop_loss

    def minimize(self, objective: Objective, x0: torch.Tensor, *,
                 on_step: StepCallback | None = None) -> BatchedAdamResult:
        M, D = x0.shape
        dev, dt = x0.device, x0.dtype
        out = BatchedAdamResult(x=x0.clone(), loss=torch.full((M,), float("nan"), dtype=dt, device=dev),
                                steps=torch.zeros(M, dtype=torch.long), evals=torch.zeros(M, dtype=torch.long),
                                status=[STEPS] * M)
        beta1, beta2 = self.betas
        milestones = torch.tensor(self.milestones, dtype=torch.long, device=dev)
        # rows of the running instances: ids, variables, first and second moments, steps taken, and the
        # last point whose objective was finite (what a diverged instance returns)
        ids = torch.arange(min(self.slots, M), device=dev)
        x = x0.index_select(0, ids).clone()
        m, v = torch.zeros_like(x), torch.zeros_like(x)
        taken = torch.zeros(len(ids), dtype=torch.long, device=dev)
        good_x, good_loss = x.clone(), torch.full((len(ids),), math.nan, dtype=dt, device=dev)
        waiting = M - len(ids)
        while len(ids):
            out.ticks += 1
            loss, grad = objective(ids, x)
            loss, grad = loss.detach(), grad.detach()
            out.evals[ids.cpu()] += 1
            finite = torch.isfinite(loss) & torch.isfinite(grad).all(1)
            good_x = torch.where(finite[:, None], x, good_x)
            good_loss = torch.where(finite, loss, good_loss)
            converged = finite & (loss < self.stop_loss) if self.stop_loss > 0 else torch.zeros_like(finite)
            move = finite & ~converged
            # torch.optim.Adam's single-tensor update, with each row's own step count and step size
            g = grad.sign() if self.signed else grad
            step = taken + 1
            m = torch.where(move[:, None], m.lerp(g, 1 - beta1), m)
            v = torch.where(move[:, None], v * beta2 + (1 - beta2) * g * g, v)
            counts = step.to(dt)
            bias1 = 1 - beta1 ** counts
            bias2_sqrt = torch.sqrt(1 - beta2 ** counts)
            # MultiStepLR: the step with index `taken` runs at lr * gamma^(milestones passed)
            rates = self.lr * self.gamma ** (taken[:, None] >= milestones).sum(1).to(dt)
            denom = v.sqrt() / bias2_sqrt[:, None] + self.eps
            moved = x - (rates / bias1)[:, None] * (m / denom)
            if self.bounds is not None:
                moved = moved.clamp(*self.bounds)
            x = torch.where(move[:, None], moved, x)
            taken = torch.where(move, step, taken)
            if on_step is not None:
                for row in move.nonzero().flatten().tolist():
                    on_step(int(ids[row]), int(taken[row]), x[row])
            done = ~move | (taken >= self.steps)
            for row in done.nonzero().flatten().tolist():
                inst = int(ids[row])
                out.x[inst] = x[row] if finite[row] else good_x[row]
                out.loss[inst] = loss[row] if finite[row] else good_loss[row]
                out.steps[inst] = int(taken[row])
                out.status[inst] = DIVERGED if not finite[row] else CONVERGED if converged[row] else STEPS
            keep = (~done).nonzero().flatten()
            ids, x, m, v, taken, good_x, good_loss = (
                t.index_select(0, keep) for t in (ids, x, m, v, taken, good_x, good_loss))
            refill = min(self.slots - len(ids), waiting)
            if refill:
                new = torch.arange(M - waiting, M - waiting + refill, device=dev)
                waiting -= refill
                zeros = torch.zeros(refill, D, dtype=dt, device=dev)
                ids = torch.cat([ids, new])
                x, good_x = torch.cat([x, x0.index_select(0, new)]), torch.cat([good_x, x0.index_select(0, new)])
                m, v = torch.cat([m, zeros]), torch.cat([v, zeros])
                taken = torch.cat([taken, torch.zeros(refill, dtype=torch.long, device=dev)])
                good_loss = torch.cat([good_loss, torch.full((refill,), math.nan, dtype=dt, device=dev)])
        return out
