"""The GAN attack on collaborative learning (Hitaj, Ateniese, Perez-Cruz, "Deep Models Under the GAN",
CCS 2017), active (Algorithm 1) and passive.

The adversary is an ordinary participant of distributed selective SGD (:mod:`leakbench.collab`) that
declares labels [b, c] while the victim holds [a, b]. In each of its turns it downloads, copies its
freshly updated local model as the discriminator D, trains a DCGAN generator G so that D classifies
G's samples as the victim's class a, and then trains the shared model on its own data:

* ``gan-active`` merges G's samples, labelled with the artificial class c (the model's last output),
  into its local data, so the shared model learns to tell "a" from "G's a" and the victim, to keep its
  class a apart, releases finer details of it (the paper's "influence");
* ``gan-passive`` trains G the same way but injects nothing: it only watches the shared model (the
  paper's "no influence", Figs. 9 and 10).

Both return the generated samples and a per-round trace (global accuracy, G's loss, and, with an
oracle, the leak score as training proceeds): :meth:`GanAttack.run_collaborative`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..collab import CollaborativeLearning, Participant, ProtocolConfig, ProtocolResult
from ..data import ImageData
from ..errors import ConfigError
from ..params import Param
from ..registry import register_attack
from .base import Attack


# -- the generator (Section 8.3, Figures 16 and 18) -------------------------------------------------------

class DCGANGenerator(nn.Module):
    """DCGAN generator (Radford et al.; Hitaj et al. Section 8.3): transposed convolutions, batch norm
    and ReLU after all but the last, tanh output in [-1, 1]; input a ``latent_dim`` uniform vector.

    A first 4x4 transposed convolution from the latent vector, then stride-2 layers doubling the side
    and halving the width up to ``image_size``: 4 layers for 32x32 (MNIST), 5 for 64x64 (AT&T), the
    count the paper derives automatically. Weights N(0, 0.02) (biases off, as in DCGAN: batch norm
    follows); batch-norm scales N(1, 0.02) as in DCGAN's torch code.
    """

    def __init__(self, *, image_size: int, channels: int = 1, latent_dim: int = 100, width: int = 64,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if image_size < 8 or image_size & (image_size - 1):
            raise ConfigError(f"generator image_size = {image_size} is invalid; allowed: a power of 2 >= 8")
        self.latent_dim = latent_dim
        upsamplings = int(math.log2(image_size)) - 2  # 4 -> image_size by doubling
        planes = width * 2 ** (upsamplings - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, planes, 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(planes), nn.ReLU(True)]
        for _ in range(upsamplings - 1):
            layers += [nn.ConvTranspose2d(planes, planes // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(planes // 2), nn.ReLU(True)]
            planes //= 2
        layers += [nn.ConvTranspose2d(planes, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.ConvTranspose2d):
                nn.init.normal_(module.weight, 0.0, 0.02, generator=generator)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02, generator=generator)
                nn.init.zeros_(module.bias)

    def sample_latent(self, n: int, *, generator: torch.Generator | None) -> torch.Tensor:
        """z ~ U(-1, 1)^latent_dim (DCGAN's torch code, "uniform" noise)."""
        return torch.rand(n, self.latent_dim, 1, 1, generator=generator) * 2 - 1

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


# -- the adversary ----------------------------------------------------------------------------------------

class GanAdversary(Participant):
    """Algorithm 1's adversary: an ordinary participant whose local step first trains G against a copy of
    its freshly downloaded model, then (``inject``) trains the shared model on its data plus G's samples
    labelled with the artificial class."""

    def __init__(self, *, target_class: int, inject: bool, image_generator: DCGANGenerator,
                 generator_optimizer: torch.optim.Optimizer, generator_steps: int, generator_batch: int,
                 fake_samples: int, **participant: Any) -> None:
        super().__init__(**participant)
        self.target_class = target_class
        self.inject = inject
        self.image_generator = image_generator
        self.generator_optimizer = generator_optimizer
        self.generator_steps = generator_steps
        self.generator_batch = generator_batch
        self.fake_samples = fake_samples
        self.fake_class = self.num_outputs - 1  # the artificial class c of the hitaj-* models
        self.generator_losses: list[float] = []

    def train_locally(self) -> int:
        self.generator_losses.append(self.train_generator())
        if not self.inject:
            return super().train_locally()
        with torch.no_grad():
            self.image_generator.train()  # batch statistics, as G was trained
            fakes = self.image_generator(self.image_generator.sample_latent(self.fake_samples,
                                                                            generator=self.generator))
        fake_labels = torch.full((self.fake_samples,), self.fake_class, dtype=torch.long)
        if self.data is None:  # the multi-participant case: an adversary without data of its own
            return self.sgd_on(fakes, fake_labels)
        return self.sgd_on(torch.cat([self.data.images, fakes]), torch.cat([self.data.labels, fake_labels]))

    def train_generator(self) -> float:
        """Steps 6-8: D is a frozen replica of the freshly updated local model; G is updated so that D
        assigns its samples to the victim's class (the NLL of class a under D)."""
        discriminator = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.image_generator.train()
        target = torch.full((self.generator_batch,), self.target_class, dtype=torch.long)
        loss = torch.tensor(float("nan"))
        for _ in range(self.generator_steps):
            fakes = self.image_generator(self.image_generator.sample_latent(self.generator_batch,
                                                                            generator=self.generator))
            # log_softmax: the hitaj models already end in LogSoftmax (idempotent), others give logits
            loss = F.nll_loss(F.log_softmax(discriminator(fakes), -1), target)
            self.generator_optimizer.zero_grad()
            loss.backward()
            self.generator_optimizer.step()
        return float(loss.detach())


# -- results -----------------------------------------------------------------------------------------------

@dataclass
class GanAttackResult:
    """What the adversary ends with: samples of the victim's class, and how they came about."""

    attack: str
    target_class: int
    adversary: int
    samples: torch.Tensor                     # in the data's scale ([-1, 1] for the paper's setting)
    trace: list[dict[str, Any]]               # one entry per round
    protocol: ProtocolResult
    seconds_per_round: float
    final_score: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out = {"attack": self.attack, "setting": "collaborative", "target_class": self.target_class,
               "adversary": self.adversary, "rounds": len(self.trace),
               "seconds_per_round": round(self.seconds_per_round, 3),
               "accuracy": self.protocol.final_accuracy, "trace": self.trace, "params": self.params}
        if self.final_score is not None:
            out["leak"] = {k: v for k, v in self.final_score.items() if k != "nearest_l1_index"}
        return out


# round -> images of the current generator -> score dict (e.g. an oracle's)
RoundScorer = Callable[[torch.Tensor], dict[str, Any]]


class GanAttack(Attack):
    """Shared parameters and entry point of ``gan-active`` and ``gan-passive``.

    The shared model's lr, batch size, rounds, theta_u / theta_d and the participants' labels are the
    protocol's (:class:`~leakbench.collab.ProtocolConfig`, defaults Section 8.4: SGD lr 1e-3, decay
    1e-7, batch 64); the attack's parameters are the adversary's own.
    """

    setting: ClassVar[str] = "collaborative"
    inject: ClassVar[bool]

    params = (
        Param("target_class", int, 0, "the victim's class a that G learns to generate", low=0),
        Param("adversary", int, -1, "index of the adversary in protocol.participant_labels (-1: the last)"),
        Param("generator_lr", float, 0.02, "SGD lr of G (Section 8.4: 0.02)", low=1e-8),
        Param("generator_optimizer", str, "sgd", "G's optimiser (paper: SGD; DCGAN: Adam, beta1 0.5)",
              choices=("sgd", "adam")),
        Param("generator_steps", int, 0,
              "G updates per adversary turn; 0: one per local mini-batch of the adversary's turn "
              "(the paper's AT&T rule: data size / batch size)", low=0),
        Param("generator_batch", int, 64, "samples per G update (Section 8.4 batch 64)", low=2),
        Param("generator_width", int, 64, "planes of G's last hidden layer (DCGAN ngf = 64)", low=1),
        Param("latent_dim", int, 100, "G's uniform input (Section 8.3: 100)", low=1),
        Param("fake_samples", int, 0,
              "active only: G samples merged into the adversary's data per turn; 0: as many as the "
              "adversary holds of one class (the fake class is balanced), 64 without data", low=0),
        Param("samples", int, 64, "samples drawn from the final G (and each round's G for the trace)", low=1),
    )

    def participant_factory(self, *, protocol: ProtocolConfig, image_shape: tuple[int, int, int], seed: int
                            ) -> Callable[..., GanAdversary]:
        channels, height, width = image_shape
        if height != width:
            raise ConfigError(f"{self.registry_name}: needs square images, got {height}x{width}")
        init = torch.Generator().manual_seed(seed * 7919 + 17)
        image_generator = DCGANGenerator(image_size=height, channels=channels, latent_dim=self.latent_dim,
                                         width=self.generator_width, generator=init)
        if self.generator_optimizer == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(image_generator.parameters(),
                                                                lr=self.generator_lr, betas=(0.5, 0.999))
        else:
            optimizer = torch.optim.SGD(image_generator.parameters(), lr=self.generator_lr)

        def build(**participant: Any) -> GanAdversary:
            data = participant["data"]
            held = 0 if data is None else len(data)
            local_batches = math.ceil(held / protocol.batch_size) * protocol.local_epochs if held else 1
            if protocol.local_batches is not None:
                local_batches = min(local_batches, protocol.local_batches)
            fake = self.fake_samples or (held // len(participant["labels"]) if held else 64)
            return GanAdversary(target_class=self.target_class, inject=self.inject,
                                image_generator=image_generator, generator_optimizer=optimizer,
                                generator_steps=self.generator_steps or local_batches,
                                generator_batch=self.generator_batch, fake_samples=fake, **participant)

        return build

    def run_collaborative(self, *, protocol: ProtocolConfig, train: ImageData, test: ImageData,
                          defense: Any = None, seed: int = 0, round_scorer: RoundScorer | None = None,
                          initial_model: nn.Module | None = None) -> GanAttackResult:
        """Run the protocol with the adversary in it; return G's samples and the per-round trace.

        ``defense``: a protocol defense (``selective-sharing``, ``dssgd-dp``, ``dp-sgd``: its upload rule
        and local gradient replace the protocol's) or a gradient defense (``gaussian-noise``, pruning,
        quantization: applied by every participant to its update before the agreed upload rule).
        ``round_scorer(samples) -> dict``: scores the samples of the current G after every round (e.g. an
        oracle's accuracy) for the trace.
        """
        labels = protocol.participant_labels
        adversary = self.adversary % len(labels) if -len(labels) <= self.adversary < len(labels) else None
        if adversary is None:
            raise ConfigError(f"{self.registry_name}: adversary = {self.adversary} is out of range for "
                              f"{len(labels)} participants")
        if self.target_class in labels[adversary] or not any(self.target_class in l for l in labels):
            raise ConfigError(f"{self.registry_name}: target_class {self.target_class} must be held by a "
                              f"victim and not by the adversary (labels {[list(l) for l in labels]})")
        protocol, local_gradient, wrap_uploader = _apply_defense(protocol, defense)
        factory = self.participant_factory(protocol=protocol, image_shape=train.shape, seed=seed)
        factories = {i: (factory if i == adversary else Participant) for i in range(len(labels))}
        if wrap_uploader is not None:
            factories = {i: _with_uploader(f, wrap_uploader) for i, f in factories.items()}
        simulator = CollaborativeLearning(protocol, train, test, seed=seed, initial_model=initial_model,
                                          local_gradient=local_gradient, participant_factories=factories)
        attacker = simulator.participants[adversary]
        assert isinstance(attacker, GanAdversary)
        if attacker.fake_class < train.num_classes:
            raise ConfigError(f"{self.registry_name}: the model needs an artificial class (outputs = classes "
                              f"+ 1, e.g. hitaj-mnist-cnn with extra_class: true)")
        probe = attacker.image_generator.sample_latent(self.samples,
                                                       generator=torch.Generator().manual_seed(seed + 4242))
        trace: list[dict[str, Any]] = []
        target = protocol.target_accuracy
        while len(simulator.result.rounds) < protocol.max_rounds:
            record = simulator.run_round()
            entry: dict[str, Any] = {"round": record.round, "global_accuracy": round(record.global_accuracy, 4),
                                     "generator_loss": round(attacker.generator_losses[-1], 4),
                                     "seconds": round(record.seconds, 3)}
            if round_scorer is not None:
                entry.update(round_scorer(self.generate(attacker.image_generator, probe)))
            trace.append(entry)
            if not bool(torch.isfinite(simulator.server.params).all()):
                simulator.result.diverged = True
                break
            if target is not None and record.global_accuracy >= target:
                simulator.result.reached_target = True
                break
        return GanAttackResult(attack=self.registry_name, target_class=self.target_class, adversary=adversary,
                               samples=self.generate(attacker.image_generator, probe), trace=trace,
                               protocol=simulator.result, seconds_per_round=simulator.result.seconds_per_round,
                               params=self.get_params())

    @staticmethod
    def generate(image_generator: DCGANGenerator, latent: torch.Tensor) -> torch.Tensor:
        """Samples for scoring, with batch statistics as in training. The probe batch's statistics differ
        from a training batch's only by sampling noise; using running averages instead gives washed-out
        samples early on, when G changes fast. The running averages are restored afterwards."""
        state = copy.deepcopy(image_generator.state_dict())
        with torch.no_grad():
            image_generator.train()
            images = image_generator(latent)
        image_generator.load_state_dict(state)
        return images


@register_attack("gan-active")
class GanActive(GanAttack):
    """Hitaj et al. Algorithm 1: G's samples go into the shared model's training as the artificial class."""

    inject = True


@register_attack("gan-passive")
class GanPassive(GanAttack):
    """The same generator training without injecting anything (no influence on the victims)."""

    inject = False


# -- defenses in the protocol ------------------------------------------------------------------------------

def _apply_defense(protocol: ProtocolConfig, defense: Any):
    """(protocol, local_gradient, uploader wrapper or None) for a defense object or None."""
    if defense is None:
        return protocol, None, None
    if hasattr(defense, "upload_settings"):  # a ProtocolDefense: its upload rule is the protocol's
        settings = defense.upload_settings()
        return dataclasses.replace(protocol, **settings), defense.local_gradient(), None
    # a gradient defense: every participant transforms its update (new - old) before the upload rule
    return protocol, None, defense


def _with_uploader(factory: Callable[..., Participant], defense: Any) -> Callable[..., Participant]:
    def build(**participant: Any) -> Participant:
        shapes = [p.shape for p in participant["model"].parameters() if p.requires_grad]
        agreed = participant["uploader"]

        def upload(delta: torch.Tensor, generator: torch.Generator):
            pieces = [t.view(s) for t, s in zip(delta.split([math.prod(s) for s in shapes]), shapes)]
            transformed = defense.transform(pieces, generator=generator)
            return agreed(torch.cat([t.reshape(-1) for t in transformed]), generator)

        return factory(**{**participant, "uploader": upload})

    return build
