"""The ``leakbench`` command line.

Exit codes: 0 done, 2 bad input (one line naming the key or value and what is allowed), 1 internal error.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

from .catalog import load_all
from .data import MIRROR_LAYOUTS, resolve_data_dir
from .errors import ConfigError
from .leaderboard.publish import render_boards
from .leaderboard.sandbox import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S, SandboxLimits
from .leaderboard.submit import submit
from .leaderboard.verify import verify_entries
from .paper.experiment import is_experiment_file, load_experiment
from .paper.session import listing, run_experiments
from .paper.session import report as paper_report
from .registry import LISTED
from .run.execute import ExecuteOptions, execute
from .run.grid import builtin_grids, load_grid
from .run.report import render
from .run.runner import Runner, RunOptions
from .version import __version__
from .yaml_config import safe_load_bounded

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2
DATA_DIR_HELP = (f"local dataset mirror: {MIRROR_LAYOUTS}; splits it lacks come from the hub, checked before "
                 f"any cell runs (default: $LEAKBENCH_DATA_DIR)").replace("%", "%%")
DEFAULT_BOARD_PROTOCOL = "v3-smoke"
SMOKE_PROTOCOL = "v3-smoke"  # --smoke: the current CPU-sized protocol


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors are bad input too: one line, exit 2
        raise ConfigError(message)


def _add_common_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", default="quick", help="a shipped grid (quick, full, ...) or a YAML path [quick]")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)


def _add_execution_args(p: argparse.ArgumentParser, *, force: str) -> None:
    """How a grid runs (``run`` and ``paper run``): device, threads, workers, executor."""
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads per worker (default: torch's when serial, else cores / workers)")
    p.add_argument("--workers", type=int, default=None,
                   help="cells run in parallel (default: one worker per core, at most one per job; "
                        "1 runs them serially in this process)")
    p.add_argument("--executor", default="local", help="local (a process pool on this machine) or ray [local]")
    p.add_argument("--ray-address", default=None,
                   help="a running Ray cluster, e.g. HOST:6379 (default: start a local Ray instance)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help=force)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="leakbench", description="Gradient-leakage attacks against defenses: "
                     "accuracy-vs-defendability tables.")
    parser.add_argument("--version", action="version", version=f"leakbench {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    run = sub.add_parser("run", help="run a grid and print the accuracy-vs-defendability table")
    _add_common_run_args(run)
    run.add_argument("--out", default="leakbench-out", help="output folder (results.jsonl, tables, PNGs)")
    run.add_argument("--seed", type=int, default=None, help="run only this seed instead of the grid's seeds")
    _add_execution_args(run, force="--out holds another grid's results: remove them (the cache stays) and start afresh")

    paper = sub.add_parser("paper", help="regenerate the papers' tables and figures, the paper's numbers beside ours",
                           usage="leakbench paper list | run NAME... [--scale cpu|paper] [--out DIR] | report DIR")
    paper.add_argument("words", nargs="+", metavar="list | run NAME... | report DIR",
                       help="list: every experiment with its source and settings per scale; run NAME... (or "
                            "all): run them through the grid runner and write DIR/<name>/paper.md .csv .tex; "
                            "report DIR: re-render from DIR's results")
    paper.add_argument("--scale", default="cpu", help="cpu (reduced, 2 cores; its reductions are stated) or "
                                                       "paper (the paper's setting, for a GPU) [cpu]")
    paper.add_argument("--out", default="leakbench-paper", help="output folder, one subfolder per experiment")
    paper.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    _add_execution_args(paper, force="an experiment's folder holds another grid's results: start it afresh")

    val = sub.add_parser("validate", help="check a grid without running it")
    val.add_argument("grid", help="a shipped grid name or a YAML path")
    val.add_argument("--no-data", action="store_true",
                     help="check the grid file only, not its data (sizes against the targets need the data)")
    val.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)

    rep = sub.add_parser("report", help="re-render the tables and PNGs from DIR/results.jsonl")
    rep.add_argument("dir")
    rep.add_argument("--no-images", action="store_true")

    lst = sub.add_parser("list", help="show what is registered")
    lst.add_argument("kind", nargs="?", default="all",
                     choices=["all", *LISTED, "grids"])
    lst.add_argument("pattern", nargs="?", default="*", help="wildcard, e.g. 'dlg*'")

    board = sub.add_parser("leaderboard", help="render the leaderboards (Markdown and HTML), or verify entries",
                           usage="leakbench leaderboard [render|verify] [ENTRY ...] [--protocol P] [--root DIR]")
    board.add_argument("words", nargs="*", metavar="[render|verify] [ENTRY ...]",
                       help="render (default): validate every entry under --root and write README.md and "
                            "<protocol>/index.html there; verify [ENTRY ...]: re-run a sample of each entry's "
                            "cells (default: every entry of --protocol) and compare")
    board.add_argument("--protocol", default=None,
                       help=f"render: also render this protocol's board when it has no entries yet; "
                            f"verify: the entries' protocol [{DEFAULT_BOARD_PROTOCOL}]")
    board.add_argument("--root", default="leaderboards", help="the leaderboards folder [leaderboards]")
    board.add_argument("--data-dir", default=None,
                       help="verify: local dataset mirror (default: $LEAKBENCH_DATA_DIR)")
    board.add_argument("--trust-code", action="store_true",
                       help="verify: run submitted code without the bubblewrap sandbox (only code you trust)")

    smt = sub.add_parser("submit", help="run the leaderboard protocol on a defense and write its board entry",
                         usage="leakbench submit SPEC --name NAME [--params k=v ...] [--smoke] [options]")
    smt.add_argument("spec", metavar="SPEC",
                     help="path/to/file.py:ClassName, entry-point:NAME (group leakbench.defenses) or builtin:NAME")
    smt.add_argument("--name", required=True, help="the entry's name on the board: [a-z0-9][a-z0-9._-]*")
    smt.add_argument("--authors", default="anonymous")
    smt.add_argument("--link", default=None, help="http(s) URL of a paper or repository")
    smt.add_argument("--params", nargs="*", default=[], metavar="K=V", help="the defense's parameters (YAML values)")
    smt.add_argument("--protocol", default=None,
                     help=f"leaderboard protocol: v3 (GPU) or v3-smoke (CPU) [{DEFAULT_BOARD_PROTOCOL}]")
    smt.add_argument("--smoke", action="store_true", help=f"the CPU-sized protocol (= --protocol {SMOKE_PROTOCOL})")
    smt.add_argument("--reported", nargs="*", default=[], metavar="K=V",
                     help="what the submitter claims (recorded under `reported`, never ranked)")
    smt.add_argument("--reported-file", default=None, help="a JSON object of claims, merged under `reported`")
    smt.add_argument("--root", default="leaderboards", help="the leaderboards folder [leaderboards]")
    smt.add_argument("--replace", action="store_true", help="overwrite an entry of the same name")
    smt.add_argument("--timeout", type=float, default=None,
                     help="wall-clock limit of the whole submission in seconds [3600]")
    smt.add_argument("--memory-mb", type=int, default=None,
                     help="address-space limit of the sandboxed defense in MiB [4096]")
    smt.add_argument("--data-dir", default=None, help="local dataset mirror (default: $LEAKBENCH_DATA_DIR)")
    smt.add_argument("--device", default="cpu", help="where leakbench trains and attacks: cpu or cuda[:N]")
    smt.add_argument("--trust-code", action="store_true",
                     help="run the submitted code without the bubblewrap sandbox (no network or filesystem "
                          "confinement): only for code you trust, where bubblewrap is missing")
    return parser


def _data_dir(option: str | None) -> str | None:
    """``--data-dir``, else ``$LEAKBENCH_DATA_DIR`` (``data.resolve_data_dir``): a folder, or a one-line error."""
    path = resolve_data_dir(option)
    if path is not None and not path.is_dir():
        raise ConfigError(f"--data-dir {str(path)!r} is not a folder")
    return str(path) if path is not None else None


def _device(name: str) -> str:
    if name == "cpu":
        return name
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name!r}: CUDA is not available on this machine; allowed: cpu")
        return name
    raise ConfigError(f"--device {name!r} is invalid; allowed: cpu, cuda, cuda:N")


def _execute_options(args) -> ExecuteOptions:
    """The options shared by ``run`` and ``paper run`` (see ``_add_execution_args``), checked, with
    ``--threads`` applied to this process too (a serial run computes here)."""
    device = _device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads} is invalid; allowed: an integer >= 1")
        torch.set_num_threads(args.threads)
    return ExecuteOptions(out=Path(args.out), data_dir=_data_dir(args.data_dir), device=device,
                          workers=args.workers, threads=args.threads, executor=args.executor,
                          ray_address=args.ray_address, force=args.force, progress=not args.no_progress)


def cmd_run(args) -> int:
    grid = load_grid(args.grid)  # everything is validated before any file is written
    if args.seed is not None:
        if args.seed < 0:
            raise ConfigError(f"--seed {args.seed} is invalid; allowed: a non-negative integer")
        for g in grid.all_grids():
            g.seeds = [args.seed]
    execute(grid, _execute_options(args))
    out = Path(args.out)
    print(render(out))
    print(f"results: {out / 'results.jsonl'}; tables: {out / 'table.md'} .csv .tex; images: {out}/reconstructions_*.png")
    return EXIT_OK


def cmd_validate(args) -> int:
    if is_experiment_file(args.grid):  # a paper experiment: the file, then its grid at every scale
        experiment = load_experiment(args.grid)
        for scale in experiment.scales:
            grid = experiment.grid(scale)
            if not args.no_data:
                Runner(grid, RunOptions(out_dir=Path("."), data_dir=_data_dir(args.data_dir),
                                        disk_cache=False)).preflight()
        print(f"experiment {experiment.name!r} is valid: {len(experiment.comparisons)} rows; scales "
              f"{', '.join(experiment.scales)}")
        return EXIT_OK
    grid = load_grid(args.grid)
    cells = grid.cells()
    parts = [f"{g.name}: {len(g.attacks)} attacks x {len(g.defenses)} defense settings x {len(g.datasets)} "
             f"datasets x {len(g.models)} models x {len(g.seeds)} seeds" for g in grid.all_grids()]
    # the data too (sizes against the targets), decoded in memory only: validate writes nothing
    runner = Runner(grid, RunOptions(out_dir=Path("."), data_dir=_data_dir(args.data_dir), disk_cache=False))
    if not args.no_data:
        runner.preflight()
    checked = "the file only" if args.no_data else "its data included"
    print(f"grid {grid.name!r} is valid ({checked}): {len(cells)} cells ({'; '.join(parts)})")
    jobs = runner.jobs(cells)
    programs = [j for j in jobs if len(j.cells) > 1]
    print(f"{len(jobs)} jobs: {len(programs)} engine programs of several cells "
          f"({sum(len(j.cells) for j in programs)} cells, batch_cells), {len(jobs) - len(programs)} cells on their own")
    return EXIT_OK


def cmd_report(args) -> int:
    path = Path(args.dir)
    if not (path / "results.jsonl").is_file():
        raise ConfigError(f"{str(path / 'results.jsonl')!r} does not exist; allowed: a folder written by `leakbench run`")
    print(render(path, images=not args.no_images))
    return EXIT_OK


def cmd_paper(args) -> int:
    action, names = args.words[0], args.words[1:]
    if action == "list" and not names:
        print(listing())
        return EXIT_OK
    if action == "report" and len(names) == 1:
        print("\n\n".join(paper_report(Path(names[0]))))
        return EXIT_OK
    if action == "run" and names:
        folders = run_experiments(names, scale=args.scale, options=_execute_options(args))
        for folder in folders:
            print((folder / "paper.md").read_text())
        print("paper tables: " + ", ".join(f"{f}/paper.md .csv .tex" for f in folders))
        return EXIT_OK
    raise ConfigError(f"paper {' '.join(args.words)!r} is invalid; allowed: list, run NAME... (or all), report DIR")


def cmd_list(args) -> int:
    load_all()
    kinds = list(LISTED) + ["grids"] if args.kind == "all" else [args.kind]
    for kind in kinds:
        if kind == "grids":
            names = [n for n in builtin_grids() if fnmatch.fnmatchcase(n, args.pattern)]
            print("grids:")
            for n in names:
                print(f"  {n}")
            continue
        reg = LISTED[kind]
        print(f"{kind}:")
        names = reg.list(args.pattern)
        width = max([18, *(len(n) for n in names)])  # one column for every name, however long
        for name in names:
            cls = reg.get(name)
            doc = (cls.__doc__ or "").strip().splitlines()
            params = ", ".join(f"{p.name}={p.default!r}" for p in getattr(cls, "params", ()))
            print(f"  {name:<{width}} {doc[0] if doc else ''}")
            if params:
                print(f"  {'':<{width}} params: {params}")
    return EXIT_OK


def cmd_leaderboard(args) -> int:
    action, entries = "render", list(args.words)
    if entries and entries[0] in ("render", "verify"):
        action = entries.pop(0)
    root = Path(args.root)
    if action == "verify":
        # with no ENTRY it verifies the whole board
        return verify_entries([Path(e) for e in entries], root=root, protocol=args.protocol or DEFAULT_BOARD_PROTOCOL,
                              data_dir=_data_dir(args.data_dir),
                              **({"limits": SandboxLimits(trust_code=True)} if args.trust_code else {}))
    if entries:
        raise ConfigError(f"leaderboard render takes no ENTRY ({entries[0]!r}); it renders every entry under "
                          f"--root; allowed: render, verify ENTRY ...")
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--root {str(root)!r} is not a folder")
    written = render_boards(root, protocols=[args.protocol] if args.protocol else None)
    print("; ".join(f"{kind}: {path}" for kind, path in written.items()))
    return EXIT_OK


def _key_values(pairs: list[str], option: str) -> dict:
    """``k=v`` pairs with YAML values (1e-3, true, [1, 2]); a one-line ConfigError for anything else."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} {pair!r} is invalid; allowed: KEY=VALUE")
        try:
            out[key.strip()] = safe_load_bounded(value, where=f"{option} {key.strip()}")
        except yaml.YAMLError:
            raise ConfigError(f"{option} {pair!r}: the value is not valid YAML") from None
    return out


