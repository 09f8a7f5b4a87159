"""The one loader: embedded digits, a local parquet mirror in leakbench's layout and in the hub's (file
names, shards, column names), the hub code path (with the hub replaced by an in-memory dataset: tests
never reach the network), the offline check before any work, resizing and scaling."""
import time

import numpy as np
import pytest
import torch

from leakbench import data as data_module
from leakbench.data import load
from leakbench.errors import ConfigError


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """A machine without network that has never downloaded anything: HF's offline switches on, and
    empty HF datasets and scikit-learn caches (a developer's cached copies would serve otherwise)."""
    import datasets.config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path / "sklearn-data"))

    def no_network(url, timeout=None):
        raise AssertionError(f"probed {url} although offline")

    monkeypatch.setattr(data_module, "unreachable", no_network)


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


def test_missing_mirror_entries_are_clean_errors(tmp_path, offline):
    """A split the mirror lacks comes from the public source; offline, that is one line naming the
    dataset, the split, the source and the files that would serve it."""
    with pytest.raises(ConfigError, match=r"dataset 'cifar10' split 'test': not in --data-dir .*hub's "
                                          r"uoft-cs/cifar10 cannot be downloaded offline \(HF_HUB_OFFLINE=1\).*"
                                          r"cifar10/test.parquet .*cifar10/plain_text/test-00000-of-0000N.parquet"):
        load("cifar10", "test", data_dir=tmp_path)
    (tmp_path / "mnist").mkdir()
    with pytest.raises(ConfigError, match="'mnist' split 'train'.*ylecun/mnist.*mnist/train.parquet"):
        load("mnist", "train", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="'lfw' split 'test'.*fetch_lfw_people cannot download it offline.*"
                                          "lfw/train.parquet"):  # lfw's test split is derived from train
        load("lfw", "test", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown split 'valid'"):
        load("digits", "valid")


def test_hub_shards_must_be_complete(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    _write_mirror(tmp_path, "mnist", "train-00001-of-00002", images, [0, 1, 2, 3])
    with pytest.raises(ConfigError, match=r"mnist: the shards of 'train' are incomplete .*train-00001-of-00002"):
        load("mnist", "train", data_dir=tmp_path)
    _write_mirror(tmp_path, "mnist", "train-00000-of-00002", images[::-1], [3, 2, 1, 0])
    data = load("mnist", "train", data_dir=tmp_path, image_size=None)  # shard 0, then shard 1
    assert data.labels.tolist() == [3, 2, 1, 0, 0, 1, 2, 3]


@pytest.mark.parametrize("name, image_column, label_column, channels", [
    ("mnist", "image", "label", 1), ("cifar10", "img", "label", 3), ("cifar100", "img", "fine_label", 3),
    ("svhn", "image", "label", 3),
])
def test_hub_code_path_reads_each_datasets_columns(monkeypatch, name, image_column, label_column, channels):
    import datasets

    calls, probed = [], []
    shape = (28, 28) if channels == 1 else (32, 32, 3)

    def fake_load_dataset(path, config=None, split=None):
        calls.append((path, config, split))
        rng = np.random.default_rng(1)
        return {image_column: [rng.integers(0, 256, size=shape, dtype=np.uint8) for _ in range(3)],
                label_column: [0, 1, 2]}

    monkeypatch.delenv("LEAKBENCH_DATA_DIR", raising=False)
    for var in data_module.OFFLINE_ENV_VARS:  # online, with the probe of the hub answered here
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(data_module, "unreachable", lambda url: probed.append(url))
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load(name, "train", image_size=None)
    assert data.shape[0] == channels and len(data) == 3 and data.labels.tolist() == [0, 1, 2]
    from leakbench.registry import DATASETS

    cls = DATASETS.get(name)
    assert (cls.hub_image_column, cls.hub_label_column) == (image_column, label_column)
    assert calls == [(cls.hub_id, cls.hub_config, "train")]
    import huggingface_hub.constants

    assert probed == [f"{huggingface_hub.constants.ENDPOINT}/api/datasets/{cls.hub_id}"]


def test_the_probe_tells_an_answering_server_from_none(monkeypatch):
    """On this machine only: a server that answers (even with an error status) is reachable; a closed
    port is not, and the probe says why at once."""
    import http.server
    import socket
    import threading

    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):  # straight to 127.0.0.1
        monkeypatch.delenv(var, raising=False)

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert data_module.unreachable(f"http://127.0.0.1:{server.server_port}/api/datasets/x", timeout=2) is None
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    started = time.perf_counter()
    why = data_module.unreachable(f"http://127.0.0.1:{closed}/api/datasets/x", timeout=2)
    assert why and why.startswith(f"cannot reach http://127.0.0.1:{closed}/") and time.perf_counter() - started < 2


def test_an_unreachable_hub_is_one_line_not_a_download(monkeypatch, tmp_path):
    """Online but the probe fails (DNS, refused, timeout): the same one line, and no download attempt."""
    import datasets

    monkeypatch.delenv("LEAKBENCH_DATA_DIR", raising=False)
    for var in data_module.OFFLINE_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(data_module, "unreachable", lambda url: f"cannot reach {url} (Name or service not known)")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(ConfigError, match=r"'svhn' split 'train': no --data-dir given, and the Hugging Face hub's "
                                          r"ufldl-stanford/svhn cannot be downloaded: cannot reach .*svhn/train.parquet"):
        load("svhn", "train")


def _hub_copy(source, target, *, rename=None, drop=(), shards=1, rows=None):
    """Write the shared parquet file ``source`` as the hub publishes it: ``target`` is a path prefix
    (``.../train``) that gets ``-0000K-of-0000N.parquet``, the columns renamed, in ``shards`` contiguous
    shards. Real HF ``datasets`` files, as ``push_to_hub`` writes them."""
    import datasets

    ds = datasets.Dataset.from_parquet(str(source), keep_in_memory=True)
    if rows is not None:
        ds = ds.select(range(rows))
    ds = ds.remove_columns([c for c in drop if c in ds.column_names])
    if rename:
        ds = ds.rename_columns(rename)
    target.parent.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        ds.shard(shards, k, contiguous=True).to_parquet(f"{target}-{k:05d}-of-{shards:05d}.parquet")


def _assert_same(a, b):
    assert a.shape == b.shape and len(a) == len(b)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


@pytest.mark.realdata
def test_cifar100_from_the_hubs_sharded_files_and_columns(cifar100_dir, tmp_path):
    """CIFAR-100 as uoft-cs/cifar100 publishes it (img, fine_label, coarse_label), cut into two shards,
    reads the same pixels and labels as the shared layout; so does the runner's cached decode."""
    from pathlib import Path

    from leakbench.run.grid import parse_grid
    from leakbench.run.runner import Runner, RunOptions

    shared = Path(cifar100_dir) / "cifar100" / "train.parquet"
    mirror = tmp_path / "mirror"
    _hub_copy(shared, mirror / "cifar100" / "train", rename={"image": "img", "label": "fine_label"},
              drop=("orig_index",), shards=2)
    assert sorted(p.name for p in (mirror / "cifar100").iterdir()) == [
        "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    expected = load("cifar100", "train", data_dir=cifar100_dir, image_size=None)
    assert len(expected) == 486
    _assert_same(load("cifar100", "train", data_dir=mirror, image_size=None), expected)
    grid = parse_grid({"datasets": [{"name": "cifar100", "params": {"image_size": None}}], "split": "train",
                       "models": ["lenet-zhu"], "attacks": ["dlg"], "defenses": ["none"]})
    runner = Runner(grid, RunOptions(out_dir=tmp_path / "out", data_dir=str(mirror), progress=False))
    _assert_same(runner.dataset(grid.cells()[0].dataset, "train"), expected)
    assert len(list((tmp_path / "out" / "cache" / "data").glob("*.pt"))) == 1


@pytest.mark.realdata
def test_lfw_and_mnist_from_the_hubs_file_names(lfw_dir, mnist_dir, tmp_path):
    """LFW in push_to_hub's layout (data/train-00000-of-00001.parquet) gives the same derived train and
    test splits; MNIST downloaded under its hub id (ylecun/mnist/mnist/test-...) the same images."""
    from pathlib import Path

    mirror = tmp_path / "mirror"
    _hub_copy(Path(lfw_dir) / "lfw" / "train.parquet", mirror / "lfw" / "data" / "train")
    for split in ("train", "test"):
        _assert_same(load("lfw", split, data_dir=mirror, image_size=None),
                     load("lfw", split, data_dir=lfw_dir, image_size=None))
    _hub_copy(Path(mnist_dir) / "mnist" / "test.parquet", mirror / "ylecun" / "mnist" / "mnist" / "test", rows=500)
    from_hub = load("mnist", "test", data_dir=mirror, image_size=None)
    _assert_same(from_hub, load("mnist", "test", data_dir=mnist_dir, image_size=None).subset(range(500)))


@pytest.mark.realdata
def test_a_mirror_file_with_other_columns_is_one_line_naming_it(cifar100_dir, tmp_path, capsys, offline):
    """Through the CLI: exit 2, one line naming the file, the columns found and those expected; and a
    grid whose accuracy run needs CIFAR-100's test split, which the mirror lacks, is refused up front."""
    from pathlib import Path

    from leakbench.cli import main

    mirror = tmp_path / "mirror"
    _hub_copy(Path(cifar100_dir) / "cifar100" / "train.parquet", mirror / "cifar100" / "cifar100" / "train",
              rename={"image": "picture", "label": "fine_label"}, rows=20)
    grid = tmp_path / "grid.yaml"
    grid.write_text("include: _defaults.yaml\ndatasets: [cifar100]\nsplit: train\nattacks: [dlg]\n"
                    "defenses: [none]\n")
    assert main(["validate", str(grid), "--data-dir", str(mirror)]) == 2
    err = capsys.readouterr().err
    bad = mirror / "cifar100" / "cifar100" / "train-00000-of-00001.parquet"
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{bad}: columns found: picture, fine_label, coarse_label, orig_index; expected 'image' and 'label' " \
           f"or 'img' and 'fine_label'" in err, err
    _hub_copy(Path(cifar100_dir) / "cifar100" / "train.parquet", mirror / "cifar100" / "cifar100" / "train",
              rename={"image": "img", "label": "fine_label"}, rows=20)
    assert main(["validate", str(grid), "--data-dir", str(mirror)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset 'cifar100' split 'test': not in --data-dir" in err, err


def test_a_grid_needing_svhn_offline_fails_fast_before_any_cell(tmp_path, capsys, monkeypatch, offline):
    """`leakbench run` on a machine without network and without the data: one line naming the dataset,
    its hub id and the mirror layout that would serve it, exit 2, in seconds, nothing written."""
    from leakbench.cli import main

    monkeypatch.delenv("LEAKBENCH_DATA_DIR", raising=False)
    grid = tmp_path / "svhn.yaml"
    grid.write_text("include: _defaults.yaml\ndatasets: [svhn]\nattacks: [dlg]\ndefenses: [none]\n")
    for argv in (["validate", str(grid)], ["run", "--grid", str(grid), "--out", str(tmp_path / "out")]):
        started = time.perf_counter()
        assert main(argv) == 2
        assert time.perf_counter() - started < 10
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert "dataset 'svhn' split 'test': no --data-dir given" in err and "ufldl-stanford/svhn" in err, err
        assert "svhn/test.parquet" in err and "svhn/cropped_digits/test-00000-of-0000N.parquet" in err, err
    assert not (tmp_path / "out").exists()


def test_real_mnist_mirror(mnist_dir):
    data = load("mnist", "test", data_dir=mnist_dir, image_size=None)
    assert len(data) == 10000 and data.shape == (1, 28, 28)
    assert set(data.labels.tolist()) == set(range(10))


def test_att_faces_mirror_gets_a_fixed_per_person_holdout(att_faces_dir):
    data_dir = att_faces_dir
    train, test = load("att-faces", "train", data_dir=data_dir), load("att-faces", "test", data_dir=data_dir)
    assert len(train) == 320 and len(test) == 80 and train.shape == (1, 64, 64)
    assert torch.bincount(test.labels, minlength=40).tolist() == [2] * 40
