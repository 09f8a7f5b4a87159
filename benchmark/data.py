"""Datasets behind one loader that returns image tensors scaled as the config says.

Sources, in order of preference:
1. a local mirror (``--data-dir DIR`` or ``LEAKBENCH_DATA_DIR``) of parquet files, read with HF ``datasets``,
   in either layout (see ``MIRROR_LAYOUTS``): leakbench's ``DIR/<name>/<split>.parquet`` with columns
   ``image`` and ``label``, or a dataset's files as the Hugging Face hub publishes them
   (``<config>/<split>-00000-of-0000N.parquet``, the hub's own column names, e.g. CIFAR-100's ``img`` and
   ``fine_label``);
2. the dataset's public source: a Hugging Face hub id through ``datasets.load_dataset``, or a
   scikit-learn fetcher (LFW, Olivetti). These need network access, so before any work
   ``check_available`` makes sure a split not in the mirror can come from there: offline
   (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) or an unreachable source is a one-line ConfigError that
   names the dataset, its source and the mirror layout that would serve it, instead of HF's retries;
3. ``digits``, the embedded default: scikit-learn's bundled handwritten digits, real data, no download.
"""
from __future__ import annotations

import functools
import glob
import os
import re
import urllib.error
import urllib.request
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
#: the layouts a --data-dir mirror may use (the CLI's help and the README say the same)
MIRROR_LAYOUTS = ("DIR/<name>/<split>.parquet (columns image, label), or a dataset's files as the Hugging "
                  "Face hub publishes them, e.g. `hf download <hub id> --repo-type dataset --local-dir "
                  "DIR/<name>` (<config>/<split>-00000-of-0000N.parquet, the hub's columns)")
#: HF's switches for "no network"; either one makes leakbench treat every remote source as offline
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
#: seconds a reachability probe of a remote source may take (HF's own retries take half a minute)
PROBE_TIMEOUT_S = 5.0
#: the hub's shard names: train-00000-of-00002.parquet (push_to_hub once added a hash: ...-00002-<hex>)
SHARD_NAME = re.compile(r"-(\d{5})-of-(\d{5})(?:-[0-9a-f]+)?\.parquet")


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
        return self.subset(capped_index(len(self), size, generator=generator))

    def held_out(self, fraction: float, *, seed: int = 0) -> tuple["ImageData", "ImageData"]:
        """(the rest, a held-out ``fraction``): disjoint, drawn by a seeded permutation."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        cut = len(self) - max(1, round(fraction * len(self)))
        return self.subset(order[:cut]), self.subset(order[cut:])

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Map images in this data's scale to [0, 1] (metrics are computed on [0, 1])."""
        return (x + 1) / 2 if self.scale == "[-1,1]" else x

    def from_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] images to this data's scale (the inverse of :meth:`to_unit`)."""
        return x * 2 - 1 if self.scale == "[-1,1]" else x


