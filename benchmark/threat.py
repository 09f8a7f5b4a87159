"""The threat model of gradient attacks: the victim computes its update on a private batch with the
shared weights (FedSGD: one gradient; federated averaging: several local SGD steps, ``LocalTraining``);
the defense transforms what is shared; the attacker sees only the shared update, the model and its
weights (plus whatever the task records)."""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .params import Param


# the ``threat:`` keys of federated averaging and BatchNorm (gradient cells). A grid leaves each out of
# ``Grid.threat`` while it has its default, so FedSGD grids keep the cell keys (resumed folders,
# leaderboard hashes) they had before these keys existed; records carry every value (threat_settings)
THREAT_EXTRAS = (
    Param("local_steps", int, 1, "local SGD steps of federated averaging (1: FedSGD, one gradient)", low=1, high=1000),
    Param("local_lr", float, 0.1, "local learning rate (irrelevant for one step)", low=1e-6),
    Param("local_batch_size", int, None, "samples per local step (null: the whole batch)", low=1, nullable=True),
    Param("bn_mode", str, "train", "the victim's BatchNorm: batch statistics ('train') or the model's running "
          "statistics ('eval', which the attacker is given with the weights)", choices=("train", "eval")),
)


def threat_settings(threat: dict) -> dict:
    """A grid's ``threat`` with every key's value, defaults filled in."""
    return {**{p.name: p.default for p in THREAT_EXTRAS}, **threat}


def local_training_of(threat: dict, clients: int = 1) -> LocalTraining:
    """The local training a grid's ``threat`` sets (``clients``: updates the server sees as one mean)."""
    full = threat_settings(threat)
    return LocalTraining(steps=full["local_steps"], lr=full["local_lr"], batch_size=full["local_batch_size"],
                         clients=clients)


