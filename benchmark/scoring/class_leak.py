"""Numbers for attacks that produce *class representatives* rather than copies of one record: the GAN
attack of Hitaj et al. (CCS 2017) and model inversion (Fredrikson et al., CCS 2015).

Such samples are judged by eye in the papers. leakbench scores them with

* an **oracle**: an independent classifier trained on held-out data that no participant ever saw; the
  score is the fraction of samples it assigns to the target class and its mean confidence in that class;
* **nearest-neighbour similarity** to the victim's images of the target class: for each sample the
  closest real image by L1 (what the paper shows) and the most similar one by SSIM;
* a **verdict** (:class:`LeakRule`): a sample is a recognisable leak when the oracle assigns it to the
  target class with probability >= ``min_confidence``, its nearest real image of the class is at least
  as similar (SSIM) as real images of *other* classes typically are to the class (``min_ssim``,
  calibrated on one half of the held-out images, :func:`calibrate_min_ssim`), and it is more similar
  to that real image than to the class-mean image. The setting is *defended* when the leak rate is at
  most ``max_leak_rate``, the same column format as the gradient attacks' recognisability rule;
* **controls** (:func:`class_leak_controls`) that check the rule on the other half of the held-out
  images: pixel-permuted class images, Gaussian blobs, the class-mean image (and generators or inversions
  the caller adds) must leak at most 5%, real images of the class at least 90%.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import ImageData
from ..errors import ConfigError
from ..params import Param, check_section
from .oracle import Oracle, holdout_split
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
CALIBRATION_VERSION = 3  # part of calibration cache keys: 3 compares with a fixed number of references per class
REFERENCE_SEED = 0       # which references of each class are compared with (the same for every sample)


def calibration_split(held_out: ImageData, *, seed: int) -> tuple[ImageData, ImageData]:
    """(calibration half, check half): a stratified, disjoint split of the held-out images. The verdict's
    SSIM bar is measured on the first half; its controls (:func:`class_leak_controls`) run on the second."""
    return holdout_split(held_out, fraction=0.5, seed=seed)


def _draw(data: ImageData, mask: torch.Tensor, count: int, generator: torch.Generator, what: str) -> torch.Tensor:
    index = mask.nonzero().flatten()
    index = index[torch.randperm(len(index), generator=generator)[:count]]
    if not len(index):
        raise ValueError(f"calibration: the held-out split has no {what}")
    return data.images[index]


def _class_images(references: ImageData, target_class: int, per_class: int | None = None) -> torch.Tensor:
    """The references' images of the class on [0, 1]: what samples are compared with; at most
    ``per_class`` of them (a seeded draw, the same for every call), all when None."""
    mask = references.labels == target_class
    if not bool(mask.any()):
        raise ValueError(f"no reference images of class {target_class}")
    if per_class is None or per_class >= int(mask.sum()):
        return references.to_unit(references.images[mask])
    generator = torch.Generator().manual_seed(REFERENCE_SEED + target_class)
    return references.to_unit(_draw(references, mask, per_class, generator, f"images of class {target_class}"))


def nearest_ssim_per_class(unit_samples: torch.Tensor, references: ImageData, per_class: int | None
                           ) -> dict[int, torch.Tensor]:
    """For each class the references hold: each sample's (on [0, 1]) highest SSIM to ``per_class``
    references of that class. The same number per class, since the best of more images is higher."""
    classes = sorted(int(c) for c in references.labels.unique())
    return {c: pairwise_ssim(unit_samples, _class_images(references, c, per_class)).max(dim=1).values
            for c in classes}


@dataclass(frozen=True)
class SsimCalibration:
    """The verdict's SSIM bar for one dataset and target class: the ``percentile`` of the nearest-neighbour
    SSIM (against the references' images of the class, as samples are scored) that real held-out images
    of the *other* classes reach, measured on the calibration half of the held-out images. ``same_class``
    (real held-out images of the class, same half) is reported beside it."""

    threshold: float
    percentile: float
    other_class: dict
    same_class: dict
    images: dict

    def describe(self) -> str:
        return (f"min_ssim auto = {self.threshold:.3f}: the {self.percentile:g}th percentile of the nearest-neighbour "
                f"SSIM that {self.images['other_class']} real held-out images of the other classes reach "
                f"(calibration half of the test split; real images of the class reach median "
                f"{self.same_class['median']:.2f})")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "method": "percentile of real held-out images of the other classes",
                "split": "calibration half of the test split (stratified, seeded); controls on the other half",
                "description": self.describe()}


def calibrate_min_ssim(references: ImageData, held_out: ImageData, target_class: int, *, percentile: float = 50.0,
                       images: int = 100, seed: int = 0, per_class: int | None = None) -> SsimCalibration:
    """The SSIM bar: the ``percentile`` of the nearest-neighbour SSIM to ``references``' images of
    ``target_class`` that up to ``images`` real images of the other classes reach, drawn from the
    calibration half of ``held_out`` (:func:`calibration_split`).

    Why real images of other classes: a sample should look more like the victim's class than a real
    image of another class does. Why the median and not the 95th percentile: SSIM rewards the shared
    black background of digits, so other digits reach 0.52-0.74 against a class's images on MNIST (5th-95th
    percentile) while real images of the class itself reach 0.65-0.85; a bar at the 95th percentile of
    other classes (0.74) would call a quarter of real held-out images of the class no leak."""
    generator = torch.Generator().manual_seed(seed)
    targets = _class_images(references, target_class, per_class)
    calibration_half, _ = calibration_split(held_out, seed=seed)
    sets = {"other_class": _draw(calibration_half, calibration_half.labels != target_class, images, generator,
                                 "images of other classes"),
            "same_class": _draw(calibration_half, calibration_half.labels == target_class, images, generator,
                                f"images of class {target_class}")}
    nn_ssim = {name: pairwise_ssim(held_out.to_unit(x), targets).max(dim=1).values for name, x in sets.items()}
    return SsimCalibration(
        threshold=round(float(torch.quantile(nn_ssim["other_class"].double(), percentile / 100.0)), 4),
        percentile=percentile,
        other_class=_distribution(nn_ssim["other_class"]), same_class=_distribution(nn_ssim["same_class"]),
        images={k: len(v) for k, v in nn_ssim.items()},
    )


@dataclass(frozen=True)
class LeakRule:
    """A sample is a recognisable leak when all three hold:

    1. the oracle assigns it to the target class with probability >= ``min_confidence`` (the class);
    2. it looks more like the class than real images of other classes do, by SSIM to the nearest real
       image of the class (among ``references_per_class`` of each class), in either of two ways:
       a. that SSIM is >= ``min_ssim``, what real images of other classes reach against the class
          (``auto`` calibrates the bar, :func:`calibrate_min_ssim`): a bar measured on clean images;
       b. (``relative``, off by default) that SSIM is higher than its SSIM to the nearest real image of
          every other class: the sample is compared with itself, so degradations that lower its
          similarity to every image alike (noise) do not hide which class it shows; noisy copies of real
          images of the class fail (a) and pass (b). Off because a generator trained towards the class
          puts 84-98% of its samples nearest the class whatever they look like (docs/gan.md);
    3. that SSIM is higher than its SSIM to the class-mean image of the references (it looks like a real
       image of the class, not like the class average: blurry prototypes and grey blobs that follow the
       class's outline do not leak a record).

    A setting is defended when the fraction of such samples (the leak rate) is at most ``max_leak_rate``.
    :func:`class_leak_controls` checks the rule on held-out data: negative controls (pixel-permuted class
    images, Gaussian blobs, the class-mean image, generators and inversions of other classes) must leak at
    most 5%, real held-out images of the class at least 90%."""

    min_ssim: float | str = AUTO
    min_confidence: float = 0.5
    max_leak_rate: float = 0.25
    percentile: float = 50.0
    calibration_images: int = 100
    relative: bool = False  # off: it credits generators whose samples a person does not read (docs/gan.md)
    references_per_class: int = 400  # SSIM to 400 images of each class: ~26 s for 64 samples on one thread

    @classmethod
    def from_config(cls, cfg: dict | None) -> "LeakRule":
        """From a grid's ``gan_verdict:`` mapping; bad keys and values raise one-line ConfigErrors."""
        checked = check_section("gan_verdict", cfg, (
            Param("max_leak_rate", float, low=0.0, high=1.0), Param("percentile", float, low=0.0, high=100.0),
            Param("min_confidence", float, low=0.0, high=1.0),
            Param("calibration_images", int, low=2), Param("relative", bool),
            Param("references_per_class", int, low=1)), also=("min_ssim",))
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
                                  images=self.calibration_images, seed=seed, per_class=self.references_per_class)

    def threshold(self, calibration: SsimCalibration | None) -> float:
        """The SSIM bar in force: the number given, or the calibrated one."""
        if not self.calibrated:
            return float(self.min_ssim)
        if calibration is None:
            raise ValueError("gan_verdict.min_ssim is 'auto': pass the calibration "
                             "(LeakRule.calibrate on the references and held-out images)")
        return calibration.threshold

    def conditions(self, *, confidence: torch.Tensor, assigned: torch.Tensor, nn_ssim: torch.Tensor,
                   mean_ssim: torch.Tensor, min_ssim: float, other_class_ssim: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor]:
        """Per sample, each condition of the rule and the verdict (boolean tensors). ``other_class_ssim``:
        each sample's SSIM to its nearest real image of any other class (None: the references hold no
        other class, and the relative condition holds for no sample)."""
        conditions = {"oracle": assigned & (confidence >= self.min_confidence), "similar": nn_ssim >= min_ssim,
                      "nearest_class": (nn_ssim > other_class_ssim if self.relative and other_class_ssim is not None
                                        else torch.zeros_like(nn_ssim, dtype=torch.bool)),
                      "not_class_mean": nn_ssim > mean_ssim}
        like_class = conditions["similar"] | conditions["nearest_class"]
        return {**conditions, "leaks": conditions["oracle"] & like_class & conditions["not_class_mean"]}

    def defended(self, leak_rate: float) -> bool:
        return leak_rate <= self.max_leak_rate

    def describe(self, calibration: SsimCalibration | None = None) -> str:
        cutoff = (calibration.describe() if calibration is not None else
                  f"the {self.percentile:g}th percentile of real held-out images of the other classes"
                  if self.calibrated else f"{float(self.min_ssim):g}")
        relative = (" or higher than its SSIM to the nearest real image of every other class" if self.relative else "")
        return (f"a sample leaks when the oracle assigns it to the target class with probability >= "
                f"{self.min_confidence:g}, its nearest real image of the class ({self.references_per_class} "
                f"references per class) has SSIM >= {cutoff}{relative}, and that SSIM exceeds its SSIM to the "
                f"class-mean image; a defense holds when the leak rate is <= {self.max_leak_rate:g}")


