"""DLG at its defaults on a setting nothing was tuned on: CIFAR-100 (100 classes, 32x32x3) with
lenet-zhu (sigmoid, U(-0.5, 0.5) weights, one network for every target as in the DLG reference
script), 300 L-BFGS steps of up to 20 evaluations. In one run: the one-at-a-time reference loop, the
engine without stopping rules (every step, compiled and native: the reference's attack on many targets)
and the engine as a plain ``dlg`` runs it (its defaults: ``compile``/``native`` at auto, the relative
stop and the stall rule) on a 128-target stream. The relative stop (5e-8 of the shared update's squared
norm) was translated from the absolute 5e-5 calibrated on CIFAR-10 test targets 500-563 (median
||grad||^2 there 772); CIFAR-100 targets 100-227 (the train split: this copy has no test split) were never
used to tune anything. Success = every pixel's MSE < 1e-3 after clamping to [0, 1]. Each row also gives
the fraction of this machine's matmul peak (a 1024^3 float32 matmul timed in the same run; the FLOPs of
one evaluation from torch's FLOP counter) and the peak resident memory added while it ran.

Measured once, one thread, on the 2-core machine shared with other jobs (load 2.7-4.7, 23 minutes):
reference 2.25 attacks/min (4/8); engine every step 6.62 (2.9x, 47/64; 4/8 on the reference's
targets); a plain dlg on 128 targets 12.98 (5.8x, 86/128; 47/64 on targets 100-163, 4/8), 2,000
evaluations per attack against 3,868, 3.8% of a 124 GFLOP/s matmul peak, 0.5 GB resident memory added.

Run it alone on a quiet machine, one thread:

    OMP_NUM_THREADS=1 LEAKBENCH_BENCH_THREADS=1 LEAKBENCH_DATA_DIR=/path/to/mirror \\
        pytest benchmarks/test_fastpath_speed.py -s

(the mirror must hold cifar100/). The last test prints the table; the numbers are also in each
benchmark's extra_info.
"""
import os
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from leakbench.attacks.gradient_matching import BatchedGradientMatching
from leakbench.data import load
from leakbench.models import build_model
from leakbench.registry import ATTACKS, DEFENSES
from leakbench.scoring.reconstruction import score_reconstruction
from leakbench.threat import AttackTask

FIRST = 100            # targets FIRST.. of the split; nothing was tuned on them
REFERENCE_TARGETS = 8
STEPS = 300
CLASSES = 100
RESULTS: dict[str, dict] = {}

pytestmark = pytest.mark.usefixtures("bench_threads")  # benchmarks/conftest.py


@pytest.fixture(scope="module")
def cifar100():
    data_dir = os.environ.get("LEAKBENCH_DATA_DIR")
    if not data_dir or not (Path(data_dir) / "cifar100").is_dir():
        pytest.skip("set LEAKBENCH_DATA_DIR to a mirror holding cifar100/")
    return load("cifar100", "train", data_dir=data_dir)


def make_tasks(data, n):
    model = build_model("lenet-zhu", data.shape, CLASSES, seed=0)
    tasks = []
    for t in range(FIRST, FIRST + n):
        x, y = data.images[t:t + 1], data.labels[t:t + 1]
        shared = DEFENSES.build("none").share(model, x, F.one_hot(y, CLASSES).float())
        tasks.append((AttackTask(model=model, shared=shared, input_shape=data.shape, num_classes=CLASSES,
                                 batch_size=1, seed=t), x, y))
    return tasks


def wilson(hits: int, n: int) -> str:
    from scipy.stats import binomtest

    ci = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="wilson")
    return f"{100 * ci.low:.0f}-{100 * ci.high:.0f}%"


