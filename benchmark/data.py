"""Datasets behind one loader that returns image tensors scaled as the config says.

Sources, in order of preference:
1. a local mirror (``--data-dir DIR`` or ``LEAKBENCH_DATA_DIR``): ``DIR/<name>/<split>.parquet`` in the
   Hugging Face parquet layout (``image`` + ``label``), read with HF ``datasets``;
2. the dataset's public source: a Hugging Face hub id through ``datasets.load_dataset``, or a
   scikit-learn fetcher (LFW, Olivetti). These need network access;
3. ``digits``, the embedded default: scikit-learn's bundled handwritten digits, real data, no download.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError
from .params import Component, Param
from .registry import DATASETS, register_dataset

DATA_DIR_ENV = "LEAKBENCH_DATA_DIR"
SCALES = ("[0,1]", "[-1,1]")
SPLITS = ("train", "test")


@dataclass
class ImageData:
    """Images ``(N, C, H, W)`` float32 in the configured scale, integer labels, class count."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    scale: str = "[0,1]"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index) -> "ImageData":
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageData(self.name, self.images[index], self.labels[index], self.num_classes, self.scale)

    def capped(self, size: int | None, *, generator: torch.Generator | None = None) -> "ImageData":
        """At most ``size`` samples: a random subset drawn from ``generator``, or the first ones without
        one (None keeps all). The accuracy runs cap training data randomly and test data by position."""
        if size is None or size >= len(self):
            return self
        index = torch.arange(size) if generator is None else torch.randperm(len(self), generator=generator)[:size]
        return self.subset(index)

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Map images in this data's scale to [0, 1] (metrics are computed on [0, 1])."""
        return (x + 1) / 2 if self.scale == "[-1,1]" else x

    def from_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] images to this data's scale (the inverse of :meth:`to_unit`)."""
        return x * 2 - 1 if self.scale == "[-1,1]" else x


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    chosen = data_dir if data_dir else os.environ.get(DATA_DIR_ENV)
    return Path(chosen).expanduser() if chosen else None


