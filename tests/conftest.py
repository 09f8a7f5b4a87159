"""Shared fixtures. Real-data tests read the parquet mirror named by LEAKBENCH_DATA_DIR (CI points it at
../shared/data) and skip cleanly where it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def mirror_dir(dataset: str) -> str:
    data_dir = os.environ.get("LEAKBENCH_DATA_DIR")
    if not data_dir or not (Path(data_dir) / dataset).is_dir():
        pytest.skip(f"real data: set LEAKBENCH_DATA_DIR to a mirror holding {dataset}/ (e.g. ../shared/data)")
    return data_dir


@pytest.fixture
def mnist_dir() -> str:
    return mirror_dir("mnist")


# Tiny models are overhead-bound: one thread is faster, and avoids oversubscribing the cores when
# tests start subprocesses.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def att_faces_dir() -> str:
    return mirror_dir("att-faces")


@pytest.fixture
def cifar10_dir() -> str:
    return mirror_dir("cifar10")


@pytest.fixture
def cifar100_dir() -> str:
    return mirror_dir("cifar100")


@pytest.fixture
def lfw_dir() -> str:
    return mirror_dir("lfw")


@pytest.fixture(scope="session")
def gan_digits():
    """The embedded digits as the GAN tests use them (32x32 in [-1, 1]): the participants' pool, the
    test split, and an oracle trained on a stratified 30% of the training split no participant gets."""
    from leakbench.data import load
    from leakbench.scoring.oracle import holdout_split, train_oracle

    train = load("digits", "train", image_size=32, scale="[-1,1]")
    test = load("digits", "test", image_size=32, scale="[-1,1]")
    pool, oracle_data = holdout_split(train, fraction=0.3, seed=0)
    return pool, test, train_oracle(oracle_data, seed=0)
