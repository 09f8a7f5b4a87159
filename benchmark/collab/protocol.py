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
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageData
from ..errors import ConfigError
from ..models import build_model
from ..threat import parameter_gradients
from ..training import evaluate
from .config import ProtocolConfig
from .sparse_vector import sparse_vector_privacy, sparse_vector_upload
from .upload import fraction_count, select_upload, upload_count

# local_gradient(model, x, soft_labels, generator=) -> one gradient per trainable parameter
# (a Defense's compute_update fits: DP-SGD plugs in its per-example clipping and noise here).
LocalGradient = Callable[..., list[torch.Tensor]]


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