def read_parquet_split(path: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Read one HF-layout parquet split: uint8 images ``(N, H, W[, C])`` and int labels. A file that is
    not parquet, lacks the columns, or holds a value that is not an image is a one-line ConfigError
    naming the file."""
    import datasets

    with open(path, "rb") as fh:  # parquet files begin and end with the magic bytes PAR1
        head = fh.read(4)
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 4))
        tail = fh.read(4)
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        raise ConfigError(f"{path}: not a parquet file; allowed: a parquet split with 'image' and 'label' columns")
    datasets.disable_progress_bars()  # leakbench shows its own progress; HF's bars would interleave
    try:
        ds = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as exc:  # noqa: BLE001  pyarrow's and datasets' errors alike: the file is damaged
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: cannot be read as parquet ({message})") from None
    missing = [c for c in ("image", "label") if c not in ds.column_names]
    if missing:
        raise ConfigError(f"{path}: no {missing[0]!r} column (columns found: {', '.join(ds.column_names) or 'none'}); "
                          f"allowed: a parquet split with 'image' and 'label' columns")
    names = None
    label_feature = ds.features.get("label")
    if isinstance(label_feature, datasets.ClassLabel):
        names = list(label_feature.names)
    decoded: list[np.ndarray] = []
    try:
        if not isinstance(ds.features.get("image"), datasets.Image):
            ds = ds.cast_column("image", datasets.Image())
        for im in ds["image"]:
            decoded.append(np.asarray(im))
        images = np.stack(decoded)
        labels = np.asarray(ds["label"], dtype=np.int64)
    except Exception as exc:  # noqa: BLE001  PIL's, numpy's and datasets' decoding errors alike
        where = f" (row {len(decoded)})"
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: the 'image' and 'label' columns do not hold images and integer labels{where}: "
                          f"{message}") from None
    return images, labels, names


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    x = x.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


class Dataset(Component):
    """A registered dataset: where its images come from, and how they are resized and scaled."""

    params = (
        Param("image_size", int, None, "resize square images to this side (bilinear); null keeps the native size",
              low=4, high=512, nullable=True),
        Param("scale", str, "[0,1]", "pixel range of the tensors", choices=SCALES),
        Param("grayscale", bool, False, "convert RGB images to one channel"),
    )
    num_classes: ClassVar[int] = 0
    #: what a sample is; the report draws a dataset's samples with the figure of its modality
    modality: ClassVar[str] = "image"
    hub_id: ClassVar[str | None] = None  # Hugging Face hub id
    hub_config: ClassVar[str | None] = None
    hub_image_column: ClassVar[str] = "image"
    hub_label_column: ClassVar[str] = "label"
    native_splits: ClassVar[tuple[str, ...]] = SPLITS

    image_size: int | None
    scale: str
    grayscale: bool

    def load(self, split: str = "train", *, data_dir: str | os.PathLike | None = None) -> ImageData:
        if split not in SPLITS:
            raise ConfigError(f"dataset {self.registry_name!r}: unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        images, labels = self.load_raw(split, resolve_data_dir(data_dir))
        return self.finish(images, labels)

    # -- sources ---------------------------------------------------------------------------------
    def load_raw(self, split: str, data_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images as float ``(N, C, H, W)`` in [0, 1] and labels, before resizing and scaling."""
        if data_dir is not None:
            mirror = data_dir / self.registry_name
            if not mirror.is_dir():
                raise ConfigError(
                    f"dataset {self.registry_name!r}: no folder {mirror} in the data dir; "
                    f"expected {mirror}/<split>.parquet"
                )
            if set(self.native_splits) >= set(SPLITS):
                return self._read_mirror(mirror, split)
            # published as one split: both train and test come from it, never overlapping
            return self.derived_split(split, lambda s: self._read_mirror(mirror, s))
        return self.load_remote(split)

    def _read_mirror(self, mirror: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        path = mirror / f"{split}.parquet"
        if not path.exists():
            raise ConfigError(f"dataset {self.registry_name!r}: missing {path}")
        images, labels, _ = read_parquet_split(path)
        return _to_tensor(images), torch.from_numpy(labels)

    def derived_split(self, split: str, load) -> tuple[torch.Tensor, torch.Tensor]:
        """Datasets published as one split get a fixed per-class holdout (the last 20% of each class)."""
        images, labels = load("train")
        keep = torch.zeros(len(labels), dtype=torch.bool)
        for c in labels.unique():
            idx = (labels == c).nonzero().flatten()
            n_test = max(1, len(idx) // 5)
            chosen = idx[-n_test:] if split == "test" else idx[:-n_test]
            keep[chosen] = True
        return images[keep], labels[keep]

    def load_remote(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hub_id is None:
            raise ConfigError(f"dataset {self.registry_name!r} has no public source; pass --data-dir")
        import datasets

        ds = datasets.load_dataset(self.hub_id, self.hub_config, split=split)
        images = np.stack([np.asarray(im) for im in ds[self.hub_image_column]])
        labels = np.asarray(ds[self.hub_label_column], dtype=np.int64)
        return _to_tensor(images), torch.from_numpy(labels)

    # -- shaping -----------------------------------------------------------------------------------
    def finish(self, x: torch.Tensor, labels: torch.Tensor) -> ImageData:
        if self.grayscale and x.shape[1] == 3:
            x = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=self.image_size < x.shape[-1]).clamp(0, 1)
        if self.scale == "[-1,1]":
            x = x * 2 - 1
        return ImageData(self.registry_name, x.contiguous(), labels.long(), self.num_classes, self.scale)


@register_dataset("digits")
class Digits(Dataset):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images): real data that needs no download."""

    num_classes = 10
    params = (
        Param("image_size", int, 16, "resize the 8x8 digits to this side (bilinear)", low=4, high=512,
              nullable=True),
        *Dataset.params[1:],
    )

    def load_raw(self, split: str, data_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        images = bunch.images.astype(np.float32) / 16.0  # pixel values are 0..16
        index = np.arange(len(images))
        train_idx, test_idx = train_test_split(index, test_size=0.2, random_state=0, stratify=bunch.target)
        chosen = np.sort(train_idx if split == "train" else test_idx)
        x = torch.from_numpy(images[chosen]).unsqueeze(1)
        return x, torch.from_numpy(bunch.target[chosen].astype(np.int64))


@register_dataset("mnist")
class MNIST(Dataset):
    num_classes = 10
    hub_id = "ylecun/mnist"


@register_dataset("cifar10")
class CIFAR10(Dataset):
    num_classes = 10
    hub_id = "uoft-cs/cifar10"
    hub_image_column = "img"


@register_dataset("cifar100")
class CIFAR100(Dataset):
    num_classes = 100
    hub_id = "uoft-cs/cifar100"
    hub_image_column = "img"
    hub_label_column = "fine_label"


@register_dataset("svhn")
class SVHN(Dataset):
    num_classes = 10
    hub_id = "ufldl-stanford/svhn"
    hub_config = "cropped_digits"


class FetchedDataset(Dataset):
    """A dataset from a scikit-learn fetcher, published as one set: train and test are a fixed
    per-class holdout of it (see ``derived_split``)."""

    native_splits = ("train",)

    def fetch(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def load_remote(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.derived_split(split, lambda _split: self.fetch())


@register_dataset("lfw")
class LFW(FetchedDataset):
    """Labeled Faces in the Wild, people with at least 20 images, via scikit-learn's fetcher."""

    num_classes = 62  # fetch_lfw_people(min_faces_per_person=20)

    def fetch(self):
        from sklearn.datasets import fetch_lfw_people

        bunch = fetch_lfw_people(min_faces_per_person=20, color=True, resize=0.5)
        images = bunch.images.astype(np.float32)
        if images.max() > 1.0:
            images = images / 255.0
        return _to_tensor(images), torch.from_numpy(bunch.target.astype(np.int64))


@register_dataset("att-faces")
class ATTFaces(FetchedDataset):
    """AT&T (ORL / Olivetti) faces: 40 people x 10 images, 64x64 gray, via scikit-learn's fetcher."""

    num_classes = 40

    def fetch(self):
        from sklearn.datasets import fetch_olivetti_faces

        bunch = fetch_olivetti_faces()  # float images already in [0, 1]
        images = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1)
        return images, torch.from_numpy(bunch.target.astype(np.int64))


def load(name: str, split: str = "train", *, data_dir=None, **params) -> ImageData:
    """Convenience: ``load("digits", "test", image_size=16)``."""
    return DATASETS.build(name, params).load(split, data_dir=data_dir)
