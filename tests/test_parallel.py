"""Parallel grids: a process pool and Ray give a serial run's numbers, a killed parallel run resumes
without loss or duplicates, and shared work (accuracy runs, oracles) is computed once."""
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from leakbench.cli import main
from leakbench.run.executors import RayExecutor
from leakbench.run.grid import parse_grid
from leakbench.run.report import render
from leakbench.run.results import ResultsStore
from leakbench.run.runner import Runner, RunOptions

# 2 attacks x 3 defense settings on 8x8 digits: seconds per cell, so the fixed cost of starting
# workers dominates; what is checked is that where a cell runs does not change its numbers.
TINY = {
    "name": "tiny-parallel",
    "datasets": [{"name": "digits", "params": {"image_size": 8}}],
    "models": ["lenet-zhu"],
    "attacks": [{"name": "idlg", "params": {"steps": 6}}, {"name": "dlg", "params": {"steps": 6}}],
    "defenses": ["none", {"name": "gaussian-noise", "sweep": {"variance": [1e-1]}},
                 {"name": "large-batch", "params": {"batch_size": 2}}],
    "targets": 1,
    "accuracy": {"epochs": 1, "train_size": 96, "test_size": 64},
}


def _comparable(record):
    # timings and the accuracy run's own timing differ between runs; everything else must not
    drop = {"wall_seconds", "finished_at", "accuracy_details"}
    return {k: v for k, v in record.items() if k not in drop}


def _records(out: Path) -> dict:
    return {r["key"]: _comparable(r) for r in ResultsStore(out / "results.jsonl").records()}


@pytest.fixture(scope="module")
def tiny_grid_file(tmp_path_factory):
    import yaml

    path = tmp_path_factory.mktemp("grid") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    Runner(parse_grid(TINY), RunOptions(out_dir=out, progress=False)).run()
    render(out, images=False)
    return out


def _expected_keys():
    return {c.key() for c in parse_grid(TINY).cells()}


def test_ray_gives_the_serial_results(tmp_path, serial_run):
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    with RayExecutor(2, threads=1) as executor:
        Runner(parse_grid(TINY), RunOptions(out_dir=out, progress=False)).run(executor)
    assert _records(out) == _records(serial_run)


def test_killed_two_worker_run_resumes_to_the_serial_results(tmp_path, tiny_grid_file, serial_run):
    """Two workers, killed (parent and workers) once the first record lands, then resumed: every cell
    exactly once, with the serial run's numbers. (One test for both, to keep worker start-ups few.)"""
    out = tmp_path / "out"
    args = ["run", "--grid", str(tiny_grid_file), "--out", str(out), "--no-progress", "--workers", "2",
            "--threads", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "leakbench.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    results = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and ResultsStore(results).records():
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and its workers, as a kill of the job would
    proc.wait()
    partial = ResultsStore(results).records()
    assert 1 <= len(partial) < len(_expected_keys()), "the kill should land mid-grid"

    assert main(args) == 0
    keys = [r["key"] for r in ResultsStore(results).records()]
    assert len(keys) == len(set(keys)), "no cell written twice"
    assert set(keys) == _expected_keys(), "no cell lost"
    assert _records(out) == _records(serial_run)
    # one accuracy run per defense setting, shared by both attacks whichever worker ran them
    assert len(list((out / "cache" / "accuracy").glob("*.json"))) == len(parse_grid(TINY).defenses)
    # the table keeps the grid's order although workers finish cells in any order
    assert (out / "table.md").read_text() == (serial_run / "table.md").read_text()


_COMPUTE_ONCE_CHILD = """
import json, os, sys, time
from pathlib import Path
from leakbench.storage import atomic_write_text, computed_once

cache, log, ready, children = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
(ready / str(os.getpid())).touch()

def compute():
    with open(log, "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    # hold the lock until every child has started, so that the others ask while this one computes
    deadline = time.time() + 60
    while len(list(ready.iterdir())) < children and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    return {"computed_by": os.getpid()}

value = computed_once(cache, compute, read=lambda p: json.loads(p.read_text()),
                      write=lambda p, v: atomic_write_text(p, json.dumps(v)))
print(value["computed_by"])
"""


def test_shared_work_is_computed_once_across_processes(tmp_path):
    cache, log, ready = tmp_path / "cache" / "entry.json", tmp_path / "computations.log", tmp_path / "ready"
    ready.mkdir()
    children = [subprocess.Popen([sys.executable, "-c", _COMPUTE_ONCE_CHILD, str(cache), str(log), str(ready), "2"],
                                 stdout=subprocess.PIPE, text=True) for _ in range(2)]
    answers = {child.communicate(timeout=120)[0].strip() for child in children}
    assert all(child.returncode == 0 for child in children)
    computations = log.read_text().split()
    assert len(computations) == 1, "one process computes, the other waits and reads"
    assert answers == set(computations)


def test_oracles_are_cached_on_disk(tmp_path, monkeypatch):
    """A second runner (a fresh worker, or a resumed run) reads the oracle instead of training it."""
    from leakbench.cells import class_representatives

    grid = parse_grid({
        "datasets": [{"name": "digits", "params": {"image_size": 16, "scale": "[-1,1]"}}],
        "models": [{"name": "hitaj-mnist-cnn", "params": {"extra_class": True}}],
        "attacks": [{"name": "gan-passive", "params": {"target_class": 3}}],
        "defenses": ["none"],
        "protocol": {"participant_labels": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]},
    })
    cell = grid.cells()[0]
    options = RunOptions(out_dir=tmp_path, progress=False)
    pool, trained = class_representatives.participants_pool_and_oracle(Runner(grid, options).context, cell)

    @functools.wraps(class_representatives.train_oracle)  # the same signature: its defaults are part of the cache key
    def no_training(*args, **kwargs):
        raise AssertionError("the oracle was trained again")

    monkeypatch.setattr(class_representatives, "train_oracle", no_training)
    pool_again, loaded = class_representatives.participants_pool_and_oracle(Runner(grid, options).context, cell)
    assert torch.equal(pool_again.labels, pool.labels)
    probe = pool.images[:32]
    assert torch.equal(loaded.probabilities(probe), trained.probabilities(probe))
    assert loaded.train_samples == trained.train_samples


