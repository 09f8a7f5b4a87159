"""Wall time of whole grids on 1 and 2 workers (pytest-benchmark; not part of the unit tests).

    pytest benchmarks/test_grid_speed.py --benchmark-columns=min,rounds --benchmark-group-by=func

Every round starts from an empty output folder, so nothing is cached: the time is what a user waits
for ``leakbench run --grid quick --workers N --threads 1``, worker start-up included. One torch thread
per worker: the grid's models are tiny and overhead-bound, so one thread is as fast as two (and far
faster on a busy machine, where idle OpenMP threads spin), and 1 vs 2 workers then compares one core
with two. The speedup of 2 workers over 1 is the ratio pytest-benchmark prints next to the slower row.
The issue's target is the quick grid in at most 5 minutes on 2 cores.
"""
from __future__ import annotations

import os

import pytest
import torch

from leakbench.run.executors import available_cores, make_executor
from leakbench.run.grid import load_grid, parse_grid
from leakbench.run.runner import Runner, RunOptions

QUICK_GRID_TARGET_SECONDS = 5 * 60
THREADS_PER_WORKER = 1

# Cells of a second or two: the time is mostly starting the pool or Ray and warming up its workers.
SHORT_GRID = {
    "name": "short",
    "datasets": [{"name": "digits", "params": {"image_size": 8}}],
    "models": ["lenet-zhu"],
    "attacks": [{"name": "idlg", "params": {"steps": 6}}, {"name": "dlg", "params": {"steps": 6}}],
    "defenses": ["none", {"name": "gaussian-noise", "sweep": {"variance": [1e-1]}}],
    "targets": 1,
    "accuracy": {"epochs": 1, "train_size": 96, "test_size": 64},
}


def _time_grid(benchmark, tmp_path_factory, grid, executor_name: str, workers: int,
               data_dir: str | None = None) -> list[dict]:
    threads = THREADS_PER_WORKER

    def fresh_runner():
        return (Runner(grid, RunOptions(out_dir=tmp_path_factory.mktemp("grid"), data_dir=data_dir,
                                        progress=False)),), {}

    def run(runner):
        torch.set_num_threads(threads)  # a serial run computes in this process
        with make_executor(executor_name, workers, threads) as executor:
            return runner.run(executor)

    records = benchmark.pedantic(run, setup=fresh_runner, rounds=1, iterations=1)
    benchmark.extra_info.update(grid=grid.name, cells=len(grid.cells()), executor=executor_name, workers=workers,
                                threads_per_worker=threads, cores=available_cores())
    return records


@pytest.mark.parametrize("workers", [1, 2])
def test_quick_grid(benchmark, tmp_path_factory, workers):
    """The shipped quick grid (every attack against every defense family on the embedded digits)."""
    grid = load_grid("quick")
    records = _time_grid(benchmark, tmp_path_factory, grid, "local", workers)
    assert sorted(r["key"] for r in records) == sorted(c.key() for c in grid.cells())
    seconds = benchmark.stats.stats.min
    benchmark.extra_info.update(target_seconds=QUICK_GRID_TARGET_SECONDS,
                                within_target=seconds <= QUICK_GRID_TARGET_SECONDS)


def test_membership_grid(benchmark, tmp_path_factory):
    """The shipped membership grid (offline LiRA with 8 reference models and the loss attack, 7 defense
    settings, MNIST and CIFAR-10 from the LEAKBENCH_DATA_DIR mirror) on 2 workers: the wall time the
    issue asks for, reference models and accuracy runs included."""
    data_dir = os.environ.get("LEAKBENCH_DATA_DIR")
    if not data_dir:
        pytest.skip("the membership grid reads MNIST and CIFAR-10: set LEAKBENCH_DATA_DIR to a mirror")
    grid = load_grid("membership")
    records = _time_grid(benchmark, tmp_path_factory, grid, "local", 2, data_dir=data_dir)
    assert sorted(r["key"] for r in records) == sorted(c.key() for c in grid.cells())


@pytest.mark.parametrize("executor_name", ["local", "ray"])
def test_executor_overhead(benchmark, tmp_path_factory, executor_name):
    """Four short cells on 2 workers, starting the process pool or a local Ray instance included: the
    difference between the two rows is what Ray costs over the local pool."""
    if executor_name == "ray":
        pytest.importorskip("ray")
    grid = parse_grid(SHORT_GRID)
    records = _time_grid(benchmark, tmp_path_factory, grid, executor_name, 2)
    assert len(records) == len(grid.cells())


# The `full` grid's DLG cells on CIFAR-10 (300 L-BFGS steps, no early-stopping rules), one seed, 8 of its
# defense settings and 4 targets per cell (the full grid has 26 and 16): with batch_cells the 32 targets
# are one engine program, without it eight programs of 4. Serial, with every core's threads for the engine.
FULL_SLICE = {
    "name": "full-slice",
    "datasets": [{"name": "cifar10"}],
    "models": ["lenet-zhu"],
    "attacks": [{"name": "dlg", "params": {"steps": 300}}],
    "defenses": ["none", {"name": "gaussian-noise", "sweep": {"variance": [1e-4, 1e-3, 1e-2, 1e-1]}},
                 {"name": "pruning", "sweep": {"ratio": [0.1, 0.5, 0.99]}}],
    "targets": 4,
    "accuracy": {"epochs": 1, "train_size": 256, "test_size": 256},
}


@pytest.mark.parametrize("batch_cells", [True, False], ids=["one-program", "per-cell"])
def test_full_grid_slice(benchmark, tmp_path_factory, batch_cells):
    """Cells that differ only in their defense setting as one engine program, against one program per
    cell (needs LEAKBENCH_DATA_DIR with cifar10/)."""
    import os
    from pathlib import Path

    data_dir = os.environ.get("LEAKBENCH_DATA_DIR")
    if not data_dir or not (Path(data_dir) / "cifar10").is_dir():
        pytest.skip("set LEAKBENCH_DATA_DIR to a mirror holding cifar10/")
    grid = parse_grid({**FULL_SLICE, "batch_cells": batch_cells})
    threads = available_cores()

    def fresh_runner():
        return (Runner(grid, RunOptions(out_dir=tmp_path_factory.mktemp("slice"), data_dir=data_dir,
                                        progress=False)),), {}

    def run(runner):
        torch.set_num_threads(threads)
        return runner.run()

    records = benchmark.pedantic(run, setup=fresh_runner, rounds=1, iterations=1)
    assert len(records) == len(grid.cells())
    tasks = grid.targets * len(grid.cells())
    seconds = benchmark.stats.stats.min
    recovered = sum(r["metrics"]["recovered_rate"] * grid.targets for r in records)
    benchmark.extra_info.update(cells=len(records), targets=tasks, threads=threads,
                                attacks_per_minute=round(60 * tasks / seconds, 2),
                                recovered=f"{round(recovered)}/{tasks}",
                                recovered_without_defense=[r["metrics"]["recovered_rate"] for r in records
                                                           if r["defense"] == "none"][0])
    print(f"batch_cells={batch_cells}: {seconds:.1f} s, {60 * tasks / seconds:.2f} attacks/min, "
          f"recovered {round(recovered)}/{tasks}")
