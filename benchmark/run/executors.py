"""Where a grid's cells run: in this process (serial), in a local process pool, or on Ray.

An executor maps ``Runner.run_job`` over jobs (a cell, or the cells that run as one engine program,
see ``Runner.program_key``) and yields each record as its job finishes; the parent process stays the
only writer of ``results.jsonl`` (one flock'd append per record), so results stream in, a kill loses at
most the jobs in flight, and nothing is written twice. Every cell derives its seeds from its own
identity (``derive_seed``) and a job's cells are fixed by the grid, so where a cell runs does not
change its numbers.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import signal
from abc import ABC, abstractmethod
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Iterator

import torch

from ..catalog import load_all
from ..errors import ConfigError
from .grid import Cell, Grid
from .reaper import Reaper
from .runner import Job, Runner, RunOptions

EXECUTORS = ("local", "ray")


def available_cores() -> int:
    """Cores this process may use (the affinity mask, which containers and `taskset` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(jobs: int, cores: int) -> int:
    """Workers of a run by default: one per core, never more than the jobs that will run (a program of
    many cells is one job), at least one."""
    return max(1, min(cores, jobs))


def threads_per_worker(workers: int, threads: int | None) -> int:
    """torch intra-op threads per worker: ``--threads`` if given, else the cores split evenly, so that
    N workers of torch's default (one thread per core each) do not oversubscribe the machine."""
    return threads if threads is not None else max(1, available_cores() // workers)


def longest_first(jobs: list[Job], cells: dict[str, Cell]) -> list[Job]:
    """A cheap schedule for a pool: cells of long-running kinds first (a collaborative cell runs the
    whole protocol, about a minute on the quick grid against seconds for a gradient cell), then programs
    of many cells, largest first, so the run does not end with one worker busy on a long job while the others idle. Single
    gradient cells go attack-major, so that cells in flight at the same time have different defense
    settings and do not wait on the same accuracy run."""
    def order(job: Job) -> tuple:
        first = cells[job.cells[0]]
        return (not first.kind.long_running, -len(job.cells), first.grid.attacks.index(first.attack))

    return sorted(jobs, key=order)


class CellExecutor(ABC):
    """Runs jobs and yields their cells' records in the order they finish. Use as a context manager."""


    def __enter__(self) -> "CellExecutor":
        return self

    def __exit__(self, *exc) -> None:
        return None

    @abstractmethod
    def run(self, runner: Runner, jobs: list[Job]) -> Iterator[dict]:
        ...


class SerialExecutor(CellExecutor):
    """One job after another in this process, in grid order."""

    def run(self, runner, jobs):
        cells = {c.key(): c for c in runner.grid.cells()}
        for job in jobs:
            yield from runner.run_job(job, cells)


# -- worker side (a spawned process or a Ray worker) ------------------------------------------------

_worker_runner: Runner | None = None
_worker_run_id: str | None = None
_worker_cells: dict[str, Cell] = {}


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies, so a killed run (SIGKILL included,
    which gives the parent no chance to clean up) leaves no worker behind; exit at once if the parent is
    already gone. Linux only (prctl); elsewhere workers end when their task queue closes."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _start_pool_worker(grid: Grid, options: RunOptions, threads: int, run_id: str, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    _start_worker(grid, options, threads, run_id)


def _start_worker(grid: Grid, options: RunOptions, threads: int, run_id: str) -> None:
    """Build this worker's Runner once per run: it keeps decoded datasets and oracles in memory across
    the cells the worker is given (the accuracy and oracle caches on disk are shared by all workers)."""
    global _worker_runner, _worker_run_id, _worker_cells
    if _worker_run_id == run_id:
        return
    torch.set_num_threads(threads)
    load_all()  # entry-point plugins register in every worker as they do in the parent
    _worker_runner = Runner(grid, options)
    _worker_cells = {c.key(): c for c in grid.cells()}
    _worker_run_id = run_id


def _run_job(job: Job) -> list[dict]:
    return _worker_runner.run_job(job, _worker_cells)


def _run_job_in_ray(grid: Grid, options: RunOptions, threads: int, run_id: str, job: Job) -> list[dict]:
    # Ray reuses worker processes across tasks: the Runner is built on a worker's first task of a run
    _start_worker(grid, options, threads, run_id)
    return _run_job(job)


def _new_run_id() -> str:
    import uuid

    return uuid.uuid4().hex


# -- local process pool -----------------------------------------------------------------------------

class LocalPoolExecutor(CellExecutor):
    """``workers`` processes on this machine (concurrent.futures). They are spawned, not forked: a
    forked child inherits torch's OpenMP thread pool and locks in whatever state the parent left them,
    which can deadlock; a spawned worker imports leakbench afresh."""


    def __init__(self, workers: int, threads: int | None = None) -> None:
        self.workers = workers
        self.threads = threads_per_worker(workers, threads)

    def run(self, runner, jobs):
        import multiprocessing

        if not jobs:
            return
        jobs = longest_first(jobs, {c.key(): c for c in runner.grid.cells()})
        reaper = Reaper().start()  # a worker killed while it still imports torch cannot arm die_with_parent
        pool = ProcessPoolExecutor(max_workers=min(self.workers, len(jobs)),
                                   mp_context=multiprocessing.get_context("spawn"), initializer=_start_pool_worker,
                                   initargs=(runner.grid, runner.options, self.threads, _new_run_id(), os.getpid()))
        futures = {pool.submit(_run_job, job) for job in jobs}
        try:
            yield from _as_finished(futures)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            reaper.stop()


def _as_finished(futures: set) -> Iterator[dict]:
    """Records as their futures (jobs) finish. After a failed job, no new job starts, the jobs already
    running still finish and are yielded (so their work is kept), then the first error is raised."""
    error = None
    pending = set(futures)
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            if future.cancelled():
                continue
            if future.exception() is not None:
                if error is None:
                    error = future.exception()
                    for queued in pending:
                        queued.cancel()
                continue
            yield from future.result()
    if error is not None:
        raise error


# -- Ray --------------------------------------------------------------------------------------------

_RAY_ADDRESS_ALLOWED = "allowed: the address of a running Ray cluster, e.g. HOST:6379, or none for a local one"


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A one-line error within seconds when ``HOST:PORT`` (or ``ray://HOST:PORT``) accepts no connection.
    ``auto`` and addresses without a port are left to Ray."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"--ray-address {address!r}: nothing accepts connections there "
                          f"({exc.strerror or exc}); {_RAY_ADDRESS_ALLOWED}") from None


class RayExecutor(CellExecutor):
    """Cells as Ray tasks, at most ``workers`` in flight, each reserving ``threads`` CPUs so that Ray's
    scheduler, not the cells, decides what fits on a node. Without ``address`` a local Ray instance is
    started (``workers`` x ``threads`` CPUs, no dashboard) and shut down afterwards. On a cluster the
    output folder must be on a filesystem every node sees: workers write the caches and the
    reconstructions there (the driver alone writes results.jsonl)."""


    def __init__(self, workers: int, threads: int | None = None, address: str | None = None) -> None:
        self.workers = workers
        self.threads = threads_per_worker(workers, threads)
        self.address = address
        self.reaper: Reaper | None = None

    def __enter__(self):
        import ray

        # the local workers inherit the parent's environment, and with it where leakbench is installed
        kwargs = (dict(address=self.address) if self.address else
                  dict(num_cpus=self.workers * self.threads, include_dashboard=False,
                       object_store_memory=_LOCAL_OBJECT_STORE_BYTES))
        if self.address:
            _check_reachable(self.address)  # ray.init retries an unreachable address for minutes
        else:  # the local instance's processes inherit the token: a killed driver takes them with it
            self.reaper = Reaper().start()
        try:
            ray.init(ignore_reinit_error=True, log_to_driver=False, configure_logging=False, **kwargs)
        except (ConnectionError, ValueError) as exc:
            if self.reaper is not None:
                self.reaper.stop()
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"--ray-address {self.address!r}: cannot connect ({message}); "
                              f"{_RAY_ADDRESS_ALLOWED}") from None
        return self

    def __exit__(self, *exc) -> None:
        import ray

        ray.shutdown()  # stops the local instance we started; only disconnects from a cluster
        if self.reaper is not None:
            self.reaper.stop()
            self.reaper = None

    def run(self, runner, jobs):
        import ray

        task = ray.remote(num_cpus=self.threads, max_retries=0)(_run_job_in_ray)
        grid_ref = ray.put(runner.grid)  # sent once, not with every task
        # absolute paths: a worker's working directory is not the driver's on another node
        options = dataclasses.replace(runner.options, out_dir=runner.options.out_dir.resolve(),
                                      cache_dir=runner.options.cache_dir and runner.options.cache_dir.resolve())
        run_id = _new_run_id()
        queue = longest_first(jobs, {c.key(): c for c in runner.grid.cells()})
        in_flight = []
        while queue or in_flight:
            while queue and len(in_flight) < self.workers:
                in_flight.append(task.remote(grid_ref, options, self.threads, run_id, queue.pop(0)))
            done, in_flight = ray.wait(in_flight, num_returns=1)
            yield from ray.get(done[0])


# The local instance's shared-memory store only carries the grid and one record per cell: Ray's default
# (30% of RAM) would reserve gigabytes on a small machine for nothing; Ray's minimum is 75 MiB.
_LOCAL_OBJECT_STORE_BYTES = 128 * 1024 ** 2


_RAY_ADDRESS = re.compile(r"(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):(\d{1,5})\Z")


def check_ray_address(address: str) -> None:
    """``auto``, ``HOST:PORT`` or ``ray://HOST:PORT`` (port 1-65535); a one-line ConfigError otherwise."""
    match = _RAY_ADDRESS.match(address)
    if address != "auto" and (match is None or not 1 <= int(match.group(3)) <= 65535):
        raise ConfigError(f"--ray-address {address!r} is invalid; {_RAY_ADDRESS_ALLOWED}, or auto")


def make_executor(name: str = "local", workers: int = 1, threads: int | None = None,
                  ray_address: str | None = None) -> CellExecutor:
    """The executor for the CLI's ``--executor/--workers/--threads/--ray-address``; bad values raise a
    one-line ConfigError before anything runs."""
    if name not in EXECUTORS:
        raise ConfigError(f"--executor {name!r} is invalid; allowed: {', '.join(EXECUTORS)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers {workers!r} is invalid; allowed: an integer >= 1")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads!r} is invalid; allowed: an integer >= 1")
    if name == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ConfigError("--executor ray needs Ray, which is not installed; install leakbench[ray] "
                              "(pip install 'leakbench[ray]'), or use --executor local")
        if ray_address is not None:
            check_ray_address(ray_address)
        return RayExecutor(workers, threads, ray_address)
    if ray_address is not None:
        raise ConfigError(f"--ray-address {ray_address!r} needs --executor ray; allowed with --executor local: none")
    return SerialExecutor() if workers == 1 else LocalPoolExecutor(workers, threads)
