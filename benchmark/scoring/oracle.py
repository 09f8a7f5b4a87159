"""The oracle that judges class representatives (GAN samples, inverted images): a classifier trained on
data held out from every participant, so that it knows the victim's class without having learned it
from any record the attack could have seen."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageData
from ..errors import ConfigError
from ..params import Param


class OracleNet(nn.Module):
    """A small ReLU CNN, deliberately unlike the shared tanh model (Hitaj et al.'s D), so that samples
    overfitted to D's decision boundary do not transfer to it for free."""

    def __init__(self, *, channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(),
                                        nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Oracle:
    """An independently trained classifier that judges generated samples."""

    def __init__(self, *, model: nn.Module, num_classes: int, train_samples: int) -> None:
        self.model = model.eval()
        self.num_classes = num_classes
        self.train_samples = train_samples

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.softmax(self.model(chunk), -1) for chunk in images.split(512)])

    def accuracy(self, data: ImageData) -> float:
        return float((self.probabilities(data.images).argmax(-1) == data.labels).float().mean())

    def score(self, samples: torch.Tensor, target_class: int) -> dict[str, Any]:
        """Fraction of ``samples`` (data scale) assigned to ``target_class``, and mean confidence in it."""
        probs = self.probabilities(samples)
        assigned = probs.argmax(-1) == target_class
        return {"oracle_accuracy": float(assigned.float().mean()),
                "oracle_confidence": float(probs[:, target_class].mean()),
                "oracle_assigned": assigned.tolist()}


# A grid's `oracle:` section; the defaults suit MNIST and the digits. Small datasets need more epochs:
# AT&T's held-out faces (96, two batches an epoch) leave the oracle at 12.5% test accuracy on its 40
# people after 8 epochs and at 62.5% after 75 (hitaj-faces.yaml sets it).
ORACLE_PARAMS = (
    Param("epochs", int, 8, "passes over the oracle's held-out data", low=1),
    Param("lr", float, 3e-3, "Adam learning rate", low=1e-8),
    Param("batch_size", int, 64, "batch size", low=1),
)


def train_oracle(data: ImageData, *, seed: int = 0, epochs: int = 8, lr: float = 3e-3,
                 batch_size: int = 64) -> Oracle:
    """Adam on ``data`` (held out from every participant). Deterministic for a fixed seed on CPU."""
    generator = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # layer initialisation draws from the global generator
    model = OracleNet(channels=data.shape[0], image_size=data.shape[1], num_classes=data.num_classes)
    torch.random.set_rng_state(torch_state)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(data.images[idx]), data.labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return Oracle(model=model, num_classes=data.num_classes, train_samples=len(data))


def holdout_split(data: ImageData, *, fraction: float, seed: int = 0) -> tuple[ImageData, ImageData]:
    """(participants' pool, oracle's pool): a stratified disjoint split, so that the oracle never sees
    a record any participant holds."""
    from sklearn.model_selection import train_test_split  # on first use: importing it takes ~2 s

    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"oracle fraction = {fraction!r} is invalid; allowed: a number in (0, 1)")
    index = np.arange(len(data))
    keep, held = train_test_split(index, test_size=fraction, random_state=seed, stratify=data.labels.numpy())
    return data.subset(np.sort(keep)), data.subset(np.sort(held))
