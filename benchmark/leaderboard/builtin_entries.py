"""The built-in defenses as board entries, at the papers' settings: ``python -m
leakbench.leaderboard.builtin_entries seed --protocol v3-smoke`` (re-)writes them."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..errors import ConfigError
from .build import entry_path
from .schema import DEFAULT_ROOT
from .submit import submit

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
    # secure aggregation of 4 clients (issue #18), from protocol v3 on
    ("secure-aggregation-4", "secure-aggregation", {"clients": 4}),
]


def seed_board(*, protocol: str, root: Path, replace: bool = False, only: list[str] | None = None,
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
               reported={"note": "seeded by python -m leakbench.leaderboard.builtin_entries seed"},
               progress=lambda line: print(line, flush=True))
        print(f"wrote {path} in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m leakbench.leaderboard.builtin_entries",
                                 description="Seed a leaderboard with the built-in defenses.")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("seed")
    s.add_argument("--protocol", default="v3-smoke")
    s.add_argument("--root", default=str(DEFAULT_ROOT))
    s.add_argument("--replace", action="store_true")
    s.add_argument("--only", nargs="*", help="seed only these entry names")
    s.add_argument("--data-dir", default=None)
    s.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:
        return seed_board(protocol=args.protocol, root=Path(args.root), replace=args.replace, only=args.only,
                    data_dir=args.data_dir, device=args.device)
    except ConfigError as exc:
        print(f"leakbench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
