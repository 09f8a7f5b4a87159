"""``leakbench paper run | report``: run experiments through the grid runner, each into its own folder
(``OUT/<experiment>/``: the run's results, tables and figures, then ``paper.md``/``.csv``/``.tex``), and
re-render from those results."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..run.execute import ExecuteOptions, execute
from ..run.report import readable_records, render
from ..run.results import ResultsStore
from ..storage import atomic_write_text
from .experiment import SCALES, experiment_names, load_experiment
from .measure import calibrate, measure_experiment
from .render import write_tables

EXPERIMENT_FILE = "experiment.json"  # in each output folder: which experiment at which scale


def resolve_names(names: list[str]) -> list[str]:
    """``all`` or experiment names (checked, so a typo fails before anything runs)."""
    chosen = experiment_names() if names == ["all"] else names
    for name in chosen:
        load_experiment(name)
    return chosen


def run_experiments(names: list[str], *, scale: str, options: ExecuteOptions) -> list[Path]:
    if scale not in SCALES:
        raise ConfigError(f"--scale {scale!r} is invalid; allowed: {', '.join(SCALES)}")
    chosen = resolve_names(names)
    experiments = [load_experiment(n) for n in chosen]
    # how `report` finds each experiment again: its shipped name, or its file's absolute path
    specs = [n if n in experiment_names() else str(Path(n).resolve()) for n in chosen]
    grids = [e.grid(scale) for e in experiments]  # every grid validated before the first one runs
    written = []
    for experiment, grid, spec in zip(experiments, grids, specs):
        folder = Path(options.out) / experiment.name
        execute(grid, ExecuteOptions(**{**vars(options), "out": folder}))
        atomic_write_text(folder / EXPERIMENT_FILE, json.dumps({"experiment": experiment.name, "scale": scale,
                                                                 "spec": spec}, indent=2) + "\n")
        report_folder(folder)
        written.append(folder)
    return written


def report_folder(folder: Path) -> str:
    """Re-render one experiment's folder: the run's own tables and figures, then the paper table."""
    meta_path = folder / EXPERIMENT_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        raise ConfigError(f"{meta_path} is missing or unreadable; allowed: a folder written by "
                          f"`leakbench paper run`") from None
    experiment = load_experiment(meta.get("spec", meta["experiment"]))
    render(folder)
    records = readable_records(ResultsStore(folder / "results.jsonl"))
    rows, trends = measure_experiment(experiment, records)
    return write_tables(folder, experiment, meta["scale"], rows, trends, calibrate(experiment, records))


def report(path: Path) -> list[str]:
    """``paper report DIR``: DIR is one experiment's folder, or a folder of them."""
    path = Path(path)
    folders = [path] if (path / EXPERIMENT_FILE).is_file() else sorted(
        p for p in path.glob("*") if (p / EXPERIMENT_FILE).is_file()) if path.is_dir() else []
    if not folders:
        raise ConfigError(f"{str(path)!r} holds no paper experiment; allowed: a folder written by "
                          f"`leakbench paper run --out DIR` (DIR or DIR/<experiment>)")
    return [report_folder(f) for f in folders]


def listing() -> str:
    """``paper list``: each experiment with its paper, source and settings per scale."""
    lines = []
    for name in experiment_names():
        e = load_experiment(name)
        lines += [f"{name}: {e.title}", f"  paper: {e.paper}", f"  source: {e.source}"]
        for scale, spec in e.scales.items():
            grid = e.grid(scale)
            what = (f"{len(grid.cells())} cells: {', '.join(a.name for a in grid.attacks)} on "
                    f"{', '.join(d.name for d in grid.datasets)} with {', '.join(m.name for m in grid.models)}, "
                    f"{grid.targets} targets")
            lines.append(f"  --scale {scale}: grid {spec['grid'] if isinstance(spec['grid'], str) else '(inline)'}; {what}")
            lines += [f"      - {r}" for r in e.reductions(scale)]
        lines.append(f"  rows: {len(e.comparisons)} ({', '.join(dict.fromkeys(c.quantity for c in e.comparisons))})")
    return "\n".join(lines)