def _distribution(values: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(values.double(), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    return {k: round(float(v), 4) for k, v in zip(("min", "q25", "median", "q75", "max"), q)}


def judge(samples: torch.Tensor, *, target_class: int, oracle: Oracle, references: ImageData, rule: LeakRule,
          calibration: SsimCalibration | None) -> dict[str, torch.Tensor]:
    """Per sample (data scale): the oracle's probability of the class and whether it is its top class,
    nearest neighbours among the references' images of the class, SSIM to their mean image, and the
    rule's conditions (``leaks`` the verdict)."""
    targets = _class_images(references, target_class)
    samples = samples.detach().float()
    probs = oracle.probabilities(samples)
    unit = references.to_unit(samples).clamp(0, 1)
    # L1 (the picture's nearest image) against every image of the class, SSIM against references_per_class
    l1 = torch.cdist(unit.flatten(1).double(), targets.flatten(1).double(), p=1) / unit[0].numel()
    l1_best, l1_index = l1.min(dim=1)
    if rule.relative:
        per_class = nearest_ssim_per_class(unit, references, rule.references_per_class)
        others = [v for c, v in per_class.items() if c != target_class]
        other_class_ssim = torch.stack(others, 1).max(dim=1).values if others else None
    else:
        per_class = {target_class: pairwise_ssim(unit, _class_images(references, target_class,
                                                                     rule.references_per_class)).max(dim=1).values}
        other_class_ssim = None
    nn_ssim = per_class[target_class].float()
    mean_ssim = pairwise_ssim(unit, targets.mean(dim=0, keepdim=True))[:, 0]
    assigned = probs.argmax(-1) == target_class
    conditions = rule.conditions(confidence=probs[:, target_class], assigned=assigned, nn_ssim=nn_ssim,
                                 mean_ssim=mean_ssim, min_ssim=rule.threshold(calibration),
                                 other_class_ssim=other_class_ssim)
    return {"l1": l1_best.float(), "l1_index": l1_index, "ssim": nn_ssim, "confidence": probs[:, target_class],
            "assigned": assigned, "mean_ssim": mean_ssim, **conditions}


def score_samples(samples: torch.Tensor, *, target_class: int, oracle: Oracle, references: ImageData,
                  rule: LeakRule = LeakRule(), calibration: SsimCalibration | None = None) -> dict[str, Any]:
    """The full score of class-representative samples (in the scale of ``references``): oracle
    accuracy and confidence, nearest-neighbour L1 and SSIM to ``references``' images of
    ``target_class`` (mean and distribution), the rate at which each condition of the rule holds, leak
    rate and verdict (``calibration`` is needed when ``rule.min_ssim`` is auto)."""
    judged = judge(samples, target_class=target_class, oracle=oracle, references=references, rule=rule,
                   calibration=calibration)
    leak_rate = float(judged["leaks"].float().mean())
    return {
        "target_class": target_class,
        "samples": len(samples),
        "oracle_accuracy": round(float(judged["assigned"].float().mean()), 4),
        "oracle_confidence": round(float(judged["confidence"].mean()), 4),
        "nn_l1": round(float(judged["l1"].mean()), 4),
        "nn_l1_distribution": _distribution(judged["l1"]),
        "nn_ssim": round(float(judged["ssim"].mean()), 4),
        "nn_ssim_distribution": _distribution(judged["ssim"]),
        "class_mean_ssim": round(float(judged["mean_ssim"].mean()), 4),
        "conditions": {k: round(float(judged[k].float().mean()), 4)
                       for k in ("oracle", "similar", "nearest_class", "not_class_mean")},
        "leak_rate": round(leak_rate, 4),
        "defended": rule.defended(leak_rate),
        "min_ssim": rule.threshold(calibration),
        "calibration": None if calibration is None else calibration.as_dict(),
        "verdict_rule": rule.describe(calibration),
        "rule": asdict(rule),
        "nearest_l1_index": judged["l1_index"].tolist(),  # into the target class's reference images
    }


# -- controls -----------------------------------------------------------------------------------------

NEGATIVE_BOUND, POSITIVE_BOUND = 0.05, 0.9  # negative controls leak at most this, real class images at least


def gaussian_blobs(count: int, shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """``count`` images on [0, 1] of one to three Gaussian blobs (random centres in the middle of the image,
    widths 5-20% of its side): bright shapes on a dark background with no strokes."""
    channels, height, width = shape
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    out = torch.zeros(count, channels, height, width)
    for i in range(count):
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            cy, cx = (0.2 + 0.6 * torch.rand(2, generator=generator)) * torch.tensor([height, width])
            sigma = float(0.05 + 0.15 * torch.rand(1, generator=generator)) * min(height, width)
            out[i] += torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma ** 2))
    return out.clamp(0, 1)


def control_images(held_out: ImageData, target_class: int, *, images: int = 100, seed: int = 0
                   ) -> dict[str, tuple[torch.Tensor, str]]:
    """The controls made from data (data scale) on the check half of ``held_out`` (the half the bar was
    not calibrated on), each with its expected side: ``positive`` (must leak) or ``negative``."""
    generator = torch.Generator().manual_seed(seed + 1)
    _, check = calibration_split(held_out, seed=seed)
    of_class = check.images[check.labels == target_class]
    same = _draw(check, check.labels == target_class, images, generator, f"images of class {target_class}")
    flat = same.flatten(1)
    permuted = torch.stack([row[torch.randperm(len(row), generator=generator)] for row in flat]).view_as(same)
    # one image: the class mean of the check half (bootstrap means of the 18 threes of the digits' check
    # half are closer to single digits: 2 of 20 passed, docs/gan.md)
    means = of_class.mean(0, keepdim=True)
    return {
        "real images of the class": (same, "positive"),
        "real images of other classes": (_draw(check, check.labels != target_class, images, generator,
                                               "images of other classes"), "negative"),
        "pixel-permuted images of the class": (permuted, "negative"),
        "Gaussian blobs": (held_out.from_unit(gaussian_blobs(images, held_out.shape, generator)), "negative"),
        "class-mean image": (means, "negative"),
    }


def class_leak_controls(*, oracle: Oracle, references: ImageData, held_out: ImageData, target_class: int,
                        rule: LeakRule = LeakRule(), calibration: SsimCalibration | None = None, seed: int = 0,
                        images: int = 100, extra: dict[str, torch.Tensor] | None = None) -> dict[str, dict]:
    """The leak rate of each control under ``rule``: the data-made ones (:func:`control_images`, on the
    half of ``held_out`` the bar was not calibrated on; ``seed`` must be the calibration's) and ``extra``
    negative controls (data scale) the caller makes, e.g. an untrained generator's samples or a generator
    or inversion of another class. Each entry: leak rate, samples, the bound it must meet and whether it
    does (negative: at most 5%; real images of the class: at least 90%)."""
    sets = control_images(held_out, target_class, images=images, seed=seed)
    sets.update({name: (x, "negative") for name, x in (extra or {}).items()})
    out = {}
    for name, (x, side) in sets.items():
        rate = float(judge(x, target_class=target_class, oracle=oracle, references=references, rule=rule,
                           calibration=calibration)["leaks"].float().mean())
        bound = POSITIVE_BOUND if side == "positive" else NEGATIVE_BOUND
        out[name] = {"leak_rate": round(rate, 4), "samples": len(x), "expected": side, "bound": bound,
                     "passes": rate >= bound if side == "positive" else rate <= bound}
    return out


def describe_controls(controls: dict[str, dict]) -> str:
    """One line: each control's leak rate against its bound, the positive control first (cached controls
    come back with their names sorted)."""
    return "; ".join(f"{name} {c['leak_rate']:.0%} ({'>=' if c['expected'] == 'positive' else '<='} "
                     f"{c['bound']:.0%}{'' if c['passes'] else ', FAILS'})"
                     for name, c in sorted(controls.items(), key=lambda item: (item[1]["expected"] != "positive", item[0])))


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
