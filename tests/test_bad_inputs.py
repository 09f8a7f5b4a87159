"""A battery of hostile-but-honest inputs, as a new user would type them: each is refused with one line on
stderr that names the bad key or value, exit 2, no traceback, and nothing written. Grows with every fix."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leakbench.cli import main

LAUGHS = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9 if p else ['lol'] * 9)}]\n"
                 for c, p in zip("abcdefghi", ["", *"abcdefgh"]))


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} \
        if folder.exists() else {}


def write(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def mirror(folder: Path, kind: str) -> Path:
    """A data mirror for `mnist` whose parquet files are broken in one way."""
    root = folder / f"mirror-{kind}"
    (root / "mnist").mkdir(parents=True)
    for split in ("train", "test"):
        path = root / "mnist" / f"{split}.parquet"
        if kind == "not-parquet":
            path.write_text("label,image\n1,2\n")
        elif kind == "no-columns":
            pq.write_table(pa.table({"pixels": [b"x"], "target": [1]}), path)
        else:  # bytes that are not an image
            pq.write_table(pa.table({"image": [{"bytes": b"\x89PNG not really", "path": None}], "label": [3]}), path)
    return root


# (id, grid text or None for the quick grid, extra CLI words, the part of the message that names the problem)
GRID_CASES = [
    ("targets-over-split", "include: quick\ntargets: 400\n", [],
     r"targets = 400 is too many .* allowed: targets <= 360"),
    ("targets-huge", "include: quick\ntargets: 1000000000000\n", [], r"targets = 1000000000000 is too many"),
    ("targets-zero", "include: quick\ntargets: 0\n", [], r"targets = 0 is invalid; allowed: an integer >= 1"),
    ("defense-twice", "include: quick\ndefenses: [{name: none}, {name: none}]\n", [], r"comes twice"),
    ("sweep-repeats", "include: quick\ndefenses: [{name: pruning, sweep: {ratio: [0.5, 0.50]}}]\n", [],
     r"comes twice"),
    ("attack-twice", "include: quick\nattacks: [dlg, dlg]\n", [], r"comes twice"),
    ("include-number", "include: 5\n", [], r"include = 5 is invalid"),
    ("include-missing", "include: [nothere.yaml]\n", [], r"grid file 'nothere.yaml' does not exist"),
    ("aliases-in-targets", LAUGHS + "include: quick\ntargets: *i\n", [], r"YAML aliases expand to .* allowed: at most"),
    ("aliases-in-description", LAUGHS + "include: quick\ndescription: *i\n", [], r"YAML aliases expand to"),
    ("binary-file", b"\x00\x01\x02\xff\xfe grid", [], r"not a text file"),
    ("not-utf8", b"name: caf\xe9\n", [], r"not a text file"),
    ("top-level-list", "- dlg\n- none\n", [], r"the top level must be a mapping"),
    ("unknown-key", "include: quick\ntargetz: 2\n", [], r"unknown key 'targetz'. Did you mean 'targets'\?"),
    # offline LiRA's reference models need training records the attacked model did not use
    ("lira-without-population", "include: quick\nattacks: [membership-lira]\nsubgrids: []\n", [],
     r"accuracy.train_size = None leaves no population for the reference models of membership-lira on digits.*"
     r"allowed: a train_size of at most a third"),
]


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", GRID_CASES, ids=[c[0] for c in GRID_CASES])
def test_a_bad_grid_is_one_line_and_writes_nothing(case, command, tmp_path, capsys, monkeypatch):
    name, text, extra, message = case
    monkeypatch.chdir(tmp_path)
    grid = write(tmp_path, "grid.yaml", text)
    before = tree(tmp_path)
    words = ["validate", str(grid)] if command == "validate" else ["run", "--grid", str(grid), "--out",
                                                                   str(tmp_path / "out"), "--no-progress"]
    assert main(words + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("leakbench: error: ") and "Traceback" not in err, err
    assert re.search(message, err), err
    assert tree(tmp_path) == before, "something was written"


ENV_CASES = [
    ("out-in-proc", ["run", "--out", "/proc/leakbench-nope"], r"--out '/proc/leakbench-nope': cannot write there"),
    ("out-is-a-file", ["run", "--out", "{tmp}/file.txt"], r"exists and is not a folder"),
    ("ray-address-garbage", ["run", "--executor", "ray", "--ray-address", "garbage:::"],
     r"--ray-address 'garbage:::' is invalid"),
    ("ray-address-port", ["run", "--executor", "ray", "--ray-address", "host:99999"],
     r"--ray-address 'host:99999' is invalid"),
    ("ray-address-with-local", ["run", "--ray-address", "h:1"], r"needs --executor ray"),
    ("data-dir-missing", ["run", "--data-dir", "{tmp}/nowhere"], r"--data-dir '.*nowhere' is not a folder"),
    ("workers-zero", ["run", "--workers", "0"], r"--workers 0 is invalid"),
    ("device-bogus", ["run", "--device", "tpu"], r"--device 'tpu' is invalid"),
    ("report-no-results", ["report", "{tmp}"], r"results.jsonl' does not exist"),
    ("submit-root-unwritable", ["submit", "builtin:none", "--name", "x", "--smoke", "--root", "/proc/leakbench-nope"],
     r"--root '/proc/leakbench-nope/v3-smoke': cannot write there"),
    ("submit-bad-name", ["submit", "builtin:none", "--name", "Bad Name", "--smoke", "--root", "{tmp}/board"],
     r"--name 'Bad Name' is invalid"),
    ("submit-missing-file", ["submit", "{tmp}/nofile.py:X", "--name", "x", "--smoke", "--root", "{tmp}/board"],
     r"does not exist"),
    ("submit-params-aliases", ["submit", "builtin:none", "--name", "x", "--smoke", "--root", "{tmp}/board",
                               "--params", "x=" + LAUGHS + "z: *i"], r"YAML aliases expand to"),
]


@pytest.mark.parametrize("case", ENV_CASES, ids=[c[0] for c in ENV_CASES])
def test_a_bad_environment_is_one_line_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    name, words, message = case
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "file.txt", "not a folder")
    words = [w.replace("{tmp}", str(tmp_path)) for w in words]
    if words[0] == "run" and "--out" not in words:
        words += ["--out", str(tmp_path / "out")]
    before = tree(tmp_path)
    assert main(words + (["--no-progress"] if words[0] == "run" else [])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("leakbench: error: ") and "Traceback" not in err, err
    assert re.search(message, err), err
    assert tree(tmp_path) == before, "something was written"


@pytest.mark.parametrize("kind, message", [
    ("not-parquet", r"test.parquet: not a parquet file"),
    ("no-columns", r"test.parquet: columns found: pixels, target; expected 'image' and 'label' \(dataset 'mnist'\)"),
    ("not-an-image", r"test.parquet: the 'image' and 'label' columns do not hold images .*\(row 0\)"),
])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_damaged_data_mirror_is_named_before_anything_runs(kind, message, command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = mirror(tmp_path, kind)
    grid = write(tmp_path, "grid.yaml", "include: quick\ndatasets: [mnist]\nsubgrids: []\n")
    before = tree(tmp_path)
    words = ["validate", str(grid)] if command == "validate" else ["run", "--grid", str(grid), "--out",
                                                                   str(tmp_path / "out"), "--no-progress"]
    assert main(words + ["--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert tree(tmp_path) == before, "something was written (a cache entry or a lock file)"


TINY = {"name": "tiny", "datasets": [{"name": "digits", "params": {"image_size": 8}}], "models": ["lenet-zhu"],
        "attacks": [{"name": "idlg", "params": {"steps": 3}}], "defenses": ["none", "quantization"], "targets": 2,
        "accuracy": {"epochs": 1}}


def test_a_folder_holds_one_grid(tmp_path, capsys):
    first = write(tmp_path, "first.yaml", json.dumps(TINY))
    other = write(tmp_path, "other.yaml", json.dumps({**TINY, "name": "other"}))
    bigger = write(tmp_path, "bigger.yaml", json.dumps({**TINY, "defenses": ["none", "quantization", "pruning"]}))
    out = tmp_path / "out"
    assert main(["run", "--grid", str(first), "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    capsys.readouterr()
    before = tree(out)
    assert main(["run", "--grid", str(other), "--out", str(out), "--no-progress", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds the results of grid 'tiny' (2 cells)" in err and "--force" in err
    assert tree(out) == before
    # the same grid resumes, and a grid that extends it runs only its new cell
    assert main(["run", "--grid", str(bigger), "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 3
    # --force starts the folder afresh with the other grid (its shared cache stays)
    assert main(["run", "--grid", str(other), "--out", str(out), "--no-progress", "--workers", "1", "--force"]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["grid"] for r in records} == {"other"} and len(records) == 2
    assert (out / "cache").is_dir()


def test_report_and_resume_keep_every_valid_record(tmp_path, capsys):
    grid = write(tmp_path, "grid.yaml", json.dumps(TINY))
    out = tmp_path / "out"
    assert main(["run", "--grid", str(grid), "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    damaged = [lines[0], '{"key": "torn in the midd\n', '{"key": "x", "from": "another schema"}\n', "[1, 2]\n",
               *lines[1:]]
    (out / "results.jsonl").write_text("".join(damaged))
    capsys.readouterr()
    assert main(["report", str(out), "--no-images"]) == 0
    captured = capsys.readouterr()
    assert f"{out / 'results.jsonl'}:2: skipped, not JSON" in captured.err
    assert f"{out / 'results.jsonl'}:3: skipped, a record of another schema (it has no 'attack')" in captured.err
    assert f"{out / 'results.jsonl'}:4: skipped, a JSON list, not a record" in captured.err
    # both records, the one after the bad lines too
    assert "quantization(format=fp16)" in captured.out and "| none" in captured.out
    # resuming runs nothing again and drops nothing
    assert main(["run", "--grid", str(grid), "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    assert (out / "results.jsonl").read_text() == "".join(damaged)


def test_no_traceback_reaches_a_user_from_a_subprocess(tmp_path):
    """The real command line, as a shell runs it: exit 2 and one line."""
    import subprocess
    import sys

    grid = write(tmp_path, "g.yaml", b"\xff\x00")
    proc = subprocess.run([sys.executable, "-m", "leakbench.cli", "validate", str(grid)],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not a text file" in proc.stderr


def test_a_closed_pipe_is_no_traceback(tmp_path):
    """`leakbench list | head -1`: the reader leaves early; leakbench stops quietly."""
    import subprocess
    import sys

    proc = subprocess.run(f"{sys.executable} -m leakbench.cli list | head -1", shell=True, capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.stdout.strip() and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
