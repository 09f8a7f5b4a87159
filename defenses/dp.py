"""Defenses of the collaborative protocol (distributed selective SGD, ``leakbench.collab``):

* ``selective-sharing``: Shokri & Shmatikov's parameter selection alone (theta_u / theta_d, no noise);
* ``dssgd-dp``: their record-level DP upload through the sparse vector technique (as Hitaj et al. ran it);
* ``dp-sgd``: Abadi et al. (2016) per-example clipping and Gaussian noise, accounted with Opacus's RDP
  accountant.

Each one's accuracy column comes from running the protocol (global model test accuracy), not from
centralised training; ``transform``/``compute_update`` give what one shared step looks like under the
defense, so the one-step gradient attacks can be run against the same settings.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from ..collab import (
    ORDERS, CollaborativeLearning, ProtocolConfig, select_upload, sparse_vector_privacy,
    sparse_vector_upload, split_labels, upload_count,
)
from ..errors import ConfigError
from ..params import Param
from ..registry import register_defense
from ..threat import soft_cross_entropy
from .base import Defense

_PROTOCOL_PARAMS = (
    Param("participants", int, 2, "honest participants; the classes are split among them in contiguous "
          "disjoint blocks (2 on MNIST: digits 0-4 and 5-9)", low=1, high=1000),
    Param("rounds", int, None, "protocol rounds, each participant taking one turn per round; "
          "null: the accuracy config's epochs", low=0, nullable=True),
    Param("local_epochs", int, 1, "passes over the local data per turn", low=1),
    Param("local_batches", int, None, "cap on local SGD steps per turn (null: none)", low=1, nullable=True),
    Param("order", str, "sequential", "turn order", choices=ORDERS),
    Param("target_accuracy", float, None, "stop once the global test accuracy reaches this (null: never)",
          low=0.0, high=1.0, nullable=True),
)
_THETA_U = Param("theta_u", float, 1.0, "fraction of each update uploaded (c = theta_u |w|)", low=0.0, high=1.0)
_THETA_D = Param("theta_d", float, 1.0, "fraction of the global parameters downloaded per turn", low=0.0, high=1.0)


def _positive(component: Defense, *names: str) -> None:
    for name in names:
        value = getattr(component, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{component.owner_name()}: parameter {name!r} = {value!r} is invalid; "
                              f"allowed: a number > 0")


def _flatten(update: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([u.detach().flatten() for u in update])


def _scatter_like(update: list[torch.Tensor], index: torch.Tensor, values: torch.Tensor) -> list[torch.Tensor]:
    """Dense tensors shaped like ``update``: ``values`` at the flat ``index``, zero elsewhere (what the
    server learns from a selective upload)."""
    flat = torch.zeros(sum(u.numel() for u in update), dtype=update[0].dtype)
    flat[index] = values.to(flat.dtype)
    return [chunk.view_as(u).clone() for chunk, u in zip(flat.split([u.numel() for u in update]), update)]


class ProtocolDefense(Defense):
    """A defense that lives inside distributed selective SGD: its accuracy column runs the protocol.

    The accuracy config (``TrainingConfig``) supplies what every grid row shares: optimizer, lr,
    momentum, batch size, sample caps, and the number of rounds (its ``epochs``, unless ``rounds`` is
    set). The defense supplies the upload rule and the protocol's shape.
    """

    params = _PROTOCOL_PARAMS
    #: parameters every table label shows; the others only where they differ from their default
    headline: ClassVar[tuple[str, ...]] = ()
    _seen_num_params: int | None = None  # size of the last model this defense was applied to

    def label(self) -> str:
        defaults = {p.name: p.default for p in self.params}
        shown = {k: v for k, v in self.get_params().items() if k in self.headline or v != defaults[k]}
        inner = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        return f"{self.registry_name}({inner})"

    def upload_settings(self) -> dict[str, Any]:
        """The ProtocolConfig fields of this defense's upload rule."""
        raise NotImplementedError

    def local_gradient(self):
        """How participants compute local gradients (None: the plain mean-loss gradient)."""
        return None

    def protocol_config(self, train, config) -> ProtocolConfig:
        rounds = self.rounds if self.rounds is not None else config.epochs
        return ProtocolConfig(
            model=None, participant_labels=split_labels(train.num_classes, self.participants),
            optimizer=config.optimizer, lr=config.lr,
            momentum=config.momentum if config.optimizer == "sgd" else 0.0,
            batch_size=self.victim_batch_size(config.batch_size), local_epochs=self.local_epochs,
            local_batches=self.local_batches, order=self.order, max_rounds=rounds,
            target_accuracy=self.target_accuracy, evaluate_local=False, **self.upload_settings(),
        )

    def accuracy_run(self, *, model: nn.Module, train, test, config, seed: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(seed)
        train = train.capped(config.train_size, generator=generator)
        test = test.capped(config.test_size)  # the first test samples, as training.train_with_defense
        protocol = self.protocol_config(train, config)
        # the simulator works on CPU: flat vectors, data tensors and seeded generators all live there
        simulator = CollaborativeLearning(protocol, train, test, seed=seed, initial_model=model.cpu(),
                                          local_gradient=self.local_gradient())
        self._seen_num_params = simulator.server.num_params
        result = simulator.run()
        # leave ``model`` trained, as the default accuracy run does: attacks on the finished model use it
        model.load_state_dict(simulator.global_model.state_dict())
        out = result.summary()
        out["train_samples"], out["test_samples"] = len(train), len(test)
        out["train_batch_size"] = protocol.batch_size
        privacy = self.protocol_privacy(simulator)
        if privacy:
            out["privacy"] = privacy
        return out

    def protocol_privacy(self, simulator: CollaborativeLearning) -> dict[str, Any]:
        return {}


@register_defense("selective-sharing")
class SelectiveSharing(ProtocolDefense):
    """Distributed selective SGD without noise: each turn downloads theta_d of the global parameters and
    uploads theta_u of the update, chosen by ``criterion``, each value bounded by ``gamma``. With
    theta_u = theta_d = 1 and no bound it is the undefended protocol. One shared step (``transform``):
    the selected, bounded entries of the gradient, zeros elsewhere."""

    # not "sparsification": its accuracy column is the protocol's, unlike the one-step gradient defenses
    family = "collaborative"
    headline = ("theta_u", "theta_d")
    params = (
        Param("theta_u", float, 0.1, "fraction of each update uploaded", low=0.0, high=1.0),
        _THETA_D,
        Param("criterion", str, "largest", "which entries are uploaded", choices=("largest", "random", "threshold")),
        Param("tau", float, 0.0, "threshold of the 'threshold' criterion", low=0.0),
        Param("gamma", float, None, "bound on each uploaded value (null: unbounded)", nullable=True),
        *_PROTOCOL_PARAMS,
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _positive(self, "theta_u", "gamma")

    def upload_settings(self) -> dict[str, Any]:
        return {"theta_u": self.theta_u, "theta_d": self.theta_d, "upload_criterion": self.criterion,
                "tau": self.tau, "gamma": self.gamma}

    def transform(self, update, *, generator=None):
        flat = _flatten(update)
        self._seen_num_params = flat.numel()
        index = select_upload(flat, count=upload_count(self.theta_u, flat.numel()), criterion=self.criterion,
                              tau=self.tau, generator=generator)
        values = flat[index] if self.gamma is None else flat[index].clamp(-self.gamma, self.gamma)
        return _scatter_like(update, index, values)


@register_defense("dssgd-dp")
class DSSGDDifferentialPrivacy(ProtocolDefense):
    """Shokri & Shmatikov's record-level DP upload: at most c = theta_u |w| values per upload, chosen by
    the sparse vector technique (8/9 of the budget, Laplace noise on threshold tau and on every
    candidate), released with Laplace noise (1/9), bounded by gamma; see ``collab.sparse_vector_scales``.

    ``epsilon_c`` is the budget per uploaded parameter; one upload (one participant, one epoch) is
    ``c * epsilon_c``-DP, which is what ``privacy()`` reports as ``epsilon``. Defaults are the paper's
    (tau 1e-4, gamma 1e-3, theta_u = theta_d = 1; sweep epsilon_c 100, 10, 0.01)."""

    family = "differential-privacy"
    headline = ("epsilon_c",)
    params = (
        Param("epsilon_c", float, 100.0, "privacy budget per uploaded parameter (paper: 100, 10, 0.01)", low=0.0),
        Param("tau", float, 1e-4, "selection threshold on |bounded update|", low=0.0),
        Param("gamma", float, 1e-3, "bound on each shared value; the sensitivity is 2 gamma", low=0.0),
        _THETA_U,
        _THETA_D,
        *_PROTOCOL_PARAMS,
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _positive(self, "epsilon_c", "gamma", "theta_u")

    def upload_settings(self) -> dict[str, Any]:
        return {"theta_u": self.theta_u, "theta_d": self.theta_d, "upload_criterion": "sparse-vector",
                "tau": self.tau, "gamma": self.gamma, "epsilon_c": self.epsilon_c}

    def transform(self, update, *, generator=None):
        """One shared step through the DP upload: the gradient plays the role of ``new - old``."""
        flat = _flatten(update)
        self._seen_num_params = flat.numel()
        index, values = sparse_vector_upload(flat, count=upload_count(self.theta_u, flat.numel()),
                                             epsilon_c=self.epsilon_c, tau=self.tau, gamma=self.gamma,
                                             generator=generator)
        return _scatter_like(update, index, values)

    def privacy(self, *, steps: int = 1, sample_rate: float = 1.0, num_params: int | None = None) -> dict[str, Any]:
        """The guarantee of one upload, whatever ``steps`` and ``sample_rate`` (the SVT budget is per
        upload, not per SGD step). Without the model size (``num_params``, or a model this defense has
        already been applied to), only the per-parameter budget can be reported."""
        num_params = num_params or self._seen_num_params
        if num_params is None:
            return {"epsilon": None, "delta": 0.0, "epsilon_c": self.epsilon_c, "accountant": "sparse-vector",
                    "scope": "per uploaded parameter; the per-upload epsilon is c * epsilon_c"}
        return sparse_vector_privacy(epsilon_c=self.epsilon_c, num_params=num_params, theta_u=self.theta_u)

    def protocol_privacy(self, simulator: CollaborativeLearning) -> dict[str, Any]:
        return sparse_vector_privacy(epsilon_c=self.epsilon_c, num_params=simulator.server.num_params,
                                     theta_u=self.theta_u, uploads=len(simulator.result.rounds))


def per_example_gradients(model: nn.Module, x: torch.Tensor, soft_labels: torch.Tensor) -> list[torch.Tensor]:
    """Gradient of each example's loss, one ``(batch, *param.shape)`` tensor per trainable parameter
    (torch.func: ``vmap`` over ``grad`` of a functional call of the model on one example)."""
    from torch.func import functional_call, grad, vmap

    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_of_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return soft_cross_entropy(out, yi.unsqueeze(0))

    grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, x, soft_labels)
    return [grads[name] for name in names]


@register_defense("dp-sgd")
class DPSGD(ProtocolDefense):
    """DP-SGD (Abadi et al. 2016): each example's gradient is clipped to L2 norm ``max_grad_norm``, the
    clipped gradients are summed, Gaussian noise of std ``noise_multiplier * max_grad_norm`` is added and
    the sum divided by the batch size (Opacus's convention). ``privacy()`` is (epsilon, delta) from
    Opacus's RDP accountant.

    In the protocol every participant trains locally with DP-SGD on its own data and uploads with
    theta_u / theta_d (selection of DP iterates is post-processing); its epsilon covers all of its local
    steps over the whole run. ``accuracy_setting: centralized`` trains one model with DP-SGD instead.

    The accountant assumes Poisson sampling of each batch with probability ``sample_rate``; the training
    loops here use shuffled fixed-size batches with sample_rate = batch / dataset size, the usual
    approximation (as in Abadi et al.'s "lots")."""

    family = "differential-privacy"
    headline = ("noise_multiplier", "max_grad_norm")
    params = (
        Param("noise_multiplier", float, 1.0, "Gaussian noise std / max_grad_norm", low=0.0),
        Param("max_grad_norm", float, 1.0, "per-example L2 clipping bound", low=0.0),
        Param("delta", float, 1e-5, "delta of the reported (epsilon, delta)", low=0.0, high=1.0),
        Param("accuracy_setting", str, "protocol", "accuracy column from the collaborative protocol or "
              "from centralized DP-SGD training", choices=("protocol", "centralized")),
        _THETA_U,
        _THETA_D,
        *_PROTOCOL_PARAMS,
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _positive(self, "max_grad_norm", "delta", "theta_u")
        if self.delta >= 1:
            raise ConfigError(f"dp-sgd: parameter 'delta' = {self.delta!r} is invalid; allowed: a number in (0, 1)")

    def compute_update(self, model, x, soft_labels, *, generator=None):
        grads = per_example_gradients(model, x, soft_labels)
        batch = x.shape[0]
        norms = torch.cat([g.reshape(batch, -1) for g in grads], dim=1).norm(dim=1)
        scale = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus's clipping factor
        std = self.noise_multiplier * self.max_grad_norm
        noisy = []
        for g in grads:
            summed = torch.einsum("b,b...->...", scale, g)
            noise = torch.randn(summed.shape, generator=generator, dtype=summed.dtype)
            noisy.append((summed + std * noise) / batch)
        return noisy

    def privacy(self, *, steps: int, sample_rate: float) -> dict[str, Any]:
        return {"epsilon": self.epsilon(steps=steps, sample_rate=sample_rate), "delta": self.delta,
                "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "steps": steps, "sample_rate": sample_rate, "accountant": "rdp"}

    def epsilon(self, *, steps: int, sample_rate: float) -> float:
        """Epsilon of ``steps`` DP-SGD steps at ``sample_rate`` from Opacus's RDP accountant."""
        from opacus.accountants import RDPAccountant

        if steps <= 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        accountant = RDPAccountant()
        # the accountant's own record of `steps` identical steps, as RDPAccountant.step() would build it
        accountant.history = [(self.noise_multiplier, min(1.0, sample_rate), steps)]
        return float(accountant.get_epsilon(delta=self.delta))

    def upload_settings(self) -> dict[str, Any]:
        return {"theta_u": self.theta_u, "theta_d": self.theta_d, "upload_criterion": "largest"}

    def local_gradient(self):
        return self.compute_update

    def accuracy_run(self, *, model, train, test, config, seed):
        if self.accuracy_setting == "centralized":
            return Defense.accuracy_run(self, model=model, train=train, test=test, config=config, seed=seed)
        return super().accuracy_run(model=model, train=train, test=test, config=config, seed=seed)

    def protocol_privacy(self, simulator: CollaborativeLearning) -> dict[str, Any]:
        """Per participant: epsilon of all its local DP-SGD steps on its own data; ``epsilon`` is the
        largest (every participant's records are protected at least that well)."""
        batch = simulator.config.batch_size
        per_participant = [
            self.epsilon(steps=p.local_steps, sample_rate=batch / p.num_samples) if p.num_samples else 0.0
            for p in simulator.participants
        ]
        return {"epsilon": max(per_participant), "delta": self.delta, "accountant": "rdp",
                "epsilon_per_participant": per_participant,
                "local_steps": [p.local_steps for p in simulator.participants],
                "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "scope": "record-level, per participant, whole run"}
