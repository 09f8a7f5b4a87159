"""Distributed selective SGD (DSSGD): the collaborative learning protocol of Shokri & Shmatikov
("Privacy-Preserving Deep Learning", CCS 2015), in which Hitaj et al. ("Deep Models Under the GAN",
CCS 2017, Algorithm 1) run their GAN attack.

N participants hold private data defined by label sets; a parameter server holds the global
parameters and counts how often each was updated. Participants take turns. In its turn a participant

1. downloads the fraction ``theta_d`` of the global parameters that were updated most often and
   overwrites those entries of its local model,
2. trains locally with SGD for the agreed epochs,
3. computes its update ``new - old`` and uploads the fraction ``theta_u`` of it chosen by the agreed
   criterion, each value bounded to ``[-gamma, gamma]``; the server adds the uploaded values to the
   global parameters.

With ``upload_criterion="sparse-vector"`` the upload is the differentially private one (sparse vector
technique, :func:`sparse_vector_upload`). Everything agreed in advance is one :class:`ProtocolConfig`;
:class:`CollaborativeLearning` runs it. Everything that moves between participants and server is a
flat parameter vector (``parameters_to_vector`` order), so selection, bounding and noise are single
tensor operations.

An attacker is a :class:`Participant` subclass that overrides :meth:`Participant.train_locally` (its
own code between download and upload); download and upload stay the protocol's, so victims see an
ordinary participant.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageData
from .errors import ConfigError
from .sampling import laplace_noise  # noqa: F401  (also re-exported: collab.laplace_noise)
from .threat import parameter_gradients
from .training import evaluate

UPLOAD_CRITERIA = ("largest", "random", "threshold", "sparse-vector")
ORDERS = ("sequential", "round-robin-async")
OPTIMIZERS = ("sgd", "adam")

# local_gradient(model, x, soft_labels, generator=) -> one gradient per trainable parameter
# (a Defense's compute_update fits: DP-SGD plugs in its per-example clipping and noise here).
LocalGradient = Callable[..., list[torch.Tensor]]


# -- the agreed configuration ------------------------------------------------------------------------

@dataclass(frozen=True)
class ProtocolConfig:
    """Everything the participants agree on before training (Hitaj et al. Algorithm 1, pre-training phase).

    Defaults are the Hitaj et al. MNIST setting (Section 8.4, Figure 6a): two participants with digits
    0-4 and 5-9, SGD with lr 1e-3, decay 1e-7, no momentum, batch 64, full upload and download.
    """

    model: str | None = "hitaj-mnist-cnn"      # registered architecture (unused when an initial model is given)
    model_params: dict = field(default_factory=dict)
    participant_labels: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
    samples_per_participant: int | None = None  # cap on each participant's private data (None: all)
    optimizer: str = "sgd"
    lr: float = 1e-3
    lr_decay: float = 1e-7                       # Torch7 style: lr / (1 + local_step * lr_decay)
    momentum: float = 0.0
    batch_size: int = 64
    local_epochs: int = 1                        # passes over the local data per turn
    local_batches: int | None = None             # optional cap on SGD steps per turn
    theta_u: float = 1.0                         # fraction of the update uploaded per turn
    theta_d: float = 1.0                         # fraction of the global parameters downloaded per turn
    upload_criterion: str = "largest"
    tau: float = 0.0                             # threshold of "threshold" and "sparse-vector" selection
    gamma: float | None = None                   # bound on each uploaded value (None: unbounded)
    epsilon_c: float | None = None               # "sparse-vector" only: privacy budget per uploaded parameter
    order: str = "sequential"
    max_rounds: int = 10                         # stopping rule: at most this many rounds ...
    target_accuracy: float | None = None         # ... or until the global test accuracy reaches this
    evaluate_local: bool = True                  # also test every local model each round (costs time)

    def __post_init__(self) -> None:
        # YAML gives lists; the config is frozen, so normalise once here
        labels = self.participant_labels
        if not isinstance(labels, (list, tuple)) or not labels:
            _bad("participant_labels", labels, "a non-empty list of label lists, one per participant")
        normalised = []
        for entry in labels:
            if not isinstance(entry, (list, tuple)) or any(
                    isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in entry):
                _bad("participant_labels", labels, "a list of lists of class indices >= 0")
            if len(set(entry)) != len(entry):
                _bad("participant_labels", labels, "label lists without repeats")
            normalised.append(tuple(int(v) for v in entry))
        object.__setattr__(self, "participant_labels", tuple(normalised))
        if not isinstance(self.model_params, Mapping):
            _bad("model_params", self.model_params, "a mapping")
        object.__setattr__(self, "model_params", dict(self.model_params))

        if self.model is not None and not isinstance(self.model, str):
            _bad("model", self.model, "a registered model name or null")
        _check_int(self, "samples_per_participant", low=1, nullable=True)
        _check_choice(self, "optimizer", OPTIMIZERS)
        _check_number(self, "lr", low=0.0, low_open=True)
        _check_number(self, "lr_decay", low=0.0)
        _check_number(self, "momentum", low=0.0, high=1.0, high_open=True)
        _check_int(self, "batch_size", low=1)
        _check_int(self, "local_epochs", low=1)
        _check_int(self, "local_batches", low=1, nullable=True)
        _check_number(self, "theta_u", low=0.0, high=1.0, low_open=True)
        _check_number(self, "theta_d", low=0.0, high=1.0)
        _check_choice(self, "upload_criterion", UPLOAD_CRITERIA)
        _check_number(self, "tau", low=0.0)
        _check_number(self, "gamma", low=0.0, low_open=True, nullable=True)
        _check_number(self, "epsilon_c", low=0.0, low_open=True, nullable=True)
        _check_choice(self, "order", ORDERS)
        _check_int(self, "max_rounds", low=0)
        _check_number(self, "target_accuracy", low=0.0, high=1.0, nullable=True)
        if not isinstance(self.evaluate_local, bool):
            _bad("evaluate_local", self.evaluate_local, "true or false")
        if self.upload_criterion == "sparse-vector":
            if self.epsilon_c is None:
                _bad("epsilon_c", None, "a number > 0 (upload_criterion 'sparse-vector' needs a budget)")
            if self.gamma is None:
                _bad("gamma", None, "a number > 0 (the sparse vector technique needs bounded values)")
        elif self.epsilon_c is not None:
            _bad("epsilon_c", self.epsilon_c, "null unless upload_criterion is 'sparse-vector'")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> "ProtocolConfig":
        cfg = dict(cfg or {})
        names = [f.name for f in fields(cls)]
        extra = sorted(set(cfg) - set(names))
        if extra:
            raise ConfigError(f"protocol: unknown key {extra[0]!r}; allowed: {', '.join(names)}")
        return cls(**cfg)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["participant_labels"] = [list(labels) for labels in self.participant_labels]
        return out


def _bad(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"protocol.{key} = {value!r} is invalid; allowed: {allowed}")


def _check_choice(cfg: ProtocolConfig, key: str, choices: Sequence[str]) -> None:
    value = getattr(cfg, key)
    if value not in choices:
        _bad(key, value, "one of " + ", ".join(repr(c) for c in choices))


def _check_int(cfg: ProtocolConfig, key: str, *, low: int, nullable: bool = False) -> None:
    value = getattr(cfg, key)
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _bad(key, value, f"an integer >= {low}" + (" or null" if nullable else ""))


def _check_number(cfg: ProtocolConfig, key: str, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False, high_open: bool = False, nullable: bool = False) -> None:
    value = getattr(cfg, key)
    if value is None and nullable:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        _bad(key, value, "a number" + (f" {bounds}" if bounds else "") + (" or null" if nullable else ""))
    object.__setattr__(cfg, key, float(value))


# -- what is exchanged: counts, selection, bounding, the sparse vector technique ----------------------

def fraction_count(fraction: float, total: int) -> int:
    """``floor(fraction * total)`` (tolerant of float error, e.g. 0.3 * 10), as the papers count
    theta_u |w| and theta_d |w|."""
    return min(total, int(math.floor(fraction * total + 1e-9)))


def upload_count(theta_u: float, num_params: int) -> int:
    """c = theta_u * |w|, the most values one upload may contain (at least one)."""
    return max(1, fraction_count(theta_u, num_params))


def select_upload(delta: torch.Tensor, *, count: int, criterion: str, tau: float = 0.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices (distinct) of the entries of the flat update ``delta`` to upload, without noise.

    ``largest``: the ``count`` largest magnitudes. ``random``: ``count`` uniformly random entries.
    ``threshold``: a random subset of at most ``count`` entries with ``|delta| > tau`` (fewer when
    fewer pass), Shokri-Shmatikov's "random subset of values above a threshold".
    """
    n = delta.numel()
    count = min(count, n)
    if criterion == "largest":
        return torch.topk(delta.abs(), count, sorted=False).indices
    if criterion == "random":
        return torch.randperm(n, generator=generator)[:count]
    if criterion == "threshold":
        above = (delta.abs() > tau).nonzero().flatten()
        return above[torch.randperm(above.numel(), generator=generator)[:count]]
    raise ValueError(f"no plain selection for criterion {criterion!r}")


