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
  resemble real images without carrying the class. ``min_ssim`` is calibrated per dataset and target
  class by default (:func:`calibrate_min_ssim`). The setting is *defended* when the leak rate is at
  most ``max_leak_rate``, the same column format as the gradient attacks' recognisability rule.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import ImageData
from ..errors import ConfigError
from ..params import Param, check_section
from .oracle import Oracle
from .ssim import pairwise_ssim

# -- nearest neighbours ---------------------------------------------------------------------------------

def nearest_neighbours(samples: torch.Tensor, references: torch.Tensor) -> dict[str, torch.Tensor]:
    """For each sample (both on [0, 1]): the mean absolute pixel difference to its L1-nearest reference
    and that reference's index, and the highest SSIM to any reference and its index."""
    l1 = torch.cdist(samples.flatten(1).double(), references.flatten(1).double(), p=1) / samples[0].numel()
    l1_best, l1_index = l1.min(dim=1)
    ssim_best, ssim_index = pairwise_ssim(samples, references).max(dim=1)
    return {"l1": l1_best.float(), "l1_index": l1_index, "ssim": ssim_best.float(), "ssim_index": ssim_index}


# -- the verdict --------------------------------------------------------------------------------------

AUTO = "auto"


@dataclass(frozen=True)
class SsimCalibration:
    """Where the nearest-neighbour SSIM of real images lies for one dataset and target class, measured
    against the same reference images the samples are compared with, and the threshold derived from it.

    ``structureless``: held-out images of the target class with their pixels randomly permuted (the
    class's own intensities, no spatial structure): the null distribution of the ``auto`` threshold.
    ``other_class`` / ``same_class``: real held-out images of the other classes / of the target class,
    reported beside it (and ``real_other_threshold``, the same percentile of ``other_class``, gives the
    strict leak rate: samples as similar to the class as real images of other classes rarely are)."""

    threshold: float
    percentile: float
    real_other_threshold: float
    structureless: dict
    other_class: dict
    same_class: dict
    images: dict

    def describe(self) -> str:
        return (f"min_ssim auto = {self.threshold:.3f}: the {self.percentile:g}th percentile of the nearest-neighbour "
                f"SSIM of {self.images['structureless']} held-out target-class images with their pixels randomly "
                f"permuted (real images of the class reach median {self.same_class['median']:.2f}, of other "
                f"classes {self.other_class['median']:.2f})")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "method": "percentile of pixel-permuted held-out target-class images",
                "description": self.describe()}


def calibrate_min_ssim(references: ImageData, held_out: ImageData, target_class: int, *, percentile: float = 95.0,
                       images: int = 100, seed: int = 0) -> SsimCalibration:
    """Measure the nearest-neighbour SSIM (against ``references``' images of ``target_class``, as
    :func:`score_samples` does) of up to ``images`` held-out images of each kind, and take the
    ``percentile`` of the pixel-permuted ones as ``min_ssim``.

    Why this null: SSIM is the rule's test of *structure* (the oracle tests the class). Measured on
    32x32 digits and MNIST (docs/gan.md), real images of other classes reach 0.37-0.75 against a class's
    images, so a cutoff above them rejects every generated sample of our CPU-scale runs, including ones
    the oracle takes for the class 61% of the time, while pixel-permuted images of the class reach
    0.01-0.04, as do noise and the adversarial patterns that fool classifiers. A sample above this
    null shares spatial structure with a real image of the class that chance arrangements of the
    class's own pixels do not."""
    generator = torch.Generator().manual_seed(seed)
    targets = references.to_unit(references.images[references.labels == target_class])
    if not len(targets):
        raise ValueError(f"no reference images of class {target_class}")

    def draw(mask: torch.Tensor) -> torch.Tensor:
        index = mask.nonzero().flatten()
        index = index[torch.randperm(len(index), generator=generator)[:images]]
        if not len(index):
            raise ValueError(f"calibration: the held-out split has no images for this draw (class {target_class})")
        return held_out.to_unit(held_out.images[index])

    same = draw(held_out.labels == target_class)
    other = draw(held_out.labels != target_class)
    flat = same.flatten(1)
    order = torch.stack([torch.randperm(flat.shape[1], generator=generator) for _ in range(len(flat))])
    permuted = torch.gather(flat, 1, order).view_as(same)
    nn_ssim = {name: pairwise_ssim(x, targets).max(dim=1).values
               for name, x in (("structureless", permuted), ("other_class", other), ("same_class", same))}
    q = percentile / 100.0
    return SsimCalibration(
        threshold=round(float(torch.quantile(nn_ssim["structureless"].double(), q)), 4),
        percentile=percentile,
        real_other_threshold=round(float(torch.quantile(nn_ssim["other_class"].double(), q)), 4),
        structureless=_distribution(nn_ssim["structureless"]),
        other_class=_distribution(nn_ssim["other_class"]), same_class=_distribution(nn_ssim["same_class"]),
        images={k: len(v) for k, v in nn_ssim.items()},
    )


