"""The ``leakbench`` command line.

Exit codes: 0 done, 2 bad input (one line naming the key or value and what is allowed), 1 internal error.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import ConfigError

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors are bad input too: one line, exit 2
        raise ConfigError(message)


def _add_common_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", default="quick", help="a shipped grid (quick, full, ...) or a YAML path [quick]")
    p.add_argument("--data-dir", default=None,
                   help="local dataset mirror: DIR/<name>/<split>.parquet (default: $LEAKBENCH_DATA_DIR)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="leakbench", description="Gradient-leakage attacks against defenses: "
                     "accuracy-vs-defendability tables.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"leakbench {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    run = sub.add_parser("run", help="run a grid and print the accuracy-vs-defendability table")
    _add_common_run_args(run)
    run.add_argument("--out", default="leakbench-out", help="output folder (results.jsonl, tables, PNGs)")
    run.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    run.add_argument("--seed", type=int, default=None, help="run only this seed instead of the grid's seeds")
    run.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    val = sub.add_parser("validate", help="check a grid without running it")
    val.add_argument("grid", help="a shipped grid name or a YAML path")

    rep = sub.add_parser("report", help="re-render the tables and PNGs from DIR/results.jsonl")
    rep.add_argument("dir")
    rep.add_argument("--no-images", action="store_true")

    lst = sub.add_parser("list", help="show what is registered")
    lst.add_argument("kind", nargs="?", default="all",
                     choices=["all", "attacks", "defenses", "datasets", "models", "metrics", "grids"])
    lst.add_argument("pattern", nargs="?", default="*", help="wildcard, e.g. 'dlg*'")
    return parser


def _device(name: str) -> str:
    import torch

    if name == "cpu":
        return name
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name!r}: CUDA is not available on this machine; allowed: cpu")
        return name
    raise ConfigError(f"--device {name!r} is invalid; allowed: cpu, cuda, cuda:N")


def cmd_run(args) -> int:
    import torch

    from .grid import load_grid
    from .report import render
    from .runner import RunOptions, Runner

    grid = load_grid(args.grid)  # everything is validated before any file is written
    if args.seed is not None:
        if args.seed < 0:
            raise ConfigError(f"--seed {args.seed} is invalid; allowed: a non-negative integer")
        for g in grid.all_grids():
            g.seeds = [args.seed]
    device = _device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads} is invalid; allowed: an integer >= 1")
        torch.set_num_threads(args.threads)
    data_dir = args.data_dir or os.environ.get("LEAKBENCH_DATA_DIR")
    if data_dir and not Path(data_dir).is_dir():
        raise ConfigError(f"--data-dir {data_dir!r} is not a folder")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a folder")
    runner = Runner(grid, RunOptions(out_dir=out, data_dir=data_dir, device=device,
                                     progress=not args.no_progress))
    for g in grid.all_grids():  # a missing dataset is bad input: fail before the first cell runs
        for ds in g.datasets:
            runner.dataset(ds, g.split)
    runner.run()
    print(render(out))
    print(f"results: {out / 'results.jsonl'}; tables: {out / 'table.md'} .csv .tex; images: {out}/reconstructions_*.png")
    return EXIT_OK


def cmd_validate(args) -> int:
    from .grid import load_grid

    grid = load_grid(args.grid)
    cells = grid.cells()
    parts = [f"{g.name}: {len(g.attacks)} attacks x {len(g.defenses)} defense settings x {len(g.datasets)} "
             f"datasets x {len(g.models)} models x {len(g.seeds)} seeds" for g in grid.all_grids()]
    print(f"grid {grid.name!r} is valid: {len(cells)} cells ({'; '.join(parts)})")
    return EXIT_OK


def cmd_report(args) -> int:
    from .report import render

    path = Path(args.dir)
    if not (path / "results.jsonl").is_file():
        raise ConfigError(f"{str(path / 'results.jsonl')!r} does not exist; allowed: a folder written by `leakbench run`")
    print(render(path, images=not args.no_images))
    return EXIT_OK


def cmd_list(args) -> int:
    from .grid import builtin_grids
    from .registry import REGISTRIES, _ensure_builtins

    _ensure_builtins()
    kinds = list(REGISTRIES) + ["grids"] if args.kind == "all" else [args.kind]
    import fnmatch

    for kind in kinds:
        if kind == "grids":
            names = [n for n in builtin_grids() if fnmatch.fnmatchcase(n, args.pattern)]
            print("grids:")
            for n in names:
                print(f"  {n}")
            continue
        reg = REGISTRIES[kind]
        print(f"{kind}:")
        for name in reg.list(args.pattern):
            cls = reg.get(name)
            doc = (cls.__doc__ or "").strip().splitlines()
            params = ", ".join(f"{p.name}={p.default!r}" for p in getattr(cls, "params", ()))
            print(f"  {name:<18} {doc[0] if doc else ''}")
            if params:
                print(f"  {'':<18} params: {params}")
    return EXIT_OK


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "report": cmd_report, "list": cmd_list}


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


if __name__ == "__main__":
    sys.exit(main())
