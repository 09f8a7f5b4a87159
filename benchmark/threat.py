"""The threat model of one-step gradient attacks (FedSGD): the victim computes the gradient of its
training loss on a private batch with the shared weights; the defense transforms what is shared; the
attacker sees only the shared update, the model and its weights (plus whatever the task records)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def soft_cross_entropy(logits: torch.Tensor, soft_labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a distribution over classes, mean over the batch (the DLG reference loss).
    With one-hot labels it equals ``F.cross_entropy``."""
    return torch.sum(-soft_labels * F.log_softmax(logits, dim=-1), dim=-1).mean()


def parameter_gradients(model: nn.Module, x: torch.Tensor, soft_labels: torch.Tensor, *,
                        create_graph: bool = False) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    loss = soft_cross_entropy(model(x), soft_labels)
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


@dataclass(frozen=True)
class AttackerMap:
    """The deterministic part of a defense, as an attacker who knows the defense's code can replay it on
    a would-be update: a differentiable map from a dummy update to what the defense would share
    (straight-through where the defense is not differentiable). Randomness (noise) is not part of it.
    ``Defense.attacker_map`` builds it; adaptive attacks match their dummy update through it."""

    name: str
    apply: Callable[[list[torch.Tensor]], list[torch.Tensor]]


IDENTITY_MAP = AttackerMap("identity", lambda update: update)


# replay(update, cotangent or None) -> (the defense's output on update, its vector-Jacobian product or [])
Replay = Callable[[list[torch.Tensor], "list[torch.Tensor] | None"], "tuple[list[torch.Tensor], list[torch.Tensor]]"]


class _Replayed(torch.autograd.Function):
    """A defense's transform as an autograd node whose forward and backward are computed elsewhere (in
    the submission sandbox): the attacker's objective differentiates through it like any other op."""

    @staticmethod
    def forward(ctx, replay: Replay, *update: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.replay = replay
        ctx.save_for_backward(*update)
        outputs, _ = replay(list(update), None)
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *cotangent: torch.Tensor) -> tuple:
        _, products = ctx.replay(list(ctx.saved_tensors), list(cotangent))
        return (None, *products)


def replayed_map(name: str, replay: Replay) -> AttackerMap:
    """An AttackerMap that replays a defense through ``replay`` (forward and vector-Jacobian product)."""
    return AttackerMap(name, lambda update: list(_Replayed.apply(replay, *update)))


def straight_through(value: torch.Tensor, replayed: torch.Tensor) -> torch.Tensor:
    """``replayed`` forward, the identity backward (BPDA, Athalye et al. 2018): rounding and other
    non-differentiable steps have no useful derivative."""
    return value + (replayed - value).detach()


@dataclass
class AttackTask:
    """Everything an attacker is given for one attacked update (and nothing about the private batch)."""

    model: nn.Module                      # the shared model with the weights the victim used
    shared: list[torch.Tensor]            # the update as shared, after the defense
    input_shape: tuple[int, int, int]
    num_classes: int
    batch_size: int                       # the attacker knows how many samples the update came from
    scale: str = "[0,1]"                  # pixel range of the data
    labels: torch.Tensor | None = None    # given only when the threat model says labels are known
    defense_params: dict[str, Any] = field(default_factory=dict)  # public parameters of the defense
    defense_name: str = ""              # registered name of the defense (public, like its parameters)
    # what an adaptive attacker can replay of the defense (its code is public, its randomness is not)
    attacker_map: "AttackerMap | None" = None
    seed: int = 0

    def knowledge(self) -> dict[str, Any]:
        return {"labels_known": self.labels is not None, "batch_size": self.batch_size,
                "shared": "gradient", "defense_public_params": dict(self.defense_params),
                "defense_name": self.defense_name}


@dataclass
class Reconstruction:
    """What an attack returns for one task."""

    images: torch.Tensor                  # (N, C, H, W) in the data's scale
    labels: torch.Tensor | None           # (N,) predicted labels, None if the attack does not infer them
    steps: int = 0                        # optimiser steps taken
    closure_evals: int = 0                # objective evaluations (the cost that matters for L-BFGS)
    grad_distance: float = float("nan")   # final gradient-matching distance (attacker-visible)
    diverged: bool = False
    label_method: str = ""                # how labels were obtained (optimised, analytic, given)
    extra: dict[str, Any] = field(default_factory=dict)


# monitor(step, images, labels) -> None; the evaluator's window into an attack's progress (ground truth
# stays outside the attack).
Monitor = Callable[[int, torch.Tensor, torch.Tensor | None], None]


@dataclass
class TextAttackTask:
    """What a masked-LM gradient attacker is given for one attacked update: the model and its weights
    (so its embedding table and vocabulary size), the shared update, the sequence length and how many
    of its tokens were masked (BERT's public 15% rule fixes the count, not which tokens), and the
    vocabulary's [MASK] id. Nothing about the sentence itself."""

    model: nn.Module                      # the masked LM (transformers' BertForMaskedLM) the victim used
    shared: list[torch.Tensor]            # the update as shared, after the defense, one tensor per parameter
    sequence_length: int
    masked_count: int
    mask_token_id: int
    defense_params: dict[str, Any] = field(default_factory=dict)
    defense_name: str = ""
    seed: int = 0


@dataclass
class TextReconstruction:
    """What a text attack returns for one task: the recovered token ids (``[CLS]`` and ``[SEP]``
    included), the recovered ids after chosen optimiser steps, and its cost."""

    token_ids: list[int]
    history: dict[int, list[int]] = field(default_factory=dict)  # step -> token ids after that many steps
    steps: int = 0
    closure_evals: int = 0
    grad_distance: float = float("nan")
    diverged: bool = False