@dataclass(frozen=True)
class LeakRule:
    """A sample is a recognisable leak when the oracle assigns it to the target class and its most
    similar real image of that class has SSIM >= ``min_ssim``; a setting is defended when the fraction
    of such samples (the leak rate) is at most ``max_leak_rate``.

    SSIM does not tell classes apart (the oracle does); it tells images with the class's spatial
    structure from noise and adversarial patterns. ``min_ssim: auto`` (the default) calibrates the
    cutoff per dataset and target class (:func:`calibrate_min_ssim`, ``percentile`` of pixel-permuted
    held-out images of the class, ``calibration_images`` of each kind); a number fixes it."""

    min_ssim: float | str = AUTO
    max_leak_rate: float = 0.25
    percentile: float = 95.0
    calibration_images: int = 100

    @classmethod
    def from_config(cls, cfg: dict | None) -> "LeakRule":
        """From a grid's ``gan_verdict:`` mapping; bad keys and values raise one-line ConfigErrors."""
        checked = check_section("gan_verdict", cfg, (
            Param("max_leak_rate", float, low=0.0, high=1.0), Param("percentile", float, low=0.0, high=100.0),
            Param("calibration_images", int, low=2)), also=("min_ssim",))
        value = checked.get("min_ssim", AUTO)
        if value != AUTO:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= value <= 1.0:
                raise ConfigError(f"gan_verdict.min_ssim = {value!r} is invalid; allowed: auto, or a number in [-1, 1]")
            checked["min_ssim"] = float(value)
        return cls(**checked)

    @property
    def calibrated(self) -> bool:
        return self.min_ssim == AUTO

    def calibrate(self, references: ImageData, held_out: ImageData, target_class: int, *, seed: int = 0
                  ) -> SsimCalibration:
        return calibrate_min_ssim(references, held_out, target_class, percentile=self.percentile,
                                  images=self.calibration_images, seed=seed)

    def threshold(self, calibration: SsimCalibration | None) -> float:
        """The SSIM cutoff in force: the number given, or the calibrated one."""
        if not self.calibrated:
            return float(self.min_ssim)
        if calibration is None:
            raise ValueError("gan_verdict.min_ssim is 'auto': pass the calibration "
                             "(LeakRule.calibrate on the references and held-out images)")
        return calibration.threshold

    def leaks(self, oracle_assigned: list[bool], nn_ssim: list[float], min_ssim: float | None = None) -> list[bool]:
        cutoff = self.threshold(None) if min_ssim is None else min_ssim
        return [bool(a) and s >= cutoff for a, s in zip(oracle_assigned, nn_ssim)]

    def defended(self, leak_rate: float) -> bool:
        return leak_rate <= self.max_leak_rate

    def describe(self, calibration: SsimCalibration | None = None) -> str:
        cutoff = (calibration.describe() if calibration is not None else
                  f"the {self.percentile:g}th percentile of pixel-permuted held-out target-class images"
                  if self.calibrated else f"{float(self.min_ssim):g}")
        return (f"a sample leaks when the oracle assigns it to the target class and its nearest real image "
                f"has SSIM >= {cutoff}; a defense holds when the leak rate is <= {self.max_leak_rate:g}")


def _distribution(values: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(values.double(), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    return {k: round(float(v), 4) for k, v in zip(("min", "q25", "median", "q75", "max"), q)}


def score_samples(samples: torch.Tensor, *, target_class: int, oracle: Oracle, references: ImageData,
                  rule: LeakRule = LeakRule(), calibration: SsimCalibration | None = None) -> dict[str, Any]:
    """The full score of class-representative samples (in the scale of ``references``): oracle
    accuracy and confidence, nearest-neighbour L1 and SSIM to ``references``' images of
    ``target_class`` (mean and distribution), leak rate and verdict. ``calibration`` (needed when
    ``rule.min_ssim`` is auto) also gives the strict leak rate, against real images of other classes."""
    target_images = references.images[references.labels == target_class]
    if not len(target_images):
        raise ValueError(f"no reference images of class {target_class}")
    samples = samples.detach().float()
    oracle_part = oracle.score(samples, target_class)
    neighbours = nearest_neighbours(references.to_unit(samples).clamp(0, 1), references.to_unit(target_images))
    min_ssim = rule.threshold(calibration)
    nn_ssim = neighbours["ssim"].tolist()
    leaks = rule.leaks(oracle_part["oracle_assigned"], nn_ssim, min_ssim)
    leak_rate = sum(leaks) / len(leaks)
    strict = (None if calibration is None else
              sum(rule.leaks(oracle_part["oracle_assigned"], nn_ssim, calibration.real_other_threshold)) / len(leaks))
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
        "min_ssim": min_ssim,
        "strict_leak_rate": None if strict is None else round(strict, 4),
        "calibration": None if calibration is None else calibration.as_dict(),
        "verdict_rule": rule.describe(calibration),
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
