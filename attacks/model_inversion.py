"""Model inversion (Fredrikson, Jha, Ristenpart, CCS 2015, Algorithm 1 "MI-Face") on a trained model,
the baseline Hitaj et al. (CCS 2017, Section 9.1, Fig. 5) compare the GAN attack with.

Gradient descent on the input x to minimise c(x) = 1 - p(target | x), with exact gradients (as Hitaj
et al. did, instead of Fredrikson's numerical approximation). Fredrikson's stopping rule: at most
``steps`` iterations (alpha), stop when the cost has not improved on the best of the last ``patience``
iterations (beta), or when it falls to ``stop_cost`` (gamma). Step size ``step_size`` (lambda). After
each step x is projected back onto the valid pixel range (our stand-in for Fredrikson's optional
"Process" step, which they use for denoising).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..params import Param
from ..registry import register_attack
from .base import Attack


@dataclass
class Inversion:
    """One inverted image per requested class (data scale), its final cost, and why it stopped."""

    images: torch.Tensor
    target_classes: torch.Tensor
    costs: torch.Tensor        # final 1 - p(target)
    steps: torch.Tensor        # iterations each took
    stop_reasons: list[str]    # "max-steps", "no-improvement", "cost"


@register_attack("model-inversion")
class ModelInversion(Attack):
    """MI-Face on a fully trained model; defaults are Fredrikson et al.'s (alpha 5000, beta 100,
    gamma 0.99 only makes sense for their 40-way face models, so the default here runs to convergence,
    lambda 0.1)."""

    setting: ClassVar[str] = "model"
    needs_labels: ClassVar[bool] = True

    params = (
        Param("steps", int, 5000, "at most this many gradient steps (Fredrikson's alpha)", low=1),
        Param("step_size", float, 0.1, "gradient descent step (lambda)", low=1e-8),
        Param("patience", int, 100,
              "stop when the cost has not improved on the best of the last this many steps (beta)", low=1),
        Param("stop_cost", float, 0.0, "stop when 1 - p(target) <= this (gamma)", low=0.0, high=1.0),
        Param("start", float, 0.0, "initial pixel value on the [0, 1] scale (Fredrikson: 0)", low=0.0, high=1.0),
        Param("target_class", int, 0, "the class inverted in a grid cell (the GAN cells' victim class)", low=0),
        Param("starts", int, 1,
              "images per grid cell: the first from `start`, the others from uniform random pixels", low=1),
    )

    def starting_images(self, input_shape: tuple[int, int, int], *, scale: str = "[-1,1]", seed: int = 0
                        ) -> torch.Tensor:
        """``starts`` starting points (data scale): Fredrikson's flat image, then uniform random images,
        so that a grid cell scores a distribution of inversions rather than one image."""
        low, high = (-1.0, 1.0) if scale == "[-1,1]" else (0.0, 1.0)
        unit = torch.rand(self.starts, *input_shape, generator=torch.Generator().manual_seed(seed))
        unit[0] = self.start
        return low + unit * (high - low)

    def attack_model(self, model: nn.Module, *, input_shape: tuple[int, int, int], scale: str = "[-1,1]",
                     seed: int = 0) -> Inversion:
        """A grid cell's attack: invert ``target_class`` from each of the ``starts`` starting images."""
        return self.invert(model, [self.target_class] * self.starts, input_shape=input_shape, scale=scale,
                           initial=self.starting_images(input_shape, scale=scale, seed=seed))

    def invert(self, model: nn.Module, target_classes: list[int] | torch.Tensor, *,
               input_shape: tuple[int, int, int], scale: str = "[-1,1]",
               initial: torch.Tensor | None = None) -> Inversion:
        """Invert ``model`` for each class in ``target_classes`` (one independent image per class,
        optimised together: the cost is a sum of per-image terms, so their gradients do not mix).
        ``initial``: starting images (data scale), default the flat image of ``start``."""
        model = model.eval()
        params_state = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)
        low, high = (-1.0, 1.0) if scale == "[-1,1]" else (0.0, 1.0)
        targets = torch.as_tensor(target_classes, dtype=torch.long)
        n = len(targets)
        x = (torch.full((n, *input_shape), low + self.start * (high - low)) if initial is None
             else initial.detach().clone().float().clamp(low, high))
        active = torch.ones(n, dtype=torch.bool)
        steps = torch.zeros(n, dtype=torch.long)
        history: list[torch.Tensor] = []
        reasons = ["max-steps"] * n
        cost = torch.ones(n)
        for step in range(self.steps):
            x.requires_grad_(True)
            # softmax of the output: logits, or log-probabilities for the hitaj models (same probabilities)
            cost = 1.0 - F.softmax(model(x), -1).gather(1, targets[:, None]).squeeze(1)
            (grad,) = torch.autograd.grad(cost.sum(), x)
            with torch.no_grad():
                cost = cost.detach()
                for i in torch.nonzero(active & (cost <= self.stop_cost)).flatten().tolist():
                    active[i], reasons[i] = False, "cost"
                if len(history) >= self.patience:
                    recent_best = torch.stack(history[-self.patience:]).min(0).values
                    for i in torch.nonzero(active & (cost >= recent_best)).flatten().tolist():
                        active[i], reasons[i] = False, "no-improvement"
                history.append(cost)
                if not active.any():
                    break
                mask = active.view(-1, *([1] * len(input_shape))).float()
                x = (x.detach() - self.step_size * grad * mask).clamp(low, high)
                steps += active.long()
        for p, flag in zip(model.parameters(), params_state):
            p.requires_grad_(flag)
        return Inversion(images=x.detach(), target_classes=targets, costs=cost, steps=steps, stop_reasons=reasons)
