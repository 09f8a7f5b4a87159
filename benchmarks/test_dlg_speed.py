"""DLG attacks per minute, one attack at a time, on the reference setup of the speed issue: lenet-zhu,
32x32x3 CIFAR-10 targets, 300 L-BFGS steps (lr 1, max_iter 20, history 100). Not run by the unit tests:
`pytest benchmarks/test_dlg_speed.py` (needs LEAKBENCH_DATA_DIR with cifar10/)."""
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from leakbench.data import load
from leakbench.metrics import score_reconstruction
from leakbench.models import build_model
from leakbench.registry import ATTACKS, DEFENSES
from leakbench.threat import AttackTask

TARGETS = 4


@pytest.fixture(scope="module")
def cifar():
    data_dir = os.environ.get("LEAKBENCH_DATA_DIR")
    if not data_dir or not (Path(data_dir) / "cifar10").is_dir():
        pytest.skip("set LEAKBENCH_DATA_DIR to a mirror holding cifar10/")
    return load("cifar10", "test", data_dir=data_dir)


def test_dlg_one_at_a_time(benchmark, cifar):
    torch.set_num_threads(2)
    attack = ATTACKS.build("dlg", {"steps": 300})
    tasks = []
    for t in range(TARGETS):
        model = build_model("lenet-zhu", cifar.shape, 10, seed=t)
        x, y = cifar.images[t:t + 1], cifar.labels[t:t + 1]
        shared = DEFENSES.build("none").share(model, x, F.one_hot(y, 10).float())
        tasks.append((AttackTask(model=model, shared=shared, input_shape=cifar.shape, num_classes=10,
                                 batch_size=1, seed=t), x, y))

    def run_all():
        return [attack.run_one(task) for task, _, _ in tasks]

    results = benchmark.pedantic(run_all, rounds=1, iterations=1)
    seconds = benchmark.stats.stats.mean
    recovered = sum(max(score_reconstruction(r.images.clamp(0, 1), x, None, y, metrics=("mse",))["mse"]) < 1e-3
                    for r, (_, x, y) in zip(results, tasks))
    evals = sum(r.closure_evals for r in results)
    benchmark.extra_info.update({
        "attacks_per_minute": round(60 * TARGETS / seconds, 2), "seconds_per_attack": round(seconds / TARGETS, 2),
        "closure_evals_per_attack": evals / TARGETS, "ms_per_closure_eval": round(1000 * seconds / evals, 2),
        "recovered_mse_below_1e-3": f"{recovered}/{TARGETS}",
    })
    print(benchmark.extra_info)
    assert evals > 0
