"""Kinds of cell as plugins: every registered kind states what the rest of leakbench reads of it, and a
new kind (the README's worked example) plugs into grids, the runner, the results store and the report
without touching any of them."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from leakbench.cells.base import CellKind, TableColumn, kind_of_attack
from leakbench.errors import ConfigError
from leakbench.registry import ATTACKS, CELL_KINDS
from leakbench.run.grid import load_grid, parse_grid
from leakbench.run.report import render
from leakbench.run.runner import RunOptions, Runner, program_key
from leakbench.seeding import config_hash

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_cells():
    return load_grid("quick").cells()


@pytest.mark.parametrize("name", CELL_KINDS.list())
def test_every_kind_states_what_tables_boards_and_schedules_read(name, quick_cells):
    kind = CELL_KINDS.get(name)()
    assert isinstance(kind, CellKind)
    assert isinstance(kind.threat_model, str) and kind.threat_model
    assert all(isinstance(c, TableColumn) and c.style in ("percent", "decibel", "number") for c in kind.columns)
    assert len({c.label for c in kind.columns}) == len(kind.columns)
    assert all(isinstance(m, str) and isinstance(d, int) for m, d in kind.board_scores)
    runs = [a for a in ATTACKS.list() if ATTACKS.get(a).setting == name]
    assert runs, f"no registered attack runs in the {name!r} setting"
    cells = [c for c in quick_cells if c.attack.name in runs]
    for cell in cells[:4]:  # identity is JSON and is the cell's key; programs are the kind's decision
        identity = kind.identity(cell, cell.grid)
        assert json.loads(json.dumps(identity, default=str)) and config_hash(identity) == cell.key()
        assert cell.kind.registry_name == name and program_key(cell) == kind.program_key(cell)


def test_an_attack_whose_setting_no_kind_runs_is_refused_before_anything_runs():
    from leakbench import Attack, register_attack

    @register_attack("orphan-setting")
    class Orphan(Attack):
        """An attack of a setting nobody registered."""
        setting = "nowhere"

    try:
        with pytest.raises(ConfigError, match=r"attack 'orphan-setting' runs in the 'nowhere' setting, which no "
                                              r"kind of cell runs; allowed here: .*dlg"):
            parse_grid({"datasets": ["digits"], "models": ["lenet-zhu"], "attacks": ["orphan-setting"],
                        "defenses": ["none"]})
        assert kind_of_attack("dlg").registry_name == "gradient"
    finally:
        ATTACKS.remove("orphan-setting")


def readme_cell_kind_example() -> str:
    text = (REPO / "README.md").read_text()
    block = text.split("# label_cells.py", 1)[1].split("```", 1)[0]
    return "# label_cells.py" + block


def test_the_readme_worked_example_of_a_new_kind_runs_through_grid_runner_and_report(tmp_path):
    namespace: dict = {}
    exec(compile(readme_cell_kind_example(), "README-label_cells", "exec"), namespace)
    try:
        assert "labels" in CELL_KINDS and ATTACKS.get("label-from-bias").setting == "labels"
        grid = parse_grid({
            "name": "labels-example", "datasets": [{"name": "digits", "params": {"image_size": 8}}],
            "models": ["lenet-zhu"], "attacks": ["label-from-bias", {"name": "idlg", "params": {"steps": 5}}],
            "defenses": ["none", {"name": "gaussian-noise", "params": {"variance": 1.0}}],
            "targets": 4, "accuracy": {"epochs": 1},
        })
        runner = Runner(grid, RunOptions(out_dir=tmp_path, progress=False))
        records = runner.run()
        assert len(records) == 4 and {r["threat"]["setting"] for r in records} == {"labels", "gradient"}
        labels = {r["defense"]: r for r in records if r["attack"] == "label-from-bias"}
        # the bias gradient gives every label away undefended, and noise of variance 1 hides it
        assert labels["none"]["metrics"]["leak_rate"] == 1.0
        assert labels["gaussian-noise"]["metrics"]["leak_rate"] < 1.0
        assert {r["key"] for r in records} == {c.key() for c in grid.cells()}
        table = render(tmp_path, images=False)
        header = next(line for line in table.splitlines() if line.startswith("| defense"))
        assert re.search(r"label-from-bias leak .*label-from-bias label acc .*label-from-bias defends", header)
        assert "idlg PSNR" in header
        none_row = next(line for line in table.splitlines() if line.startswith("| none"))
        assert "100.0%" in none_row
        assert runner.run() == []  # resumable like any cell: nothing is pending the second time
    finally:
        ATTACKS.remove("label-from-bias")
        CELL_KINDS.remove("labels")