@dataclass(frozen=True)
class SparseVectorScales:
    """Laplace scales of the DP upload: noise on the threshold, on each candidate, on each released value."""

    threshold: float
    candidate: float
    value: float


def sparse_vector_scales(*, epsilon_c: float, gamma: float, count: int) -> SparseVectorScales:
    """Noise scales of one differentially private upload (Dwork & Roth's NumericSparse, as Shokri &
    Shmatikov use it).

    The budget of one upload (one participant, one epoch) is ``epsilon = count * epsilon_c``: Hitaj et
    al. describe epsilon_c as the budget per parameter, the per-epoch budget being split into c parts.
    With sensitivity ``Delta = 2 * gamma`` (our reading: a released value is bounded to [-gamma, gamma],
    so one record changes it by at most 2 gamma; the selection query |bound(w)| has sensitivity gamma, so
    2 gamma is conservative for it) and ``sigma(e) = 2 c Delta / e``:

    * selection, ``epsilon_1 = 8/9 epsilon``: threshold noise Lap(sigma(epsilon_1)), redrawn after every
      positive answer; candidate noise Lap(2 sigma(epsilon_1));
    * release, ``epsilon_2 = 2/9 epsilon``: value noise Lap(sigma(epsilon_2)). NumericSparse writes the
      release budget as 2/9 epsilon, but each of the c released values costs
      Delta / sigma(epsilon_2) = epsilon / (9 c), i.e. epsilon / 9 in total: the "1/9 for releasing the
      values" of Hitaj et al. Section 9.4 (selection 8/9 + release 1/9 = epsilon).

    ``count`` cancels: threshold 9 Delta / (4 epsilon_c), candidate 9 Delta / (2 epsilon_c), value
    9 Delta / epsilon_c.
    """
    epsilon = count * epsilon_c
    sensitivity = 2.0 * gamma
    epsilon_select, epsilon_release = 8.0 / 9.0 * epsilon, 2.0 / 9.0 * epsilon

    def sigma(budget: float) -> float:
        return 2.0 * count * sensitivity / budget

    return SparseVectorScales(threshold=sigma(epsilon_select), candidate=2.0 * sigma(epsilon_select),
                              value=sigma(epsilon_release))