def cmd_submit(args) -> int:
    if args.smoke and args.protocol not in (None, SMOKE_PROTOCOL):
        raise ConfigError(f"--smoke conflicts with --protocol {args.protocol}; allowed: one of them")
    protocol = SMOKE_PROTOCOL if args.smoke else (args.protocol or DEFAULT_BOARD_PROTOCOL)
    reported = {}
    if args.reported_file:
        try:
            reported = json.loads(Path(args.reported_file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--reported-file {args.reported_file!r}: {str(exc).splitlines()[0]}") from None
        if not isinstance(reported, dict):
            raise ConfigError(f"--reported-file {args.reported_file!r} is invalid; allowed: a JSON object")
    reported.update(_key_values(args.reported, "--reported"))
    limits = SandboxLimits(timeout_s=args.timeout if args.timeout is not None else DEFAULT_TIMEOUT_S,
                           memory_mb=args.memory_mb if args.memory_mb is not None else DEFAULT_MEMORY_MB,
                           trust_code=args.trust_code)
    data_dir = _data_dir(args.data_dir)
    torch.set_num_threads(1)  # the protocol's models are tiny: one thread is fastest and reproducible
    started = time.perf_counter()
    path, entry = submit(args.spec, name=args.name, authors=args.authors, link=args.link,
                         params=_key_values(args.params, "--params"), protocol=protocol, reported=reported,
                         root=Path(args.root), replace=args.replace, limits=limits, data_dir=data_dir,
                         device=_device(args.device), progress=lambda line: print(line, file=sys.stderr))
    worst = entry["worst_case"]
    print(f"wrote {path}: accuracy {entry['accuracy']['value']:.1%} (baseline {entry['accuracy']['baseline']:.1%}), "
          f"worst-case leak {worst['leak_rate']:.0%} ({worst['attack']}), {time.perf_counter() - started:.0f} s")
    return EXIT_OK


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "report": cmd_report, "list": cmd_list,
            "leaderboard": cmd_leaderboard, "submit": cmd_submit, "paper": cmd_paper}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return EXIT_BAD_INPUT
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"leakbench: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("leakbench: interrupted; finished cells are kept, run again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`leakbench list | head`): not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush fails quietly too
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