def capped_index(length: int, size: int | None, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """The positions :meth:`ImageData.capped` keeps of ``length`` samples (all when ``size`` is None or not
    smaller), drawing from ``generator`` exactly as it does: what membership inference needs to know of an
    accuracy run, which records it trained on."""
    if size is None or size >= length:
        return torch.arange(length)
    return torch.arange(size) if generator is None else torch.randperm(length, generator=generator)[:size]


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    chosen = data_dir if data_dir else os.environ.get(DATA_DIR_ENV)
    return Path(chosen).expanduser() if chosen else None


def offline_setting() -> str | None:
    """``HF_HUB_OFFLINE=1`` (the first offline switch that is on, as HF reads it), or None."""
    for var in OFFLINE_ENV_VARS:
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{var}={os.environ[var]}"
    return None


@functools.cache
def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why ``url`` cannot be reached now (None: a server answered, whatever its status). One short HEAD
    request instead of the downloaders' retries; the answer is kept for the process."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # the server answered
    except (urllib.error.URLError, OSError) as exc:  # DNS, refused, timeout, TLS
        reason = getattr(exc, "reason", None) or exc
        return f"cannot reach {url} ({str(reason).splitlines()[0] if str(reason) else type(exc).__name__})"
    return None


def split_files_in(folder: Path, split: str) -> list[Path] | None:
    """The parquet files of ``split`` directly in ``folder``, in order, in one of the layouts: leakbench's
    ``<split>.parquet``; the hub's shards ``<split>-00000-of-0000N.parquet`` (all N of them); the hub's
    parquet-converter branch, ``<split>/0000.parquet``. None when the folder has none of them."""
    single = folder / f"{split}.parquet"
    if single.is_file():
        return [single]
    shards: dict[int, Path] = {}
    counts = set()
    for path in folder.glob(f"{glob.escape(split)}-*.parquet"):
        match = SHARD_NAME.fullmatch(path.name[len(split):])
        if match:
            index, count = int(match[1]), int(match[2])
            if index in shards:
                raise ConfigError(f"{folder}: two files for shard {index} of {split!r} ({shards[index].name}, "
                                  f"{path.name}); allowed: one {split}-NNNNN-of-NNNNN.parquet per shard")
            shards[index] = path
            counts.add(count)
    if shards:
        missing = sorted(set(range(max(counts))) - set(shards))
        if len(counts) > 1 or missing or max(shards) >= max(counts):
            raise ConfigError(f"{folder}: the shards of {split!r} are incomplete or mixed (found "
                              f"{', '.join(sorted(p.name for p in shards.values()))}); allowed: every shard "
                              f"{split}-0000K-of-0000N.parquet, K = 0 .. N-1, of one N")
        return [shards[i] for i in sorted(shards)]
    converted = sorted((folder / split).glob("[0-9][0-9][0-9][0-9].parquet")) if (folder / split).is_dir() else []
    return converted or None


def parquet_columns(path: Path) -> list[str]:
    """The column names of a parquet file, from its footer (no data is read). A file that is not parquet or
    is damaged is a one-line ConfigError naming it."""
    import pyarrow.parquet as pq

    with open(path, "rb") as fh:  # parquet files begin and end with the magic bytes PAR1
        head = fh.read(4)
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 4))
        tail = fh.read(4)
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        raise ConfigError(f"{path}: not a parquet file; allowed: a parquet split with 'image' and 'label' columns")
    try:
        return list(pq.read_schema(path).names)
    except Exception as exc:  # noqa: BLE001  pyarrow's errors alike: the file is damaged
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: cannot be read as parquet ({message})") from None