def sparse_vector_upload(delta: torch.Tensor, *, count: int, epsilon_c: float, tau: float, gamma: float,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The differentially private upload of Shokri & Shmatikov: at most ``count`` entries of the flat
    update, chosen by the sparse vector technique, released with Laplace noise and bounded by gamma.

    Candidates are examined in a random order; candidate j is selected when
    ``|bound(delta_j)| + Lap(candidate) >= tau + rho``, where rho ~ Lap(threshold) is redrawn after each
    selection (NumericSparse); the scan stops after ``count`` selections. A selected value is released
    as ``bound(bound(delta_j) + Lap(value))`` (the outer bound is post-processing: the server never sees
    more than gamma). Returns (indices, values).
    """
    scales = sparse_vector_scales(epsilon_c=epsilon_c, gamma=gamma, count=count)
    n = delta.numel()
    order = torch.randperm(n, generator=generator)
    bounded = delta.detach().to(torch.float64).clamp(-gamma, gamma)
    margin = bounded[order].abs() + laplace_noise(scales.candidate, n, generator=generator) - tau
    thresholds = laplace_noise(scales.threshold, min(count, n), generator=generator)
    chosen = order[_sparse_vector_scan(margin.tolist(), thresholds.tolist())]
    noisy = bounded[chosen] + laplace_noise(scales.value, chosen.numel(), generator=generator)
    return chosen, noisy.clamp(-gamma, gamma).to(delta.dtype)


def _sparse_vector_scan(margins: list[float], thresholds: list[float]) -> list[int]:
    """Positions whose noisy margin passes the current noisy threshold, which changes after each pass.

    The threshold redraw makes this scan inherently sequential: a plain loop over Python floats is O(|w|)
    (a few tens of ms for 10^5 parameters), where a vectorised search per selection would be O(c |w|).
    """
    passed: list[int] = []
    if not thresholds:
        return passed
    current = 0
    for position, margin in enumerate(margins):
        if margin >= thresholds[current]:
            passed.append(position)
            current += 1
            if current == len(thresholds):
                break
    return passed


def sparse_vector_privacy(*, epsilon_c: float, num_params: int, theta_u: float,
                          uploads: int | None = None) -> dict[str, Any]:
    """The record-level guarantee a ``sparse-vector`` setting implies for one participant.

    ``epsilon`` is the budget of one upload (one epoch of one participant), c * epsilon_c: what Shokri &
    Shmatikov claim. It is not composed over epochs; ``epsilon_basic_composition`` says what sequential
    composition over ``uploads`` uploads would give, for comparison (nobody claims it).
    """
    count = upload_count(theta_u, num_params)
    out: dict[str, Any] = {
        "epsilon": count * epsilon_c,
        "delta": 0.0,
        "epsilon_c": epsilon_c,
        "max_shared_per_epoch": count,
        "scope": "record-level, per participant per epoch (one upload); not composed over epochs",
        "accountant": "sparse-vector",
    }
    if uploads is not None:
        out["uploads"] = uploads
        out["epsilon_basic_composition"] = uploads * count * epsilon_c
    return out


Uploader = Callable[[torch.Tensor, torch.Generator], "tuple[torch.Tensor, torch.Tensor]"]


def make_uploader(config: ProtocolConfig) -> Uploader:
    """The agreed upload rule: ``upload(delta, generator) -> (indices, values)``."""

    def upload(delta: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        count = upload_count(config.theta_u, delta.numel())
        if config.upload_criterion == "sparse-vector":
            return sparse_vector_upload(delta, count=count, epsilon_c=config.epsilon_c, tau=config.tau,
                                        gamma=config.gamma, generator=generator)
        index = select_upload(delta, count=count, criterion=config.upload_criterion, tau=config.tau,
                              generator=generator)
        values = delta[index]
        if config.gamma is not None:
            values = values.clamp(-config.gamma, config.gamma)
        return index, values

    return upload


# -- server and participants ---------------------------------------------------------------------------

class ParameterServer:
    """Holds the global flat parameter vector and how many times each entry has been updated."""

    def __init__(self, initial: torch.Tensor) -> None:
        self.params = initial.detach().clone()
        self.update_counts = torch.zeros(initial.numel(), dtype=torch.long)

    @property
    def num_params(self) -> int:
        return self.params.numel()

    def download(self, count: int, *, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``count`` most-updated global parameters (Shokri-Shmatikov's download rule); ties, as at
        the start when every count is 0, are broken at random."""
        n = self.num_params
        if count >= n:
            index = torch.arange(n)
        else:
            shuffled = torch.randperm(n, generator=generator)
            by_count = torch.argsort(self.update_counts[shuffled], descending=True, stable=True)
            index = shuffled[by_count[:count]]
        return index, self.params[index].clone()

    def upload(self, index: torch.Tensor, values: torch.Tensor) -> None:
        """Add an uploaded update to the global parameters (indices are distinct)."""
        self.params.index_add_(0, index, values.to(self.params.dtype))
        self.update_counts.index_add_(0, index, torch.ones_like(index))


def _flat(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return nn.utils.parameters_to_vector([p.detach() for p in params]).clone()


def _assign_flat(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    # copy_ rather than nn.utils.vector_to_parameters, which would alias the parameters to `flat`
    with torch.no_grad():
        for p, chunk in zip(params, flat.split([p.numel() for p in params])):
            p.copy_(chunk.view_as(p))


class Participant:
    """One party of the protocol: a local model, private data, and the agreed download/upload rules.

    :meth:`take_turn` is download -> :meth:`train_locally` -> upload. An attacker subclasses this and
    overrides :meth:`train_locally` (e.g. train a GAN against ``self.model`` and add generated samples
    under the artificial class before calling :meth:`sgd_on`); it may also inspect what it downloaded
    (``self.turn_start``, the parameters at the start of the turn). Overriding ``upload`` would break the
    protocol as victims see it.
    """

    def __init__(self, *, index: int, labels: tuple[int, ...], data: ImageData | None, model: nn.Module,
                 config: ProtocolConfig, num_outputs: int, uploader: Uploader,
                 local_gradient: LocalGradient | None, generator: torch.Generator) -> None:
        self.index = index
        self.labels = labels
        self.data = data
        self.model = model
        self.config = config
        self.num_outputs = num_outputs
        self.uploader = uploader
        self.local_gradient = local_gradient
        self.generator = generator
        self.params = [p for p in model.parameters() if p.requires_grad]
        if config.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(self.params, lr=config.lr)
        else:
            self.optimizer = torch.optim.SGD(self.params, lr=config.lr, momentum=config.momentum)
        self.local_steps = 0                 # all local SGD steps so far (lr decay, DP-SGD accounting)
        self.turn_start: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        return 0 if self.data is None else len(self.data)

    def flat_params(self) -> torch.Tensor:
        return _flat(self.params)

    # the turn -----------------------------------------------------------------------------------
    def take_turn(self, server: ParameterServer) -> dict[str, int]:
        downloaded = self.download(server)
        steps = self.train_locally()
        uploaded = self.upload(server)
        return {"downloaded": downloaded, "steps": steps, "uploaded": uploaded}

    def download(self, server: ParameterServer) -> int:
        """Overwrite the ``theta_d`` most-updated entries of the local model with the global values."""
        count = fraction_count(self.config.theta_d, server.num_params)
        flat = self.flat_params()
        if count:
            index, values = server.download(count, generator=self.generator)
            flat[index] = values
            _assign_flat(self.params, flat)
        self.turn_start = flat
        return count

    def train_locally(self) -> int:
        """Hook: this turn's local training. Default: SGD on the private data for the agreed epochs.
        Returns the number of SGD steps taken."""
        return 0 if self.data is None else self.sgd_on(self.data.images, self.data.labels)

    def upload(self, server: ParameterServer) -> int:
        """Upload the agreed selection of ``new - old`` (old: the parameters after this turn's download)."""
        if self.turn_start is None:
            raise RuntimeError("upload before download: a turn starts with download()")
        delta = self.flat_params() - self.turn_start
        index, values = self.uploader(delta, self.generator)
        server.upload(index, values)
        self.turn_start = None
        return int(index.numel())

    # local SGD ----------------------------------------------------------------------------------
    def sgd_on(self, images: torch.Tensor, labels: torch.Tensor) -> int:
        """``local_epochs`` shuffled passes of mini-batch SGD over (images, labels), at most
        ``local_batches`` steps. Labels are class indices (the artificial class is ``num_outputs - 1``)."""
        cfg = self.config
        n = int(labels.shape[0])
        steps = 0
        for _ in range(cfg.local_epochs):
            order = torch.randperm(n, generator=self.generator)
            for start in range(0, n, cfg.batch_size):
                if cfg.local_batches is not None and steps >= cfg.local_batches:
                    return steps
                idx = order[start:start + cfg.batch_size]
                self.sgd_step(images[idx], F.one_hot(labels[idx], self.num_outputs).float())
                steps += 1
        return steps

    def sgd_step(self, x: torch.Tensor, soft_labels: torch.Tensor) -> None:
        self.model.train()
        for group in self.optimizer.param_groups:  # Torch7 optim.sgd learningRateDecay
            group["lr"] = self.config.lr / (1.0 + self.local_steps * self.config.lr_decay)
        if self.local_gradient is None:
            grads = parameter_gradients(self.model, x, soft_labels)
        else:
            grads = self.local_gradient(self.model, x, soft_labels, generator=self.generator)
        for p, g in zip(self.params, grads):
            p.grad = g.detach().to(p.dtype)
        self.optimizer.step()
        self.local_steps += 1


ParticipantFactory = Callable[..., Participant]


# -- the simulator ----------------------------------------------------------------------------------

@dataclass
class RoundRecord:
    """What one round did: every participant took one turn."""

    round: int
    global_accuracy: float
    local_accuracy: list[float | None]             # each local model on the whole test set
    local_accuracy_own_labels: list[float | None]  # ... on the test samples of its own labels
    downloaded: list[int]                          # parameters downloaded per participant
    uploaded: list[int]                            # parameters uploaded per participant
    local_steps: list[int]
    seconds: float


@dataclass
class ProtocolResult:
    config: ProtocolConfig
    num_params: int
    participant_samples: list[int]
    initial_accuracy: float
    rounds: list[RoundRecord] = field(default_factory=list)
    reached_target: bool = False
    diverged: bool = False

    @property
    def final_accuracy(self) -> float:
        return self.rounds[-1].global_accuracy if self.rounds else self.initial_accuracy

    @property
    def seconds_per_round(self) -> float:
        return sum(r.seconds for r in self.rounds) / max(1, len(self.rounds))

    def summary(self) -> dict[str, Any]:
        """The accuracy-column dict: final global test accuracy plus how the protocol got there."""
        out: dict[str, Any] = {
            "accuracy": self.final_accuracy,
            "setting": "collaborative",
            "rounds": len(self.rounds),
            "reached_target": self.reached_target,
            "diverged": self.diverged,
            "initial_accuracy": self.initial_accuracy,
            "accuracy_per_round": [round(r.global_accuracy, 4) for r in self.rounds],
            "seconds_per_round": round(self.seconds_per_round, 3),
            "train_seconds": round(sum(r.seconds for r in self.rounds), 3),
            "num_params": self.num_params,
            "participant_samples": self.participant_samples,
            "params_downloaded": sum(sum(r.downloaded) for r in self.rounds),
            "params_uploaded": sum(sum(r.uploaded) for r in self.rounds),
            "local_steps": [sum(r.local_steps[i] for r in self.rounds) for i in range(len(self.participant_samples))],
            "protocol": self.config.as_dict(),
        }
        if self.rounds:
            out["final_local_accuracy"] = self.rounds[-1].local_accuracy
        if self.config.upload_criterion == "sparse-vector":
            out["privacy"] = sparse_vector_privacy(epsilon_c=self.config.epsilon_c, num_params=self.num_params,
                                                   theta_u=self.config.theta_u, uploads=len(self.rounds))
        return out


def split_by_labels(train: ImageData, participant_labels: Sequence[Sequence[int]], *,
                    samples_per_participant: int | None, generator: torch.Generator) -> list[ImageData | None]:
    """Each participant's private data: the training samples of its labels. Samples of a label that
    several participants declare are dealt out disjointly (records are private to one participant)."""
    wanted = sorted({label for labels in participant_labels for label in labels})
    if wanted and wanted[-1] >= train.num_classes:
        raise ConfigError(f"protocol.participant_labels: label {wanted[-1]} is out of range; "
                          f"the data has classes 0..{train.num_classes - 1}")
    chosen: list[list[torch.Tensor]] = [[] for _ in participant_labels]
    for label in wanted:
        holders = [i for i, labels in enumerate(participant_labels) if label in labels]
        idx = (train.labels == label).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        for holder, part in zip(holders, idx.tensor_split(len(holders))):
            chosen[holder].append(part)
    out: list[ImageData | None] = []
    for parts in chosen:
        if not parts:
            out.append(None)  # e.g. an adversary with no data of its own
            continue
        idx = torch.cat(parts)
        if samples_per_participant is not None and idx.numel() > samples_per_participant:
            idx = idx[torch.randperm(idx.numel(), generator=generator)[:samples_per_participant]]
        out.append(train.subset(idx.sort().values))
    return out


class CollaborativeLearning:
    """Runs the protocol of ``config`` on ``train`` (split among participants by labels), testing the
    global model on ``test`` after every round.

    ``initial_model``: the agreed initial model (every participant and the server start from it);
    by default built from ``config.model``. ``local_gradient``: how participants compute their local
    gradient (default: the plain mean-loss gradient; DP-SGD passes its own). ``participant_factories``:
    ``{participant index: callable}`` building that participant instead of :class:`Participant`, with
    the same keyword arguments; this is how an attacker joins.
    """

    def __init__(self, config: ProtocolConfig, train: ImageData, test: ImageData, *, seed: int = 0,
                 initial_model: nn.Module | None = None, local_gradient: LocalGradient | None = None,
                 participant_factories: Mapping[int, ParticipantFactory] | None = None) -> None:
        self.config = config
        self.test = test
        self.seed = seed
        if initial_model is None:
            if config.model is None:
                raise ConfigError("protocol.model = None is invalid; allowed: a registered model name "
                                  "(or pass an initial model)")
            from .models import build_model

            initial_model = build_model(config.model, train.shape, train.num_classes, seed=seed,
                                        **config.model_params)
        self.global_model = copy.deepcopy(initial_model)
        self._global_params = [p for p in self.global_model.parameters() if p.requires_grad]
        with torch.no_grad():
            self.global_model.eval()
            num_outputs = int(self.global_model(train.images[:1]).shape[-1])
        if num_outputs < train.num_classes:
            raise ConfigError(f"protocol: the model has {num_outputs} outputs for {train.num_classes} classes")
        self.server = ParameterServer(_flat(self._global_params))
        split_generator = torch.Generator().manual_seed(seed)
        datasets = split_by_labels(train, config.participant_labels,
                                   samples_per_participant=config.samples_per_participant,
                                   generator=split_generator)
        uploader = make_uploader(config)
        factories = dict(participant_factories or {})
        unknown = sorted(set(factories) - set(range(len(datasets))))
        if unknown:
            raise ConfigError(f"protocol: participant_factories names participant {unknown[0]}, "
                              f"but there are {len(datasets)} participants")
        self.participants: list[Participant] = []
        for i, (labels, data) in enumerate(zip(config.participant_labels, datasets)):
            factory = factories.get(i, Participant)
            self.participants.append(factory(
                index=i, labels=labels, data=data, model=copy.deepcopy(initial_model), config=config,
                num_outputs=num_outputs, uploader=uploader, local_gradient=local_gradient,
                generator=torch.Generator().manual_seed(seed * 1009 + i + 1),
            ))
        self._own_label_tests = [
            test.subset((test.labels.unsqueeze(1) == torch.tensor(labels)).any(1).nonzero().flatten())
            if labels else None
            for labels in config.participant_labels
        ]
        self.result = ProtocolResult(config=config, num_params=self.server.num_params,
                                     participant_samples=[p.num_samples for p in self.participants],
                                     initial_accuracy=self.global_accuracy())

    def global_accuracy(self) -> float:
        if not bool(torch.isfinite(self.server.params).all()):
            return 0.0
        _assign_flat(self._global_params, self.server.params)
        return evaluate(self.global_model, self.test)

    def run_round(self) -> RoundRecord:
        started = time.perf_counter()
        turns: list[dict[str, int]]
        if self.config.order == "sequential":
            turns = [p.take_turn(self.server) for p in self.participants]
        else:  # round-robin-async: everyone downloads the same snapshot, uploads land one after another
            downloaded = [p.download(self.server) for p in self.participants]
            turns = []
            for p, count in zip(self.participants, downloaded):
                steps = p.train_locally()
                turns.append({"downloaded": count, "steps": steps, "uploaded": p.upload(self.server)})
        seconds = time.perf_counter() - started
        local, own = self._local_accuracies()
        record = RoundRecord(
            round=len(self.result.rounds) + 1, global_accuracy=self.global_accuracy(),
            local_accuracy=local, local_accuracy_own_labels=own,
            downloaded=[t["downloaded"] for t in turns], uploaded=[t["uploaded"] for t in turns],
            local_steps=[t["steps"] for t in turns], seconds=seconds,
        )
        self.result.rounds.append(record)
        return record

    def _local_accuracies(self) -> tuple[list[float | None], list[float | None]]:
        if not self.config.evaluate_local:
            return [None] * len(self.participants), [None] * len(self.participants)
        overall, own = [], []
        for p, own_test in zip(self.participants, self._own_label_tests):
            overall.append(evaluate(p.model, self.test))
            own.append(evaluate(p.model, own_test) if own_test is not None and len(own_test) else None)
        return overall, own

    def run(self) -> ProtocolResult:
        """Rounds until the global accuracy reaches ``target_accuracy`` or ``max_rounds`` have run."""
        target = self.config.target_accuracy
        while len(self.result.rounds) < self.config.max_rounds:
            record = self.run_round()
            if not bool(torch.isfinite(self.server.params).all()):
                self.result.diverged = True
                break
            if target is not None and record.global_accuracy >= target:
                self.result.reached_target = True
                break
        return self.result


def run_protocol(config: ProtocolConfig, train: ImageData, test: ImageData, *, seed: int = 0,
                 **kwargs: Any) -> ProtocolResult:
    """Convenience: ``CollaborativeLearning(config, train, test, seed=seed, **kwargs).run()``."""
    return CollaborativeLearning(config, train, test, seed=seed, **kwargs).run()


def split_labels(num_classes: int, participants: int) -> tuple[tuple[int, ...], ...]:
    """Contiguous disjoint label blocks, e.g. 10 classes, 2 participants: (0-4, 5-9)."""
    if not 1 <= participants <= num_classes:
        raise ConfigError(f"participants = {participants} is invalid; allowed: 1 to {num_classes} "
                          f"(one label block each)")
    return tuple(tuple(int(c) for c in block) for block in np.array_split(np.arange(num_classes), participants))
