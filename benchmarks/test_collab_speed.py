"""Seconds per round of the collaborative protocol (pytest-benchmark; not part of the unit tests).

    pytest benchmarks/test_collab_speed.py --benchmark-columns=mean,stddev,rounds

One round = every participant takes one turn (download, local SGD, upload); the global-model test that
follows each round is not timed. The MNIST cases need LEAKBENCH_DATA_DIR with an mnist/ mirror.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from leakbench.collab import CollaborativeLearning, ProtocolConfig, sparse_vector_upload
from leakbench.data import load

torch.set_num_threads(1)

UPLOADS = {
    "full": dict(theta_u=1.0, theta_d=1.0),
    "theta_u=0.1": dict(theta_u=0.1, theta_d=1.0),
    "dssgd-dp": dict(theta_u=1.0, theta_d=1.0, upload_criterion="sparse-vector", epsilon_c=10.0, tau=1e-4,
                     gamma=1e-3),
}


def _digits32():
    return (load("digits", split, image_size=32, scale="[-1,1]") for split in ("train", "test"))


def _mnist():
    data_dir = os.environ.get("LEAKBENCH_DATA_DIR")
    if not data_dir or not Path(data_dir, "mnist").is_dir():
        pytest.skip("needs LEAKBENCH_DATA_DIR with an mnist/ mirror")
    train = load("mnist", "train", data_dir=data_dir, scale="[-1,1]")
    test = load("mnist", "test", data_dir=data_dir, scale="[-1,1]").subset(torch.arange(1000))
    return train, test


def _time_rounds(benchmark, config, train, test, rounds):
    simulator = CollaborativeLearning(config, train, test, seed=0)
    benchmark.extra_info.update(num_params=simulator.server.num_params,
                                participant_samples=simulator.result.participant_samples)
    benchmark.pedantic(simulator.run_round, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info["final_accuracy"] = simulator.result.final_accuracy


@pytest.mark.parametrize("upload", list(UPLOADS))
def test_round_digits_hitaj_cnn(benchmark, upload):
    """Two participants (0-4 / 5-9) on the embedded digits at 32x32, the Hitaj MNIST CNN, whole local epochs."""
    train, test = _digits32()
    config = ProtocolConfig(model="hitaj-mnist-cnn", lr=0.05, evaluate_local=False, **UPLOADS[upload])
    _time_rounds(benchmark, config, train, test, rounds=5)


@pytest.mark.parametrize("upload", list(UPLOADS))
def test_round_mnist_hitaj_cnn_25_batches(benchmark, upload):
    """Real MNIST, two participants, 25 local batches of 64 per turn (the setting of docs/collab.md)."""
    train, test = _mnist()
    config = ProtocolConfig(model="hitaj-mnist-cnn", lr=0.05, local_batches=25, evaluate_local=False,
                            **UPLOADS[upload])
    _time_rounds(benchmark, config, train, test, rounds=5)


def test_round_mnist_hitaj_cnn_full_local_epoch(benchmark):
    """Real MNIST, the paper's turn: one whole local epoch per participant (~8,600 images each)."""
    train, test = _mnist()
    config = ProtocolConfig(model="hitaj-mnist-cnn", lr=1e-3, evaluate_local=False)
    _time_rounds(benchmark, config, train, test, rounds=2)


def test_sparse_vector_upload_hitaj_cnn_size(benchmark):
    """The DP upload alone, on an update the size of the Hitaj MNIST CNN (105,707 parameters), c = |w|."""
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(105_707, generator=generator) * 1e-3
    benchmark(lambda: sparse_vector_upload(delta, count=delta.numel(), epsilon_c=10.0, tau=1e-4, gamma=1e-3,
                                           generator=generator))