def soft_cross_entropy(logits: torch.Tensor, soft_labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a distribution over classes, mean over the batch (the DLG reference loss).
    With one-hot labels it equals ``F.cross_entropy``."""
    return torch.sum(-soft_labels * F.log_softmax(logits, dim=-1), dim=-1).mean()


def parameter_gradients(model: nn.Module, x: torch.Tensor, soft_labels: torch.Tensor, *,
                        create_graph: bool = False) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    loss = soft_cross_entropy(model(x), soft_labels)
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


# A record of an attack on a federated-averaging update (several local steps: another threat model of
# the same attack) is keyed by the attack and this suffix wherever records are grouped by attack (tables,
# figures, board entries), so that DLG on a gradient and DLG on a FedAvg update never pool into one row.
FEDAVG_SUFFIX = ".fedavg"


def attack_key(record: dict) -> str:
    """A record's attack as tables, figures and board entries group it: the attack's name, with
    ``FEDAVG_SUFFIX`` when the victim shared an averaged local update rather than one gradient."""
    local_steps = (record.get("threat") or {}).get("local_steps") or 1
    return record["attack"] + (FEDAVG_SUFFIX if local_steps > 1 else "")


def attack_of_key(key: str) -> str:
    """The registered attack behind ``attack_key``'s value."""
    return key[:-len(FEDAVG_SUFFIX)] if key.endswith(FEDAVG_SUFFIX) else key


@dataclass(frozen=True)
class LocalTraining:
    """Federated averaging's local training (McMahan et al. 2017), as the server sets it and therefore
    as the attacker knows it: each of ``clients`` clients takes ``steps`` steps of minibatch SGD with
    learning rate ``lr`` on its own batch, minibatches of ``batch_size`` taken in order and cyclically
    (None: the whole batch each step), and shares its averaged update (w0 - w_steps) / lr, the weight
    difference in the scale of a gradient, so defenses calibrated on gradients keep their meaning. The
    server sees the mean of the clients' updates (``clients`` > 1: secure aggregation). One step on the
    whole batch is FedSGD: the update is then the gradient itself (``fedsgd``), computed as before."""

    steps: int = 1
    lr: float = 0.1
    batch_size: int | None = None
    clients: int = 1

    def fedsgd(self, per_client: int) -> bool:
        """True when the shared update is the gradient of the mean loss over every client's samples (one
        step on whole batches of equal size: the mean of the clients' gradients is that gradient)."""
        return self.steps == 1 and (self.batch_size is None or self.batch_size >= per_client)

    def minibatches(self, per_client: int) -> list[slice]:
        """The samples of one client's batch that each local step uses (the same for every client)."""
        size = min(self.batch_size or per_client, per_client)
        count = math.ceil(per_client / size)
        return [slice((s % count) * size, min((s % count + 1) * size, per_client)) for s in range(self.steps)]

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    def victim_update(self, model: nn.Module, x: torch.Tensor, soft_labels: torch.Tensor,
                      step_update: Callable[[nn.Module, torch.Tensor, torch.Tensor], list[torch.Tensor]]
                      ) -> list[torch.Tensor]:
        """The mean over clients of (w0 - w_steps) / lr, each client training a copy of ``model`` on its
        share of ``x`` (clients' samples one after another) with ``step_update`` as each step's gradient
        (a defense's ``compute_update``: DP-SGD clips and noises every local step)."""
        per_client = len(x) // self.clients
        total: list[torch.Tensor] | None = None
        for c in range(self.clients):
            local = copy.deepcopy(model)  # the shared model (and its BatchNorm statistics) stays as it was
            params = [p for p in local.parameters() if p.requires_grad]
            start = [p.detach().clone() for p in params]
            xs, ss = x[c * per_client:(c + 1) * per_client], soft_labels[c * per_client:(c + 1) * per_client]
            for part in self.minibatches(per_client):
                update = step_update(local, xs[part], ss[part])
                with torch.no_grad():
                    for p, u in zip(params, update):
                        p.sub_(self.lr * u)
            averaged = [(w0 - p.detach()) / self.lr for w0, p in zip(start, params)]
            total = averaged if total is None else [t + a for t, a in zip(total, averaged)]
        return [t / self.clients for t in total]

    def simulated_update(self, loss: Callable[[dict, torch.Tensor, torch.Tensor], torch.Tensor],
                         weights: dict[str, torch.Tensor], x: torch.Tensor, soft_labels: torch.Tensor
                         ) -> dict[str, torch.Tensor]:
        """The attacker's replay of ``victim_update`` on dummies, differentiable w.r.t. them (unrolled
        steps, as Dimitrov et al. 2022 and breaching's local-updates user do): ``loss(weights, x, soft)``
        is the training loss of a functional model (``torch.func.functional_call``). Works under
        ``vmap`` (the batched engine) and in eager autograd alike."""
        from torch.func import grad

        per_client = x.shape[0] // self.clients
        total: dict[str, torch.Tensor] | None = None
        for c in range(self.clients):
            xs, ss = x[c * per_client:(c + 1) * per_client], soft_labels[c * per_client:(c + 1) * per_client]
            w = weights
            for part in self.minibatches(per_client):
                g = grad(loss)(w, xs[part], ss[part])
                w = {n: w[n] - self.lr * g[n] for n in w}
            averaged = {n: (weights[n] - w[n]) / self.lr for n in w}
            total = averaged if total is None else {n: total[n] + averaged[n] for n in total}
        return {n: t / self.clients for n, t in total.items()}


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
    # federated averaging: the local training the attacker replays (None: FedSGD, one gradient)
    local_training: LocalTraining | None = None

    def knowledge(self) -> dict[str, Any]:
        return {"labels_known": self.labels is not None, "batch_size": self.batch_size,
                "shared": "gradient" if self.local_training is None else "averaged local update",
                "local_training": None if self.local_training is None else self.local_training.describe(),
                "defense_public_params": dict(self.defense_params), "defense_name": self.defense_name}


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