def read_parquet_split(path: Path, columns: tuple[str, str] = ("image", "label")
                       ) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Read one HF-layout parquet file: uint8 images ``(N, H, W[, C])`` and int labels from ``columns``
    (image, label). A file that is not parquet, lacks the columns, or holds a value that is not an image is
    a one-line ConfigError naming the file."""
    import datasets

    image_column, label_column = columns
    found = parquet_columns(path)
    if image_column not in found or label_column not in found:
        raise ConfigError(f"{path}: columns found: {', '.join(found) or 'none'}; expected {image_column!r} and "
                          f"{label_column!r}")
    datasets.disable_progress_bars()  # leakbench shows its own progress; HF's bars would interleave
    try:
        ds = datasets.Dataset.from_parquet(str(path), keep_in_memory=True, columns=[image_column, label_column])
    except Exception as exc:  # noqa: BLE001  pyarrow's and datasets' errors alike: the file is damaged
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: cannot be read as parquet ({message})") from None
    names = None
    label_feature = ds.features.get(label_column)
    if isinstance(label_feature, datasets.ClassLabel):
        names = list(label_feature.names)
    decoded: list[np.ndarray] = []
    try:
        if not isinstance(ds.features.get(image_column), datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image())
        for im in ds[image_column]:
            decoded.append(np.asarray(im))
        images = np.stack(decoded)
        labels = np.asarray(ds[label_column], dtype=np.int64)
    except Exception as exc:  # noqa: BLE001  PIL's, numpy's and datasets' decoding errors alike
        where = f" (row {len(decoded)})"
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: the {image_column!r} and {label_column!r} columns do not hold images and "
                          f"integer labels{where}: {message}") from None
    return images, labels, names


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    x = x.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


class Dataset(Component):
    """A registered dataset: where its images come from, and how they are resized and scaled."""

    embedded: ClassVar[bool] = False  # shipped inside leakbench: never looked for on disk or the hub

    params = (
        Param("image_size", int, None, "resize square images to this side (bilinear); null keeps the native size",
              low=4, high=512, nullable=True),
        Param("scale", str, "[0,1]", "pixel range of the tensors", choices=SCALES),
        Param("grayscale", bool, False, "convert RGB images to one channel"),
    )
    num_classes: ClassVar[int] = 0
    #: what a sample is; the report draws a dataset's samples with the figure of its modality
    modality: ClassVar[str] = "image"
    # Where the dataset is published on the Hugging Face hub, as its dataset card states it: the repo id,
    # the config (also the folder of its parquet files there) and the columns of image and label.
    hub_id: ClassVar[str | None] = None
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
        """Images as float ``(N, C, H, W)`` in [0, 1] and labels, before resizing and scaling: from the
        mirror when it holds the split, else from the public source (when it is reachable)."""
        files = self.source_files(split, data_dir)
        if files is None:
            self.check_remote(split, data_dir)
            return self.load_remote(split)
        if set(self.native_splits) >= set(SPLITS):
            return self._read_mirror(files)
        # published as one split (``files`` hold it): train and test both come from it, never overlapping
        return self.derived_split(split, lambda _published: self._read_mirror(files))

    def published_split(self, split: str) -> str:
        """The published split that ``split`` is read from (one-split datasets derive test from train)."""
        return split if split in self.native_splits else self.native_splits[0]

    def mirror_folders(self, data_dir: Path) -> list[Path]:
        """Where a mirror may keep this dataset: ``DIR/<name>``, ``DIR/<hub id>`` or ``DIR/<hub config>``,
        each also with the hub's ``<config>/`` or ``data/`` (push_to_hub's default) folder inside."""
        tops = dict.fromkeys(n for n in (self.registry_name, self.hub_id, self.hub_config) if n)
        inner = [n for n in dict.fromkeys((self.hub_config, "data")) if n]
        return [f for top in tops for f in (data_dir / top, *(data_dir / top / i for i in inner)) if f.is_dir()]

    def source_files(self, split: str, data_dir: Path | None) -> list[Path] | None:
        """The mirror's parquet files ``split`` is read from, in order (several for the hub's shards), or
        None when the mirror does not hold it (then it comes from the public source)."""
        if data_dir is None:
            return None
        for folder in self.mirror_folders(data_dir):
            files = split_files_in(folder, self.published_split(split))
            if files:
                return files
        return None

    def column_choices(self) -> list[tuple[str, str]]:
        """(image, label) column pairs a mirror file may use: leakbench's, then the hub's."""
        return list(dict.fromkeys([("image", "label"), (self.hub_image_column, self.hub_label_column)]))

    def columns_of(self, path: Path) -> tuple[str, str]:
        """The (image, label) columns of a mirror file, from its footer; a one-line ConfigError naming the
        file, the columns found and the ones expected otherwise."""
        found = parquet_columns(path)
        for image, label in self.column_choices():
            if image in found and label in found:
                return image, label
        expected = " or ".join(f"{image!r} and {label!r}" for image, label in self.column_choices())
        raise ConfigError(f"{path}: columns found: {', '.join(found) or 'none'}; expected {expected} "
                          f"(dataset {self.registry_name!r})")

    def _read_mirror(self, files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [read_parquet_split(path, self.columns_of(path)) for path in files]
        images = np.concatenate([images for images, _, _ in parts])
        labels = np.concatenate([labels for _, labels, _ in parts])
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

    # -- the public source -------------------------------------------------------------------------
    def check_available(self, split: str, data_dir: Path | None) -> None:
        """Before any work, cheaply: ``split`` can be loaded. The mirror's files of it must have the
        expected columns (their footers are read, not their images); a split the mirror lacks needs the
        public source; an embedded dataset is always there. Raises a one-line ConfigError."""
        if self.embedded:
            return
        files = self.source_files(split, data_dir)
        if files is None:
            self.check_remote(split, data_dir)
        for path in files or ():
            self.columns_of(path)

    def check_remote(self, split: str, data_dir: Path | None) -> None:
        """A one-line ConfigError when the public source cannot serve ``split`` now: there is none, the
        machine is offline (HF's switches) without a cached copy, or a short probe does not reach it."""
        why = self.remote_unavailable()
        if why is None:
            return
        where = f"not in --data-dir {data_dir}" if data_dir is not None else "no --data-dir given"
        raise ConfigError(f"dataset {self.registry_name!r} split {split!r}: {where}, and {why}; allowed: "
                          f"--data-dir DIR holding {self.mirror_layouts(split)}")

    def remote_unavailable(self) -> str | None:
        """Why the hub cannot serve this dataset now (None: it can, as far as a cheap check tells)."""
        if self.hub_id is None:
            return "it has no public source"
        offline = offline_setting()
        source = f"the Hugging Face hub's {self.hub_id}"
        if offline:
            return None if self.cached_by_hf() else f"{source} cannot be downloaded offline ({offline})"
        import huggingface_hub.constants

        reason = unreachable(f"{huggingface_hub.constants.ENDPOINT}/api/datasets/{self.hub_id}")
        return f"{source} cannot be downloaded: {reason}" if reason else None

    def cached_by_hf(self) -> bool:
        """HF ``datasets`` has prepared this dataset before (offline, ``load_dataset`` reads that copy):
        the folder its cache factory looks in, ``<cache>/<owner>___<name>/<config>/<version>/<hash>``."""
        import datasets.config
        from datasets.naming import camelcase_to_snakecase

        owner, _, name = str(self.hub_id).rpartition("/")
        root = Path(datasets.config.HF_DATASETS_CACHE).expanduser() / "___".join(
            [p for p in (owner, camelcase_to_snakecase(name)) if p])
        return any(p.is_dir() for p in root.glob("*/*/*"))

    def mirror_layouts(self, split: str) -> str:
        """The files of a mirror that would serve ``split``, for error messages."""
        published = self.published_split(split)
        ours = f"{self.registry_name}/{published}.parquet (columns image, label)"
        if self.hub_id is None:
            return f"{ours} or {self.registry_name}/{published}-00000-of-0000N.parquet"
        folder = f"{self.hub_config}/" if self.hub_config else "data/"
        return (f"{ours} or the hub's {self.registry_name}/{folder}{published}-00000-of-0000N.parquet "
                f"(`hf download {self.hub_id} --repo-type dataset --local-dir DIR/{self.registry_name}`, columns "
                f"{self.hub_image_column}, {self.hub_label_column})")

    def load_remote(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hub_id is None:
            raise ConfigError(f"dataset {self.registry_name!r} has no public source; pass --data-dir")
        import datasets

        try:
            ds = datasets.load_dataset(self.hub_id, self.hub_config, split=split)
        except Exception as exc:  # noqa: BLE001  network, cache and hub errors alike: the data is not there
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"dataset {self.registry_name!r} split {split!r}: the Hugging Face hub's "
                              f"{self.hub_id} could not be loaded ({message}); allowed: --data-dir DIR holding "
                              f"{self.mirror_layouts(split)}") from None
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
    embedded = True
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


# Hub ids, configs and columns as the datasets' cards on huggingface.co state them (their README's
# `configs:` and `dataset_info.features`); the config is also the folder of the parquet files there.
@register_dataset("mnist")
class MNIST(Dataset):
    num_classes = 10
    hub_id = "ylecun/mnist"  # mnist/{train,test}-00000-of-00001.parquet: image, label
    hub_config = "mnist"


@register_dataset("cifar10")
class CIFAR10(Dataset):
    num_classes = 10
    hub_id = "uoft-cs/cifar10"  # plain_text/{train,test}-00000-of-00001.parquet: img, label
    hub_config = "plain_text"
    hub_image_column = "img"


@register_dataset("cifar100")
class CIFAR100(Dataset):
    num_classes = 100
    hub_id = "uoft-cs/cifar100"  # cifar100/{train,test}-00000-of-00001.parquet: img, fine_label, coarse_label
    hub_config = "cifar100"
    hub_image_column = "img"
    hub_label_column = "fine_label"


@register_dataset("svhn")
class SVHN(Dataset):
    num_classes = 10
    hub_id = "ufldl-stanford/svhn"  # cropped_digits/{train,test,extra}-0000K-of-0000N.parquet: image, label
    hub_config = "cropped_digits"


class FetchedDataset(Dataset):
    """A dataset from a scikit-learn fetcher, published as one set: train and test are a fixed
    per-class holdout of it (see ``derived_split``). There is no canonical copy on the Hugging Face hub,
    so a mirror holds it in leakbench's layout or in the hub's file names, with ``image`` and ``label``."""

    native_splits = ("train",)
    #: the scikit-learn function that downloads it, for messages
    fetcher: ClassVar[str] = ""
    #: the file the fetcher downloads (scikit-learn's RemoteFileMetadata url), probed before any work
    download_url: ClassVar[str] = ""
    #: what the fetcher keeps under scikit-learn's data home once downloaded (then no network is needed)
    cached_as: ClassVar[str] = ""

    def fetch(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def load_remote(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self.derived_split(split, lambda _split: self.fetch())
        except OSError as exc:  # the fetchers' download and cache errors (URLError is an OSError)
            raise ConfigError(f"dataset {self.registry_name!r} split {split!r}: scikit-learn's {self.fetcher} "
                              f"failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); allowed: "
                              f"--data-dir DIR holding {self.mirror_layouts(split)}") from None

    def remote_unavailable(self) -> str | None:
        from sklearn.datasets import get_data_home

        if (Path(get_data_home()) / self.cached_as).exists():
            return None
        offline = offline_setting()
        source = f"scikit-learn's {self.fetcher} cannot download it"
        if offline:
            return f"{source} offline ({offline})"
        reason = unreachable(self.download_url)
        return f"{source}: {reason}" if reason else None


@register_dataset("lfw")
class LFW(FetchedDataset):
    """Labeled Faces in the Wild, people with at least 20 images, via scikit-learn's fetcher."""

    num_classes = 62  # fetch_lfw_people(min_faces_per_person=20)
    fetcher = "fetch_lfw_people"
    download_url = "https://ndownloader.figshare.com/files/5976015"  # lfw-funneled.tgz
    cached_as = "lfw_home/lfw_funneled"

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
    fetcher = "fetch_olivetti_faces"
    download_url = "https://ndownloader.figshare.com/files/5976027"  # olivettifaces.mat
    cached_as = "olivetti_py3.pkz"  # scikit-learn adds _py3 to its pickles

    def fetch(self):
        from sklearn.datasets import fetch_olivetti_faces

        bunch = fetch_olivetti_faces()  # float images already in [0, 1]
        images = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1)
        return images, torch.from_numpy(bunch.target.astype(np.int64))


def load(name: str, split: str = "train", *, data_dir=None, **params) -> ImageData:
    """Convenience: ``load("digits", "test", image_size=16)``."""
    return DATASETS.build(name, params).load(split, data_dir=data_dir)
