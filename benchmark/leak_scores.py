"""Numbers for attacks that produce *class representatives* rather than copies of one record: the GAN
attack of Hitaj et al. (CCS 2017) and model inversion (Fredrikson et al., CCS 2015).

Such samples are judged by eye in the papers. leakbench scores them with

* an **oracle**: an independent classifier trained on held-out data that no participant ever saw; the
  score is the fraction of samples it assigns to the target class and its mean confidence in that class;
* **nearest-neighbour similarity** to the victim's images of the target class: for each sample the
  closest real image by L1 (what the paper shows) and the most similar one by SSIM;
* a **verdict** (:class:`LeakRule`): a sample is a recognisable leak when the oracle assigns it to the
  target class *and* its nearest real image is at least ``min_ssim`` similar. Requiring both keeps out
  adversarial patterns that fool classifiers without looking like the class, and blurry averages that
  resemble real images without carrying the class. The setting is *defended* when the leak rate is at
  most ``max_leak_rate``, the same column format as the gradient attacks' recognisability rule.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageData
from .errors import ConfigError
from .params import Param, check_section
from .metrics import METRICS


# -- the oracle ---------------------------------------------------------------------------------------

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
    from sklearn.model_selection import train_test_split

    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"oracle fraction = {fraction!r} is invalid; allowed: a number in (0, 1)")
    index = np.arange(len(data))
    keep, held = train_test_split(index, test_size=fraction, random_state=seed, stratify=data.labels.numpy())
    return data.subset(np.sort(keep)), data.subset(np.sort(held))


# -- nearest neighbours ---------------------------------------------------------------------------------

def nearest_neighbours(samples: torch.Tensor, references: torch.Tensor, *, ssim_chunk: int = 4096
                       ) -> dict[str, torch.Tensor]:
    """For each sample (both on [0, 1]): the mean absolute pixel difference to its L1-nearest reference
    and that reference's index, and the highest SSIM to any reference and its index."""
    l1 = torch.cdist(samples.flatten(1).double(), references.flatten(1).double(), p=1) / samples[0].numel()
    l1_best, l1_index = l1.min(dim=1)
    ssim = METRICS.build("ssim")
    n, m = len(samples), len(references)
    # every (sample, reference) pair in chunks: torchmetrics' SSIM is pairwise on aligned batches
    pairs_s = torch.arange(n).repeat_interleave(m)
    pairs_r = torch.arange(m).repeat(n)
    values = torch.cat([ssim.per_sample(samples[pairs_s[i:i + ssim_chunk]], references[pairs_r[i:i + ssim_chunk]])
                        for i in range(0, n * m, ssim_chunk)])
    ssim_best, ssim_index = values.view(n, m).max(dim=1)
    return {"l1": l1_best.float(), "l1_index": l1_index, "ssim": ssim_best.float(), "ssim_index": ssim_index}


# -- the verdict --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LeakRule:
    """A sample is a recognisable leak when the oracle assigns it to the target class and its most
    similar real image of that class has SSIM >= ``min_ssim``; a setting is defended when the fraction
    of such samples (the leak rate) is at most ``max_leak_rate``.

    SSIM does not tell classes apart (the oracle does); it tells real-looking images from noise.
    ``min_ssim`` 0.3 is our calibration on the embedded digits at 32x32, best SSIM against the training
    images of a class: test digits of that class 0.65-0.95, of other classes 0.27-0.77, uniform noise
    0.005-0.05, flat grey 0.04, an all-black image 0.25-0.28 (see docs/gan.md)."""

    min_ssim: float = 0.3
    max_leak_rate: float = 0.25

    @classmethod
    def from_config(cls, cfg: dict | None) -> "LeakRule":
        """From a grid's ``gan_verdict:`` mapping; bad keys and values raise one-line ConfigErrors."""
        return cls(**check_section("gan_verdict", cfg, (
            Param("min_ssim", float), Param("max_leak_rate", float, low=0.0, high=1.0))))

    def leaks(self, oracle_assigned: list[bool], nn_ssim: list[float]) -> list[bool]:
        return [bool(a) and s >= self.min_ssim for a, s in zip(oracle_assigned, nn_ssim)]

    def defended(self, leak_rate: float) -> bool:
        return leak_rate <= self.max_leak_rate

    def describe(self) -> str:
        return (f"a sample leaks when the oracle assigns it to the target class and its nearest real image "
                f"has SSIM >= {self.min_ssim:g}; a defense holds when the leak rate is <= {self.max_leak_rate:g}")


def _distribution(values: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(values.double(), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    return {k: round(float(v), 4) for k, v in zip(("min", "q25", "median", "q75", "max"), q)}


def score_samples(samples: torch.Tensor, *, target_class: int, oracle: Oracle, references: ImageData,
                  rule: LeakRule = LeakRule()) -> dict[str, Any]:
    """The full score of class-representative samples (in the scale of ``references``): oracle
    accuracy and confidence, nearest-neighbour L1 and SSIM to ``references``' images of
    ``target_class`` (mean and distribution), leak rate and verdict."""
    target_images = references.images[references.labels == target_class]
    if not len(target_images):
        raise ValueError(f"no reference images of class {target_class}")
    samples = samples.detach().float()
    oracle_part = oracle.score(samples, target_class)
    neighbours = nearest_neighbours(references.to_unit(samples).clamp(0, 1), references.to_unit(target_images))
    leaks = rule.leaks(oracle_part["oracle_assigned"], neighbours["ssim"].tolist())
    leak_rate = sum(leaks) / len(leaks)
    return {
        "target_class": target_class,
        "samples": len(samples),
        "oracle_accuracy": round(oracle_part["oracle_accuracy"], 4),
        "oracle_confidence": round(oracle_part["oracle_confidence"], 4),
        "nn_l1": round(float(neighbours["l1"].mean()), 4),
        "nn_l1_distribution": _distribution(neighbours["l1"]),
        "nn_ssim": round(float(neighbours["ssim"].mean()), 4),
        "nn_ssim_distribution": _distribution(neighbours["ssim"]),
        "leak_rate": round(leak_rate, 4),
        "defended": rule.defended(leak_rate),
        "verdict_rule": rule.describe(),
        "rule": asdict(rule),
        "nearest_l1_index": neighbours["l1_index"].tolist(),  # into the target class's reference images
    }


# -- pictures -----------------------------------------------------------------------------------------

def save_image_grid(samples: torch.Tensor, *, references: ImageData, target_class: int, path: str | Path,
                    columns: int = 10, title: str | None = None) -> Path:
    """The papers' figure: each column a real image of the target class (top, the L1-nearest to the
    sample) above a generated sample (bottom). Images in the scale of ``references``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target_images = references.images[references.labels == target_class]
    shown = references.to_unit(samples[:columns].detach().float()).clamp(0, 1)
    index = nearest_neighbours(shown, references.to_unit(target_images))["l1_index"]
    nearest = references.to_unit(target_images[index])
    fig, axes = plt.subplots(2, len(shown), figsize=(1.1 * len(shown), 2.4), squeeze=False)
    for col in range(len(shown)):
        for row, image in enumerate((nearest[col], shown[col])):
            ax = axes[row][col]
            ax.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
