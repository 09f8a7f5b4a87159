"""The leaderboard protocol: run one defense through a fixed, versioned grid and turn the records into a
board entry (``leaderboards/<protocol>/<name>.json``); re-run a sample of an entry's cells to verify it;
seed a board with the built-in defenses.

A protocol is a grid (``configs/leaderboard-v1.yaml``, ``configs/leaderboard-v1-smoke.yaml``: attacks and
their budgets, adaptive variants, dataset, model, seeds, targets, accuracy training) plus how entries are
judged (``configs/_leaderboard.yaml``: accuracy floor, verify tolerance). The submitted defense replaces
the grid's placeholder defense, in the grid and in its subgrids (model inversion and the GAN attack, which
need their own model and data); every number comes from ``Runner.run_cell``, the same scoring and verdict
rule as any grid, and the baseline accuracy from ``Runner.accuracy`` of ``none``. The entry's accuracy is
the first cell's, the main grid's.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import ConfigError
from .submission import DefenseSource, SandboxLimits, submitted_defense

SCHEMA_VERSION = 1
DEFAULT_ROOT = Path("leaderboards")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*\Z")
PROTOCOLS_FILE = "_leaderboard"


@dataclass(frozen=True)
class Protocol:
    name: str                      # v1, v1-smoke: the board folder
    version: str
    grid: str                      # the shipped grid that states the runs
    accuracy_floor_fraction: float
    tolerance: dict

    def grid_raw(self) -> dict:
        from .grid import read_grid_yaml

        return read_grid_yaml(self.grid)


def protocols() -> dict[str, Protocol]:
    from importlib import resources

    raw = yaml.safe_load(resources.files("leakbench.configs").joinpath(f"{PROTOCOLS_FILE}.yaml").read_text())
    return {name: Protocol(name=name, version=str(spec["version"]), grid=spec["grid"],
                           accuracy_floor_fraction=float(spec["accuracy_floor_fraction"]),
                           tolerance=dict(spec["verify"]["tolerance"]))
            for name, spec in raw.items()}


def load_protocol(name: str) -> Protocol:
    known = protocols()
    if name not in known:
        raise ConfigError(f"unknown protocol {name!r}; allowed: {', '.join(sorted(known))}")
    return known[name]


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or len(name) > 64:
        raise ConfigError(f"--name {name!r} is invalid; allowed: [a-z0-9][a-z0-9._-]*, at most 64 characters")
    return name


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# --- running the protocol --------------------------------------------------------------------------------

@dataclass
class Measured:
    """What one protocol run measured, before it becomes an entry."""

    records: list[dict]
    baseline_accuracy: float
    params: dict
    label: str
    privacy_claim: dict
    seeds: list[int]
    device: str
    wall_seconds: float


def run_protocol(source: DefenseSource, params: dict, *, name: str, protocol: Protocol,
                 data_dir: str | None = None, limits: SandboxLimits | None = None, device: str = "cpu",
                 overrides: dict | None = None, first_cell_only: bool = False,
                 progress: Callable[[str], None] | None = None) -> Measured:
    """Run ``protocol``'s cells against the defense. ``overrides`` deep-merge into the protocol's grid
    (tests use a tiny budget); ``first_cell_only`` runs the accuracy run and the first attack cell, in
    the same order as a full run, which is what ``verify`` samples."""
    from .grid import Cell, ComponentSpec, resolve_grid_path
    from .runner import RunOptions, Runner

    import torch

    # one intra-op thread: the protocol's models are tiny (it is also the fastest), and CPU results then
    # do not depend on the machine's core count, which verify relies on
    torch.set_num_threads(1)
    started = time.perf_counter()
    raw = _deep_merge(protocol.grid_raw(), overrides or {})
    with submitted_defense(source, params, name=name, limits=limits) as submitted, \
            tempfile.TemporaryDirectory(prefix="leakbench-board-") as tmp:
        defense = {"name": submitted.registry_name, "params": submitted.params}
        grid = protocol_grid(raw, defense, source=str(resolve_grid_path(protocol.grid)))
        runner = Runner(grid, RunOptions(out_dir=Path(tmp), data_dir=data_dir, device=device, progress=False))
        for g in grid.all_grids():  # a missing dataset is bad input: fail before the defense runs
            for ds in g.datasets:
                runner.dataset(ds, g.split)
        cells = grid.cells()[:1] if first_cell_only else grid.cells()
        records = []
        for cell in cells:
            record = runner.run_cell(cell)
            records.append(record)
            if progress:
                progress(progress_line(record))
        first = cells[0]
        baseline = runner.accuracy(Cell(first.attack, ComponentSpec("none", {}), first.dataset, first.model,
                                        first.seed, grid))
        details = records[0]["accuracy_details"]
        claim = submitted.privacy_claim(steps=int(details.get("train_steps") or 0),
                                        sample_rate=float(details.get("train_batch_size") or 1)
                                        / max(1, int(details.get("train_samples") or 1)))
        return Measured(records=records, baseline_accuracy=float(baseline["accuracy"]), params=submitted.params,
                        label=submitted.label, privacy_claim=claim, seeds=list(grid.seeds), device=device,
                        wall_seconds=time.perf_counter() - started)


def protocol_grid(raw: dict, defense: dict, *, source: str):
    """The protocol's grid with ``defense`` in place of the placeholder, in the grid and in every subgrid
    (model inversion and the GAN attack need their own model and dataset, so they are subgrids: each
    cell keeps its own grid's settings). ``raw["subgrids"]`` lists grid names or paths relative to
    ``source``, or inline grid mappings (tests' tiny budgets)."""
    from .grid import _relative, parse_grid, read_grid_yaml, resolve_grid_path

    raw = dict(raw)
    subgrids = raw.pop("subgrids", None) or []
    if not isinstance(subgrids, list):
        raise ConfigError(f"grid {source}: subgrids must be a list of grid names or mappings")
    grid = parse_grid({**raw, "defenses": [defense]}, source=source)
    for sub in subgrids:
        if isinstance(sub, dict):
            grid.subgrids.append(protocol_grid(sub, defense, source=source))
        elif isinstance(sub, str):
            path = resolve_grid_path(_relative(source, sub))
            grid.subgrids.append(protocol_grid(read_grid_yaml(path), defense, source=str(path)))
        else:
            raise ConfigError(f"grid {source}: subgrids entry {sub!r} is invalid; allowed: a grid name or mapping")
    return grid


def progress_line(record: dict) -> str:
    """One line per attack cell while a submission runs."""
    m = record["metrics"]
    if sample_scored(record):
        scores = f"oracle {m['oracle_accuracy']:.0%}  NN-SSIM {m['nn_ssim_mean']:.2f}"
    else:
        scores = f"PSNR {m['psnr_median']:.1f} dB"
    return (f"  {record['attack']:<15} leak {m['leak_rate']:.0%}  {scores}  accuracy {record['accuracy']:.1%}  "
            f"({record['wall_seconds']:.1f} s)")


def _finite(value: Any, digits: int) -> float | None:
    return round(float(value), digits) if value is not None and math.isfinite(float(value)) else None


def sample_scored(record: dict) -> bool:
    """Whether the cell scores generated samples (GAN attacks, model inversion: oracle and nearest
    neighbours) rather than reconstructions of private targets (PSNR, SSIM)."""
    return record["threat"]["setting"] in ("collaborative", "model")


def attack_scores(record: dict) -> dict:
    from .registry import ATTACKS

    m = record["metrics"]
    variant = "adaptive" if getattr(ATTACKS.get(record["attack"]), "adaptive", False) else "fixed"
    if sample_scored(record):
        # protocol_accuracy: the attacked model's accuracy (model inversion) or the collaborative
        # protocol's final accuracy (GAN), not the entry's accuracy column
        return {"leak_rate": round(float(m["leak_rate"]), 6), "oracle_accuracy": _finite(m.get("oracle_accuracy"), 4),
                "nn_ssim_mean": _finite(m.get("nn_ssim_mean"), 4), "targets": int(record["targets"]),
                "protocol_accuracy": _finite(m.get("protocol_accuracy"), 4), "variant": variant}
    return {"leak_rate": round(float(m["leak_rate"]), 6), "psnr_median": _finite(m.get("psnr_median"), 3),
            "ssim_median": _finite(m.get("ssim_median"), 4), "targets": int(record["targets"]), "variant": variant}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _hardware(device: str) -> str:
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    text = f"{platform.system()} {cpu}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(torch.device(device))}"
    return text


def build_entry(measured: Measured, *, protocol: Protocol, name: str, authors: str, link: str | None,
                source: DefenseSource, reported: dict | None = None) -> dict:
    from . import __version__
    from .runner import library_versions

    records = measured.records
    attacks = {r["attack"]: attack_scores(r) for r in records}
    if len(attacks) != len(records):  # an entry holds one score per attack: a repeat would hide one
        repeated = sorted({r["attack"] for r in records if sum(o["attack"] == r["attack"] for o in records) > 1})
        raise ConfigError(f"protocol {protocol.name} runs {', '.join(repeated)} in more than one cell; "
                          f"allowed: each attack once (an entry holds one score per attack)")
    worst = max(attacks, key=lambda a: (attacks[a]["leak_rate"], -list(attacks).index(a)))
    value = round(float(records[0]["accuracy"]), 4)
    baseline = round(measured.baseline_accuracy, 4)
    floor = round(protocol.accuracy_floor_fraction * baseline, 4)
    privacy = records[0].get("privacy") or {}
    reported = dict(reported or {})
    if measured.privacy_claim:
        reported.setdefault("privacy_claimed", measured.privacy_claim)  # a claim, not measured by leakbench
    return {
        "schema_version": SCHEMA_VERSION,
        "protocol": protocol.name,
        "name": name,
        "authors": authors,
        "link": link,
        "defense": {"source": source.as_entry(), "params": measured.params},
        "accuracy": {"value": value, "baseline": baseline, "drop": round(baseline - value, 4)},
        "privacy": ({"epsilon": float(privacy["epsilon"]), "delta": privacy.get("delta")}
                    if "epsilon" in privacy and math.isfinite(float(privacy["epsilon"])) else {}),
        "attacks": attacks,
        "worst_case": {"leak_rate": attacks[worst]["leak_rate"], "attack": worst},
        "flags": {"below_accuracy_floor": value < floor, "accuracy_floor": floor},
        "reported": reported,
        "provenance": {"leakbench_version": __version__, "commit": _git_commit(), "protocol": protocol.name,
                       "seeds": measured.seeds, "libraries": library_versions(), "hardware": _hardware(measured.device),
                       "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "wall_seconds": round(measured.wall_seconds, 1)},
    }


def entry_path(root: Path, protocol: str, name: str) -> Path:
    return Path(root) / protocol / f"{name}.json"


def validate_and_write(entry: dict, path: Path) -> None:
    """Check the entry with the board's validator, then write it whole (or not at all)."""
    from .results import atomic_write_text

    text = json.dumps(entry, indent=2, allow_nan=False) + "\n"
    try:
        from .board import validate_entry
    except ImportError:  # the board module is optional for writing; its validator runs when present
        validate_entry = None
    if validate_entry is not None:
        validate_entry(json.loads(text), source=str(path), folder_protocol=path.parent.name, file_stem=path.stem)
    atomic_write_text(path, text)


def submit(spec: str, *, name: str, authors: str = "anonymous", link: str | None = None,
           params: dict | None = None, protocol: str = "v1-smoke", reported: dict | None = None,
           root: Path = DEFAULT_ROOT, replace: bool = False, limits: SandboxLimits | None = None,
           data_dir: str | None = None, device: str = "cpu", overrides: dict | None = None,
           progress: Callable[[str], None] | None = None) -> tuple[Path, dict]:
    """Validate, run the protocol, write the entry. Raises ConfigError (nothing written) on any failure."""
    check_name(name)
    if link is not None and not re.match(r"https?://[^\s\"'<>]+\Z", link):
        raise ConfigError(f"--link {link!r} is invalid; allowed: an http(s) URL")
    chosen = load_protocol(protocol)
    source = DefenseSource.parse(spec)
    path = entry_path(root, chosen.name, name)
    if path.exists() and not replace:
        raise ConfigError(f"{path} already exists; choose another --name or pass --replace")
    measured = run_protocol(source, dict(params or {}), name=name, protocol=chosen, data_dir=data_dir, limits=limits,
                            device=device, overrides=overrides, progress=progress)
    entry = build_entry(measured, protocol=chosen, name=name, authors=authors, link=link, source=source,
                        reported=reported)
    if path.exists() and not replace:  # someone else took the name while this ran
        raise ConfigError(f"{path} already exists; choose another --name or pass --replace")
    validate_and_write(entry, path)
    return path, entry


# --- verify ----------------------------------------------------------------------------------------------

def compare(entry: dict, measured: Measured, tolerance: dict) -> list[str]:
    """The differences beyond ``tolerance`` between an entry and a re-run of its sampled cells."""
    problems = []
    acc_tol = float(tolerance.get("accuracy", 0.0))
    for key, now in (("value", measured.records[0]["accuracy"]), ("baseline", measured.baseline_accuracy)):
        was = entry["accuracy"][key]
        if abs(float(now) - float(was)) > acc_tol + 1e-9:
            problems.append(f"accuracy.{key} {float(now):.4f} vs entry {float(was):.4f} (tolerance {acc_tol:g})")
    for record in measured.records:
        attack = record["attack"]
        was = entry["attacks"].get(attack)
        if was is None:
            problems.append(f"attack {attack} missing from the entry")
            continue
        now = attack_scores(record)
        samples = max(1, len(record["per_sample"]["ssim"]))
        leak_tol = float(tolerance.get("leak_rate_samples", 0)) / samples
        if abs(now["leak_rate"] - was["leak_rate"]) > leak_tol + 1e-9:
            problems.append(f"{attack} leak rate {now['leak_rate']:.3f} vs entry {was['leak_rate']:.3f} "
                            f"(tolerance {leak_tol:g})")
        for key in ("psnr_median", "ssim_median"):
            a, b = now.get(key), was.get(key)
            if (a is None) != (b is None) or (a is not None and abs(a - b) > float(tolerance.get(key, 0.0)) + 1e-9):
                problems.append(f"{attack} {key} {a} vs entry {b} (tolerance {tolerance.get(key, 0.0):g})")
    return problems


def verify_entries(paths: list[Path], *, root: Path, protocol: str, data_dir: str | None,
                   limits: SandboxLimits | None = None, overrides: dict | None = None) -> int:
    """Re-run a sample of each entry's cells (the accuracy run, the baseline and the first attack) and
    compare with the protocol's tolerance. Prints one line per entry; 0 when all agree, else 1."""
    paths = [Path(p) for p in paths] or sorted((Path(root) / protocol).glob("*.json"))
    if not paths:
        raise ConfigError(f"no entries under {Path(root) / protocol}")
    failed = 0
    for path in paths:
        entry = _read_entry(path)
        chosen = load_protocol(entry["protocol"])
        started = time.perf_counter()
        try:
            measured = run_protocol(DefenseSource.parse(entry["defense"]["source"]), entry["defense"]["params"],
                                    name=entry["name"], protocol=chosen, data_dir=data_dir, limits=limits,
                                    overrides=overrides, first_cell_only=True)
        except ConfigError as exc:
            print(f"FAIL {path}: could not re-run: {exc}")
            failed += 1
            continue
        problems = compare(entry, measured, chosen.tolerance)
        cells = ", ".join(["accuracy", "baseline"] + [r["attack"] for r in measured.records])
        took = time.perf_counter() - started
        if problems:
            failed += 1
            print(f"FAIL {path}: {'; '.join(problems)}")
        else:
            print(f"ok   {path}: {cells} agree within protocol {chosen.name}'s tolerance ({took:.0f} s)")
    return 0 if failed == 0 else 1


def _read_entry(path: Path) -> dict:
    try:
        from .board import load_entry
    except ImportError:
        load_entry = None
    if load_entry is not None:
        return load_entry(path).data
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read entry ({exc})") from None


# --- seeding the board with the built-ins -------------------------------------------------------------

# The papers' settings: DLG Table 3 (noise variances, fp16/bf16/int8, pruning ratios), DLG section 5.3
# (large batches), and DP-SGD as the quick grid runs it.
SEED_SETTINGS: list[tuple[str, str, dict]] = [
    ("none", "none", {}),
    *[(f"gaussian-noise-{v:.0e}".replace("e-0", "e-"), "gaussian-noise", {"variance": v})
      for v in (1e-4, 1e-3, 1e-2, 1e-1)],
    *[(f"laplacian-noise-{v:.0e}".replace("e-0", "e-"), "laplacian-noise", {"variance": v})
      for v in (1e-3, 1e-1)],
    *[(f"pruning-{r}", "pruning", {"ratio": r}) for r in (0.2, 0.5, 0.7, 0.9)],
    *[(f"quantization-{f}", "quantization", {"format": f}) for f in ("fp16", "bf16", "int8")],
    ("large-batch-4", "large-batch", {"batch_size": 4}),
    ("dp-sgd-z1-c1", "dp-sgd", {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "rounds": 30}),
]


def seed(*, protocol: str, root: Path, replace: bool = False, only: list[str] | None = None,
         data_dir: str | None = None, device: str = "cpu") -> int:
    for name, builtin, params in SEED_SETTINGS:
        if only and name not in only:
            continue
        path = entry_path(root, protocol, name)
        if path.exists() and not replace:
            print(f"skip {path} (exists)", flush=True)
            continue
        started = time.perf_counter()
        print(f"{name}: builtin:{builtin} {params}", flush=True)
        submit(f"builtin:{builtin}", name=name, authors="leakbench (built-in, the papers' settings)",
               params=params, protocol=protocol, root=root, replace=replace, data_dir=data_dir, device=device,
               reported={"note": "seeded by python -m leakbench.board_protocol seed"},
               progress=lambda line: print(line, flush=True))
        print(f"wrote {path} in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m leakbench.board_protocol",
                                 description="Seed a leaderboard with the built-in defenses.")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("seed")
    s.add_argument("--protocol", default="v1-smoke")
    s.add_argument("--root", default=str(DEFAULT_ROOT))
    s.add_argument("--replace", action="store_true")
    s.add_argument("--only", nargs="*", help="seed only these entry names")
    s.add_argument("--data-dir", default=None)
    s.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    try:
        return seed(protocol=args.protocol, root=Path(args.root), replace=args.replace, only=args.only,
                    data_dir=args.data_dir, device=args.device)
    except ConfigError as exc:
        print(f"leakbench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
