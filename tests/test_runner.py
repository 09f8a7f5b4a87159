"""End-to-end runs of a tiny grid: records, tables, images, resume after a kill, torn lines."""
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from leakbench.cli import main
from leakbench.run.results import ResultsStore

TINY = {
    "name": "tiny",
    "datasets": [{"name": "digits", "params": {"image_size": 8}}],
    "models": ["lenet-zhu"],
    "attacks": [{"name": "idlg", "params": {"steps": 8}}, {"name": "dlg", "params": {"steps": 8}}],
    "defenses": ["none", {"name": "gaussian-noise", "sweep": {"variance": [1e-1]}},
                 {"name": "large-batch", "params": {"batch_size": 2}}],
    "targets": 2,
    "accuracy": {"epochs": 1, "train_size": 128, "test_size": 100},
}


@pytest.fixture
def tiny_grid(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _comparable(record):
    drop = {"wall_seconds", "finished_at", "accuracy_details"}
    return {k: v for k, v in record.items() if k not in drop}


def test_run_writes_records_tables_and_images(tmp_path, tiny_grid, capsys):
    out = tmp_path / "out"
    assert main(["run", "--grid", str(tiny_grid), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    records = ResultsStore(out / "results.jsonl").records()
    assert len(records) == 2 * 3
    assert len({r["key"] for r in records}) == 6
    for r in records:
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["threat"]["batch_size"] == (2 if r["defense"] == "large-batch" else 1)
        assert r["threat"]["labels_known"] is False and r["threat"]["model_state"] == "random-init"
        assert len(r["per_sample"]["ssim"]) == r["threat"]["batch_size"] * 2
        assert r["per_target"]["closure_evals"] and all(e > 0 for e in r["per_target"]["closure_evals"])
        assert set(r["versions"]) >= {"leakbench", "torch", "python"}
        assert (out / "reconstructions" / f"{r['key']}.npz").exists()
    # accuracy is computed once per defense setting and shared by the attacks
    by_defense = {}
    for r in records:
        by_defense.setdefault(r["defense_label"], set()).add(r["accuracy"])
    assert all(len(v) == 1 for v in by_defense.values())
    for name in ("table.md", "table.csv", "table.tex", "reconstructions_idlg_digits_lenet-zhu.png",
                 "reconstructions_dlg_digits_lenet-zhu.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "table.md").read_text()
    assert "gaussian-noise(variance=0.1)" in table and "idlg leak" in table and table.split("\n")[0] in printed
    # report re-renders the same table from results.jsonl alone
    (out / "table.md").unlink()
    assert main(["report", str(out), "--no-images"]) == 0
    assert (out / "table.md").read_text() == table


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path, tiny_grid):
    reference = tmp_path / "ref"
    assert main(["run", "--grid", str(tiny_grid), "--out", str(reference), "--no-progress"]) == 0
    expected = {r["key"]: _comparable(r) for r in ResultsStore(reference / "results.jsonl").records()}

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "leakbench.cli", "run", "--grid", str(tiny_grid), "--out", str(out), "--no-progress",
           "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    results = out / "results.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and len(ResultsStore(results).records()) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = ResultsStore(results).records()
    assert 2 <= len(partial) < len(expected), "the kill should land mid-grid"
    with open(results, "ab") as fh:  # a torn line, as a kill during a write would leave
        fh.write(b'{"key": "torn", "metrics": {')

    assert subprocess.run(cmd, capture_output=True).returncode == 0
    records = ResultsStore(results).records()
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == len(expected), "no loss, no duplicates"
    assert results.read_bytes().endswith(b"\n") and b"torn" not in results.read_bytes()
    for r in records:
        assert _comparable(r) == expected[r["key"]], "a resumed run gives the same numbers"


def test_rerunning_a_finished_grid_runs_nothing(tmp_path, tiny_grid):
    out = tmp_path / "out"
    assert main(["run", "--grid", str(tiny_grid), "--out", str(out), "--no-progress"]) == 0
    before = (out / "results.jsonl").read_bytes()
    assert main(["run", "--grid", str(tiny_grid), "--out", str(out), "--no-progress"]) == 0
    assert (out / "results.jsonl").read_bytes() == before


def test_models_with_an_extra_output_run_through_a_grid(tmp_path):
    """The Hitaj models carry an artificial class (classes + 1 outputs): labels are sized to the model."""
    from leakbench.run.grid import parse_grid
    from leakbench.run.runner import Runner, RunOptions

    grid = parse_grid({
        "datasets": [{"name": "digits", "params": {"image_size": 28}}],
        "models": [{"name": "hitaj-mnist-cnn", "params": {"extra_class": True}}],
        "attacks": [{"name": "dlg", "params": {"steps": 3}}],
        "defenses": ["none"], "targets": 1,
        "accuracy": {"epochs": 1, "train_size": 64, "test_size": 64, "optimizer": "sgd", "lr": 0.05},
    })
    record = Runner(grid, RunOptions(out_dir=tmp_path, progress=False)).run()[0]
    assert 0.0 <= record["accuracy"] <= 1.0
    assert record["per_sample"]["label_correct"] in ([0.0], [1.0])
    assert record["per_target"]["closure_evals"][0] > 0


def test_collaborative_attack_cells_run_through_a_grid(tmp_path):
    """A GAN attack in a grid: the protocol runs with the adversary in it, the samples are scored by the
    held-out oracle and nearest neighbours, and the row joins the same table as the gradient attacks."""
    from leakbench.run.grid import parse_grid
    from leakbench.run.report import render
    from leakbench.run.runner import Runner, RunOptions

    grid = parse_grid({
        "datasets": [{"name": "digits", "params": {"image_size": 32, "scale": "[-1,1]"},
                      "protocol": {"samples_per_participant": 100}}],
        "models": [{"name": "hitaj-mnist-cnn", "params": {"extra_class": True}}],
        "attacks": [{"name": "gan-active", "params": {"target_class": 3, "generator_width": 8, "samples": 16,
                                                      "generator_batch": 16}},
                    {"name": "idlg", "params": {"steps": 2}}],
        "defenses": ["none"], "targets": 1,
        "protocol": {"participant_labels": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], "lr": 0.05, "max_rounds": 2,
                     "local_batches": 2, "evaluate_local": False},
        "accuracy": {"epochs": 1, "train_size": 128, "test_size": 100, "optimizer": "sgd", "lr": 0.05},
    })
    runner = Runner(grid, RunOptions(out_dir=tmp_path, progress=False))
    records = {r["attack"]: r for r in runner.run()}
    gan = records["gan-active"]
    assert gan["threat"]["setting"] == "collaborative" and gan["threat"]["target_class"] == 3
    assert gan["threat"]["participant_labels"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert [t["round"] for t in gan["trace"]] == [1, 2]
    assert all(0.0 <= t["oracle_accuracy"] <= 1.0 and "global_accuracy" in t for t in gan["trace"])
    m = gan["metrics"]
    assert 0.0 <= m["leak_rate"] <= m["oracle_accuracy"] + 1e-9 <= 1.0 + 1e-9
    assert gan["targets"] == 16 and (tmp_path / "reconstructions" / f"{gan['key']}.npz").exists()
    table = render(tmp_path, images=True)
    assert "gan-active oracle" in table and "idlg PSNR" in table
    assert (tmp_path / "reconstructions_gan-active_digits_hitaj-mnist-cnn.png").exists()
    assert runner.run() == [], "finished collaborative cells are not run again"


# one attack against four defense settings (one with another victim batch size), two targets each: with
# batch_cells (the default) the eight targets are one engine call, without it each cell is its own
PROGRAM = {
    "name": "program",
    "datasets": [{"name": "digits", "params": {"image_size": 8}}],
    "models": ["lenet-zhu"],
    "attacks": [{"name": "dlg", "params": {"steps": 2}}],
    "defenses": ["none", {"name": "gaussian-noise", "params": {"variance": 1e-2}},
                 {"name": "pruning", "params": {"ratio": 0.7}}, {"name": "large-batch", "params": {"batch_size": 2}}],
    "targets": 2,
    "accuracy": {"epochs": 1, "train_size": 96, "test_size": 64},
}


def _run_counting_engine_calls(tmp_path, monkeypatch, grid: dict, name: str):
    from leakbench.attacks.dlg import DLG
    from leakbench.run.grid import parse_grid
    from leakbench.run.runner import Runner, RunOptions

    calls, real = [], DLG.run
    monkeypatch.setattr(DLG, "run", lambda self, tasks, **kw: calls.append(len(tasks)) or real(self, tasks, **kw))
    out = tmp_path / name
    records = Runner(parse_grid(grid), RunOptions(out_dir=out, progress=False)).run()
    return {r["defense_label"]: r for r in records}, calls, out


def test_cells_that_differ_only_in_defense_run_as_one_program(tmp_path, monkeypatch):
    """The batched program solves each cell's own problems: after two L-BFGS steps (too few for float32
    rounding to grow) every cell's gradient distances are those of the cell run on its own, although
    the cells' distances differ by orders of magnitude, so a mix-up of cells would show."""
    batched, calls, _ = _run_counting_engine_calls(tmp_path, monkeypatch, PROGRAM, "batched")
    assert calls == [8], "the four cells' targets in one engine call"
    assert all(r["program_cells"] == 4 for r in batched.values())
    alone, calls, _ = _run_counting_engine_calls(tmp_path, monkeypatch, {**PROGRAM, "batch_cells": False}, "alone")
    assert calls == [2, 2, 2, 2] and all(r["program_cells"] == 1 for r in alone.values())
    assert set(batched) == set(alone)
    for label, record in batched.items():
        assert record["per_target"]["grad_distance"] == pytest.approx(alone[label]["per_target"]["grad_distance"],
                                                                      rel=0.05), label
    distances = sorted(r["per_target"]["grad_distance"][0] for r in batched.values())
    assert distances[-1] > 100 * distances[0]
    # a cell's key says whether it ran batched: resuming never mixes the two kinds of record
    assert not {r["key"] for r in batched.values()} & {r["key"] for r in alone.values()}


def test_resuming_a_partly_written_program_gives_the_uninterrupted_numbers(tmp_path, monkeypatch):
    """A kill between two records of one program leaves part of it written: the resumed run computes
    the whole program again and writes only the missing cells, with the numbers they had."""
    full, _, out = _run_counting_engine_calls(tmp_path, monkeypatch, PROGRAM, "full")
    results = out / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    results.write_text("".join(lines[:2]))  # as if killed after two of the four appends
    import json

    kept = {json.loads(line)["defense_label"] for line in lines[:2]}
    resumed, calls, _ = _run_counting_engine_calls(tmp_path, monkeypatch, PROGRAM, "full")
    assert calls == [8] and set(resumed) == set(full) - kept
    for label, record in resumed.items():
        assert _comparable(record) == _comparable(full[label]), label
    assert len(ResultsStore(results).records()) == 4


def test_batch_cells_must_be_a_boolean(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**PROGRAM, "batch_cells": "yes"}))
    assert main(["run", "--grid", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "batch_cells" in err and "true, false" in err
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_large_groups_are_cut_into_programs_fixed_by_the_grid(tmp_path, monkeypatch):
    """Programs hold at most MAX_PROGRAM_TARGETS targets, cut in grid order whatever is pending, and a
    pending cell's job is its whole program."""
    from leakbench.run import runner as runner_module
    from leakbench.run.grid import parse_grid
    from leakbench.run.runner import Runner, RunOptions

    monkeypatch.setattr(runner_module, "MAX_PROGRAM_TARGETS", 4)  # two cells of 2 targets per program
    grid = parse_grid({**PROGRAM, "attacks": [*PROGRAM["attacks"], {"name": "gan-passive"}]})
    runner = Runner(grid, RunOptions(out_dir=tmp_path))
    cells = grid.cells()
    dlg = [c.key() for c in cells if c.attack.name == "dlg"]
    jobs = runner.jobs(cells)
    assert [j.cells for j in jobs if len(j.cells) > 1] == [tuple(dlg[:2]), tuple(dlg[2:])]
    assert sum(len(j.cells) == 1 for j in jobs) == 4, "the collaborative cells run on their own"
    later = runner.jobs([c for c in cells if c.key() == dlg[3]])
    assert later == [runner_module.Job(tuple(dlg[2:]), (dlg[3],))]
