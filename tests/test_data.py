"""The one loader: embedded digits, a local parquet mirror in the HF layout, the hub code path (with the
hub replaced by an in-memory dataset: tests never reach the network), resizing and scaling."""
import numpy as np
import pytest
import torch

from leakbench.data import load
from leakbench.errors import ConfigError


def test_digits_are_real_embedded_and_split_deterministically():
    train, test = load("digits", "train"), load("digits", "test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert train.shape == (1, 16, 16) and train.num_classes == 10
    assert 0.0 <= float(train.images.min()) and float(train.images.max()) <= 1.0
    assert set(test.labels.tolist()) == set(range(10))
    again = load("digits", "test")
    assert torch.equal(test.images, again.images)
    native = load("digits", "test", image_size=None)
    assert native.shape == (1, 8, 8)
    signed = load("digits", "test", scale="[-1,1]")
    assert torch.allclose(signed.to_unit(signed.images), test.images, atol=1e-6)
    # no test image is also a training image
    flat_train = {tuple(v) for v in (load("digits", "train", image_size=None).images * 16).round().flatten(1).tolist()}
    overlap = sum(tuple(v) in flat_train for v in (native.images * 16).round().flatten(1).tolist())
    assert overlap < 5  # sklearn's digits hold a few exact duplicates; a leaky split would share 360


def _write_mirror(root, name, split, images, labels):
    import datasets

    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    ds = datasets.Dataset.from_dict({"image": list(images), "label": list(labels)}, features=features)
    ds.to_parquet(str(folder / f"{split}.parquet"))


def test_local_parquet_mirror_in_the_hf_layout(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    _write_mirror(tmp_path, "mnist", "test", images, [3, 1, 4, 1, 5, 9])
    data = load("mnist", "test", data_dir=tmp_path, image_size=None)
    assert data.shape == (1, 28, 28) and data.labels.tolist() == [3, 1, 4, 1, 5, 9]
    assert torch.equal((data.images[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(images))
    small = load("mnist", "test", data_dir=tmp_path, image_size=14)
    assert small.shape == (1, 14, 14)


def test_decoded_mirror_splits_are_cached_on_disk_and_redecoded_when_the_file_changes(tmp_path, monkeypatch):
    """Every worker needs the decoded split: the runner decodes a mirror file once, later runners read
    the cache (same tensors), and a changed file is decoded again."""
    from leakbench import data as data_module
    from leakbench.run.grid import parse_grid
    from leakbench.run.runner import Runner, RunOptions

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    _write_mirror(tmp_path / "mirror", "mnist", "test", images, [0, 1, 2, 3, 4])
    grid = parse_grid({"datasets": [{"name": "mnist", "params": {"image_size": None, "scale": "[-1,1]"}}],
                       "models": ["lenet-zhu"], "attacks": ["dlg"], "defenses": ["none"]})
    spec = grid.cells()[0].dataset

    def runner():
        return Runner(grid, RunOptions(out_dir=tmp_path / "out", data_dir=tmp_path / "mirror", progress=False))

    decoded = runner().dataset(spec, "test")
    assert len(list((tmp_path / "out" / "cache" / "data").glob("*.pt"))) == 1
    real_reader = data_module.read_parquet_split

    def no_decoding(path):
        raise AssertionError("decoded again")

    monkeypatch.setattr(data_module, "read_parquet_split", no_decoding)
    cached = runner().dataset(spec, "test")
    assert torch.equal(cached.images, decoded.images) and torch.equal(cached.labels, decoded.labels)
    assert cached.scale == "[-1,1]" and cached.num_classes == 10 and cached.images.dtype == torch.float32
    monkeypatch.setattr(data_module, "read_parquet_split", real_reader)
    _write_mirror(tmp_path / "mirror", "mnist", "test", 255 - images, [0, 1, 2, 3, 4])
    changed = runner().dataset(spec, "test")
    assert torch.allclose(changed.images, -decoded.images, atol=1e-6)


def test_missing_mirror_entries_are_clean_errors(tmp_path):
    with pytest.raises(ConfigError, match="no folder .*cifar10 in the data dir"):
        load("cifar10", "test", data_dir=tmp_path)
    (tmp_path / "mnist").mkdir()
    with pytest.raises(ConfigError, match="missing .*mnist/train.parquet"):
        load("mnist", "train", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown split 'valid'"):
        load("digits", "valid")


@pytest.mark.parametrize("name, image_column, label_column, channels", [
    ("mnist", "image", "label", 1), ("cifar10", "img", "label", 3), ("cifar100", "img", "fine_label", 3),
    ("svhn", "image", "label", 3),
])
def test_hub_code_path_reads_each_datasets_columns(monkeypatch, name, image_column, label_column, channels):
    import datasets

    calls = []
    shape = (28, 28) if channels == 1 else (32, 32, 3)

    def fake_load_dataset(path, config=None, split=None):
        calls.append((path, config, split))
        rng = np.random.default_rng(1)
        return {image_column: [rng.integers(0, 256, size=shape, dtype=np.uint8) for _ in range(3)],
                label_column: [0, 1, 2]}

    monkeypatch.delenv("LEAKBENCH_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load(name, "train", image_size=None)
    assert data.shape[0] == channels and len(data) == 3 and data.labels.tolist() == [0, 1, 2]
    from leakbench.registry import DATASETS

    cls = DATASETS.get(name)
    assert calls == [(cls.hub_id, cls.hub_config, "train")]


def test_real_mnist_mirror(mnist_dir):
    data = load("mnist", "test", data_dir=mnist_dir, image_size=None)
    assert len(data) == 10000 and data.shape == (1, 28, 28)
    assert set(data.labels.tolist()) == set(range(10))


def test_att_faces_mirror_gets_a_fixed_per_person_holdout(att_faces_dir):
    data_dir = att_faces_dir
    train, test = load("att-faces", "train", data_dir=data_dir), load("att-faces", "test", data_dir=data_dir)
    assert len(train) == 320 and len(test) == 80 and train.shape == (1, 64, 64)
    assert torch.bincount(test.labels, minlength=40).tolist() == [2] * 40