def test_pretrained_weights_are_trained_once_per_setting(tmp_path, monkeypatch):
    """Threat model 'trained': the weights after train_steps do not depend on the attack, so two attacks
    on a setting share one training run per target, and a fresh runner (another worker, a resumed
    run) reads them instead of training again, with the same records."""
    from leakbench import training

    grid = {**TINY, "name": "tiny-trained", "defenses": ["none"], "targets": 2,
            "threat": {"model_state": "trained", "train_steps": 3}}
    cache = tmp_path / "cache"
    Runner(parse_grid(grid), RunOptions(out_dir=tmp_path / "first", cache_dir=cache, progress=False)).run()
    assert len(list((cache / "pretrained").glob("*.pt"))) == 2  # 2 targets, not 2 targets x 2 attacks

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(training, "train_with_defense", no_training)
    Runner(parse_grid(grid), RunOptions(out_dir=tmp_path / "again", cache_dir=cache, progress=False)).run()
    assert _records(tmp_path / "again") == _records(tmp_path / "first")
    untrained = {**grid, "threat": {"model_state": "random-init"}}
    Runner(parse_grid(untrained), RunOptions(out_dir=tmp_path / "init", cache_dir=cache, progress=False)).run()
    first, init = _records(tmp_path / "first"), _records(tmp_path / "init")
    assert {r["metrics"]["mse_median"] for r in first.values()} != {r["metrics"]["mse_median"] for r in init.values()}


