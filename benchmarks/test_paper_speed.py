"""Wall time of each paper experiment at ``--scale cpu`` (pytest-benchmark; not part of the unit tests).

    LEAKBENCH_DATA_DIR=../shared/data pytest benchmarks/test_paper_speed.py --benchmark-columns=min,rounds

One round per experiment from an empty output folder (nothing cached), through the same path as
``leakbench paper run NAME --scale cpu`` (the grid runner, workers following the jobs, torch's threads).
The issue's budget: each DLG table in at most 15 minutes on 2 cores. An experiment whose data is not on
this machine is skipped.
"""
from __future__ import annotations

import pytest

from leakbench.errors import ConfigError
from leakbench.paper.experiment import experiment_names
from leakbench.paper.session import run_experiments
from leakbench.run.execute import ExecuteOptions
from leakbench.run.executors import available_cores

CPU_SCALE_BUDGET_SECONDS = 15 * 60


@pytest.mark.parametrize("name", experiment_names())
def test_paper_experiment_at_cpu_scale(benchmark, tmp_path_factory, name):
    def run():
        out = tmp_path_factory.mktemp(name)
        return run_experiments([name], scale="cpu", options=ExecuteOptions(out=out, progress=False))

    try:
        folders = benchmark.pedantic(run, rounds=1, iterations=1)
    except ConfigError as exc:  # its data is not here (the shared mirror or the hub)
        pytest.skip(str(exc))
    paper_md = (folders[0] / "paper.md").read_text()
    seconds = benchmark.stats.stats.min
    benchmark.extra_info.update(experiment=name, cores=available_cores(), budget_seconds=CPU_SCALE_BUDGET_SECONDS,
                                within_budget=seconds <= CPU_SCALE_BUDGET_SECONDS,
                                agreement=next(line for line in paper_md.splitlines() if line.startswith("**Agreement")))
