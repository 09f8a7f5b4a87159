"""``leakbench leaderboard verify``: re-run a sample of an entry's cells and compare with what it
records, within its protocol's tolerance."""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import ConfigError
from .build import attack_scores
from .protocol import Measured, load_protocol, run_protocol
from .sandbox import DefenseSource, SandboxLimits
from ..threat import attack_key
from .schema import load_entry


def close(key: str, now: float, was: float, tolerance: dict) -> bool:
    """Whether a re-run's score agrees with the entry's. PSNRs are capped at the protocol's ceiling first:
    a near-perfect reconstruction's MSE (1e-8 to 1e-10) is floating-point rounding that differs between
    machines, so its 80-100 dB PSNR is not reproducible, while "above the ceiling" is."""
    if key == "psnr_median" and "psnr_ceiling" in tolerance:
        ceiling = float(tolerance["psnr_ceiling"])
        now, was = min(now, ceiling), min(was, ceiling)
    return abs(now - was) <= float(tolerance.get(key, 0.0)) + 1e-9


def compare(entry: dict, measured: Measured, tolerance: dict) -> list[str]:
    """The differences beyond ``tolerance`` between an entry and a re-run of its sampled cells."""
    problems = []
    acc_tol = float(tolerance.get("accuracy", 0.0))
    for key, now in (("value", measured.records[0]["accuracy"]), ("baseline", measured.baseline_accuracy)):
        was = entry["accuracy"][key]
        if abs(float(now) - float(was)) > acc_tol + 1e-9:
            problems.append(f"accuracy.{key} {float(now):.4f} vs entry {float(was):.4f} (tolerance {acc_tol:g})")
    for record in measured.records:
        attack = attack_key(record)
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
            if (a is None) != (b is None) or (a is not None and not close(key, a, b, tolerance)):
                problems.append(f"{attack} {key} {a} vs entry {b} (tolerance {tolerance.get(key, 0.0):g}"
                                + (f", PSNR capped at {tolerance['psnr_ceiling']:g} dB" if key == "psnr_median"
                                   and "psnr_ceiling" in tolerance else "") + ")")
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
        entry = load_entry(path).data
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
        cells = ", ".join(["accuracy", "baseline"] + [attack_key(r) for r in measured.records])
        took = time.perf_counter() - started
        if problems:
            failed += 1
            print(f"FAIL {path}: {'; '.join(problems)}")
        else:
            print(f"ok   {path}: {cells} agree within protocol {chosen.name}'s tolerance ({took:.0f} s)")
    return 0 if failed == 0 else 1
