"""Running a grid into a results folder, as ``leakbench run`` and ``leakbench paper run`` both do: claim
the folder, check everything checkable (leaving nothing behind on bad input), choose workers from the jobs,
then run on the chosen executor (resumable: finished cells are kept)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..storage import check_writable
from .executors import available_cores, default_workers, make_executor
from .grid import Grid
from .runner import Runner, RunOptions


@dataclass(frozen=True)
class ExecuteOptions:
    out: Path
    data_dir: str | None = None
    device: str = "cpu"
    workers: int | None = None       # None: follow the jobs (one per job, at most one per core)
    threads: int | None = None
    executor: str = "local"
    ray_address: str | None = None
    force: bool = False
    progress: bool = True


def check_executor(options: ExecuteOptions) -> None:
    """Bad executor options fail before any file is written."""
    make_executor(options.executor, 1 if options.workers is None else options.workers, options.threads,
                  options.ray_address)


def execute(grid: Grid, options: ExecuteOptions) -> Runner:
    """Run every pending cell of ``grid`` into ``options.out``; returns the runner (its records are there)."""
    check_executor(options)
    out = Path(options.out)
    check_writable(out, what="--out")
    runner = Runner(grid, RunOptions(out_dir=out, data_dir=options.data_dir, device=options.device,
                                     progress=options.progress))
    runner.claim_folder(force=options.force)
    fresh = not out.exists()
    try:  # a missing dataset or too many targets is bad input: fail before the first cell runs
        runner.preflight()
    except BaseException:
        if fresh:  # leave nothing behind (decoded-data cache, lock files)
            shutil.rmtree(out, ignore_errors=True)
        raise
    # workers follow the jobs that will run (a program of many cells is one job), so a lone program gets
    # the calling process and every core; a pool splits the cores between its workers
    workers = options.workers if options.workers is not None else \
        default_workers(len(runner.jobs(runner.pending())), available_cores())
    with make_executor(options.executor, workers, options.threads, options.ray_address) as executor:
        runner.run(executor)
    return runner