@pytest.mark.parametrize("args, named", [
    (["--workers", "0"], "--workers 0"),
    (["--executor", "foo"], "local, ray"),
    (["--ray-address", "localhost:6379"], "--executor ray"),
    (["--threads", "0", "--workers", "2"], "--threads 0"),
])
def test_bad_parallel_options_are_one_line_errors(tmp_path, tiny_grid_file, capsys, args, named):
    out = tmp_path / "out"
    assert main(["run", "--grid", str(tiny_grid_file), "--out", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err
    assert not out.exists(), "nothing written"


def test_an_unreachable_ray_address_is_a_one_line_error_before_ray_retries(tmp_path, tiny_grid_file, capsys):
    """ray.init retries an address nobody listens on for minutes; leakbench checks it first."""
    import socket

    pytest.importorskip("ray")
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "out"
    assert main(["run", "--grid", str(tiny_grid_file), "--out", str(out), "--no-progress", "--executor", "ray",
                 "--ray-address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"127.0.0.1:{port}" in err and "nothing accepts connections" in err
    assert not out.exists(), "nothing written"


def test_ray_missing_says_what_to_install(tmp_path, tiny_grid_file, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "ray" else real_find_spec(name, *rest))
    out = tmp_path / "out"
    assert main(["run", "--grid", str(tiny_grid_file), "--out", str(out), "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "leakbench[ray]" in err
    assert not out.exists()


def test_computed_once_without_waiting_skips_an_entry_another_process_computes(tmp_path):
    """``wait=False`` (how a program's cells fill their accuracy entries first) returns None at once
    while the entry's lock is held elsewhere, without computing, and computes once the lock is free."""
    import json

    from filelock import FileLock

    from leakbench.storage import atomic_write_text, computed_once

    path, calls = tmp_path / "entry.json", []

    def ask(wait):
        return computed_once(path, lambda: calls.append(1) or {"v": 1}, read=lambda p: json.loads(p.read_text()),
                             write=lambda p, v: atomic_write_text(p, json.dumps(v)), wait=wait)

    holder = FileLock(path.with_name(f".{path.name}.lock"))  # another open file: flock conflicts with it
    with holder:
        assert ask(wait=False) is None and not calls
    assert ask(wait=False) == {"v": 1} and len(calls) == 1
    assert ask(wait=True) == {"v": 1} and len(calls) == 1, "read from the cache, not computed again"


def _processes_with(marker: str) -> list[str]:
    """Live processes whose environment holds ``marker`` (a run's processes inherit it)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ")[:80]
                found.append(f"{proc.name}: {command!r}")
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_killed_run_leaves_no_process_behind(tmp_path, tiny_grid_file, executor):
    """SIGKILL to the parent alone (no chance to clean up): its pool workers (or the local Ray instance
    it started: GCS, raylet, Ray's workers), and what they started, are gone within seconds."""
    if executor == "ray":
        pytest.importorskip("ray")
    marker = f"LEAKBENCH_ORPHAN_TEST={os.getpid()}-{time.time_ns()}"
    out = tmp_path / "out"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    proc = subprocess.Popen([sys.executable, "-m", "leakbench.cli", "run", "--grid", str(tiny_grid_file), "--out",
                             str(out), "--no-progress", "--workers", "2", "--threads", "1", "--executor", executor],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and len(_processes_with(marker)) < 3:  # the parent and two workers
        time.sleep(0.05)
    assert len(_processes_with(marker)) >= 3, "the workers should have started"
    if executor == "ray":
        time.sleep(3)  # let Ray start the task workers too
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _processes_with(marker):
        time.sleep(0.1)
    assert _processes_with(marker) == []


def test_workers_follow_the_jobs_not_the_cells(tmp_path, monkeypatch):
    """Eighteen defense settings of one attack batch into one engine program: one job, so the run takes
    one worker (the calling process, every core) although it has eighteen cells."""
    from leakbench.run import executors
    from leakbench.run.executors import default_workers

    assert default_workers(1, 2) == 1 and default_workers(5, 2) == 2 and default_workers(0, 4) == 1
    sweep = {"name": "gaussian-noise", "sweep": {"variance": [10.0 ** -k for k in range(1, 18)]}}
    grid = {**TINY, "attacks": [{"name": "dlg", "params": {"steps": 2}}], "defenses": ["none", sweep]}
    assert len(parse_grid(grid).cells()) == 18
    chosen = []
    real = executors.make_executor

    def spy(name="local", workers=1, threads=None, ray_address=None):
        chosen.append(workers)
        return real(name, workers, threads, ray_address)

    monkeypatch.setattr("leakbench.run.execute.make_executor", spy)
    import yaml

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(grid))
    assert main(["run", "--grid", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert chosen[-1] == 1


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_a_finished_parallel_run_stops_its_watchdog_and_unmarks_the_environment(tmp_path, tiny_grid_file):
    """The watchdog (leakbench.run.reaper) lives only as long as the run: a run that ends normally
    leaves neither it nor its token in the caller's environment."""
    from leakbench.run.reaper import ENV_KEY

    assert main(["run", "--grid", str(tiny_grid_file), "--out", str(tmp_path / "out"), "--no-progress",
                 "--workers", "2", "--threads", "1"]) == 0
    assert ENV_KEY not in os.environ
    watchdogs = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"reaper.py") for part in command) and str(os.getpid()).encode() in command:
            watchdogs.append(proc.name)
    assert watchdogs == []