class PeakRSS:
    """The resident memory added while the block runs (sampled every 10 ms from /proc)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self._rss())
            self.done.wait(0.01)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(benchmark, label, params, tasks):
    attack = ATTACKS.build("dlg", {"steps": STEPS, **params})
    with PeakRSS() as rss:
        results = benchmark.pedantic(lambda: attack.run([t for t, _, _ in tasks]), rounds=1, iterations=1)
    seconds = benchmark.stats.stats.mean
    hits = [max(score_reconstruction(r.images.clamp(0, 1), x, None, y, metrics=("mse",))["mse"]) < 1e-3
            for r, (_, x, y) in zip(results, tasks)]
    evals = sum(r.closure_evals for r in results)
    info = {"targets": len(tasks), "seconds": round(seconds, 1),
            "attacks_per_minute": round(60 * len(tasks) / seconds, 2),
            "success": f"{sum(hits)}/{len(tasks)}", "success_ci95": wilson(sum(hits), len(tasks)),
            "on_reference_targets": f"{sum(hits[:REFERENCE_TARGETS])}/{REFERENCE_TARGETS}",
            "on_first_64": f"{sum(hits[:64])}/64" if len(tasks) >= 64 else "",
            "evals_per_attack": round(evals / len(tasks)), "ms_per_eval": round(1000 * seconds / evals, 3),
            "peak_rss_added_mb": round((rss.peak - rss.base) / 2 ** 20)}
    if "reference" in RESULTS:
        info["speedup"] = round(info["attacks_per_minute"] / RESULTS["reference"]["attacks_per_minute"], 1)
    benchmark.extra_info.update(info)
    RESULTS[label] = info
    print(label, info)


def test_reference_one_at_a_time(benchmark, cifar100):
    measure(benchmark, "reference", {"engine": "reference"}, make_tasks(cifar100, REFERENCE_TARGETS))


# (label, parameters, targets): the engine on the reference's attack (no stopping rule, every step),
# then a plain `dlg` (its defaults) on a stream of 128 targets, the first 64 the same as the row before
ENGINE_ROWS = [
    ("engine, every step (compiled, native)", {"stop_relative": 0.0, "stall_window": 0, "compile": True,
                                               "native": True}, 64),
    ("engine, a plain dlg (its defaults: relative stop 5e-8, stall 500, compile/native/slots auto)", {}, 128),
]


@pytest.mark.parametrize("label,params,targets", ENGINE_ROWS, ids=["every-step", "defaults"])
def test_engine(benchmark, cifar100, label, params, targets):
    from leakbench.attacks.native import lbfgs_kernel

    lbfgs_kernel()  # built (or found cached) outside the timed run
    measure(benchmark, label, params, make_tasks(cifar100, targets))


def test_flops_and_peak_fraction(cifar100):
    """FLOPs of one evaluation (torch's FLOP counter, the plain objective's graph) against this
    machine's matmul peak measured now."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model("lenet-zhu", cifar100.shape, CLASSES, seed=0)
    params = {n: p.detach() for n, p in model.named_parameters()}
    targets = [torch.zeros(1, *p.shape) for p in params.values()]
    objective = BatchedGradientMatching(model, params, {}, targets, input_shape=cifar100.shape, batch_size=1,
                                        num_classes=CLASSES, shared_weights=True, outer_product=False)
    with FlopCounterMode(display=False) as counter:
        objective(torch.zeros(1, dtype=torch.long), torch.randn(1, objective.width))
    flops = counter.get_total_flops()
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    peak = 2 * 1024 ** 3 * reps / (time.perf_counter() - start)
    RESULTS["flops"] = {"mflop_per_eval": round(flops / 1e6, 2), "matmul_peak_gflops": round(peak / 1e9, 1)}
    for info in RESULTS.values():
        if "ms_per_eval" in info:
            info["peak_fraction"] = round(flops / (info["ms_per_eval"] / 1000) / peak, 4)
    print(RESULTS["flops"])
    assert flops > 0


def test_summary():
    if "reference" not in RESULTS:
        pytest.skip("the timed tests did not run")
    print(f"\nload average {os.getloadavg()}, torch threads {torch.get_num_threads()}, {RESULTS.get('flops')}")
    print("| run | targets | attacks/min | speed-up | success | 95% interval | on the reference's targets "
          "| on targets 100-163 | evals/attack | ms/eval | peak fraction | peak RSS added |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, info in RESULTS.items():
        if "attacks_per_minute" in info:
            print(f"| {label} | {info['targets']} | {info['attacks_per_minute']} | {info.get('speedup', 1.0)}x | "
                  f"{info['success']} | {info['success_ci95']} | {info['on_reference_targets']} | "
                  f"{info['on_first_64']} | {info['evals_per_attack']} | {info['ms_per_eval']} | "
                  f"{info.get('peak_fraction', '')} | {info['peak_rss_added_mb']} MB |")
