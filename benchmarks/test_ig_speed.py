"""Inverting Gradients attacks per minute: the vectorised engine (BatchedAdam over one vmapped cosine + TV
objective) at K = 8 and 64 instances per program, eager and compiled, against the one-at-a-time loop
of the same algorithm (torch.optim.Adam + MultiStepLR per target), in the same run. Setup: the embedded 16x16 digits (no
download), lenet-zhu with ReLU and the DLG reference's U(-0.5, 0.5) weights (the setting where
Inverting Gradients recovers what DLG cannot, tests/test_inverting_gradients.py), one weight draw per
target, the attack's defaults but LEAKBENCH_IG_STEPS iterations (default 500, the paper's 24,000 take
48 times as long). Success = SSIM >= 0.3 after clamping to [0, 1] (the grids' verdict rule), and PSNR.

Not run by the unit tests: `pytest benchmarks/test_ig_speed.py -s` (LEAKBENCH_BENCH_THREADS sets torch's
threads, default all cores). The last test prints the summary table; the numbers are also in each
benchmark's extra_info.

Measured on the 2-core machine shared with other jobs (load 7-10), one torch thread, 500 iterations:
reference 16.5 attacks/min (8/8 recognisable, median PSNR 19.4 dB); engine K=8 50.8 (3.1x, 8/8); K=64
155.5 (9.4x, 63/64; 8/8 on the reference's targets); K=64 compiled 105.7 (6.4x: the compile is inside
the measurement); a stream of 256 through 64 compiled slots 242.8 (14.7x, 252/256; 8/8). Float32
trajectories of signed steps part early (pixels differ by up to 0.9 on the same targets: the median
PSNR on the reference's targets is 16-17 dB for the engine rows), the success rate does not.
"""
import os
import statistics

import pytest
import torch.nn.functional as F

from leakbench.data import load
from leakbench.models import build_model
from leakbench.registry import ATTACKS, DEFENSES
from leakbench.scoring.reconstruction import score_reconstruction
from leakbench.threat import AttackTask

STEPS = int(os.environ.get("LEAKBENCH_IG_STEPS", "500"))
REFERENCE_TARGETS = int(os.environ.get("LEAKBENCH_IG_REFERENCE_TARGETS", "8"))
RESULTS: dict[str, dict] = {}


pytestmark = pytest.mark.usefixtures("bench_threads")  # benchmarks/conftest.py


@pytest.fixture(scope="module")
def digits():
    return load("digits", "test", image_size=16)


def make_tasks(data, n):
    tasks = []
    for t in range(n):
        x, y = data.images[t:t + 1], data.labels[t:t + 1]
        model = build_model("lenet-zhu", data.shape, 10, seed=t, activation="relu", init="uniform")
        shared = DEFENSES.build("none").share(model, x, F.one_hot(y, 10).float())
        tasks.append((AttackTask(model=model, shared=shared, input_shape=data.shape, num_classes=10,
                                 batch_size=1, seed=t), x, y))
    return tasks


def measure(benchmark, label, attack, tasks):
    results = benchmark.pedantic(lambda: attack.run([t for t, _, _ in tasks]), rounds=1, iterations=1)
    seconds = benchmark.stats.stats.mean
    scores = [score_reconstruction(r.images.clamp(0, 1), x, r.labels, y) for r, (_, x, y) in zip(results, tasks)]
    hits = [s["ssim"][0] >= 0.3 for s in scores]
    psnr = [s["psnr"][0] for s in scores]
    info = {"targets": len(tasks), "seconds": round(seconds, 1),
            "attacks_per_minute": round(60 * len(tasks) / seconds, 2),
            "success": f"{sum(hits)}/{len(tasks)}", "success_rate": sum(hits) / len(tasks),
            # the same targets as the reference loop, for a side-by-side success rate
            "success_on_reference_targets": f"{sum(hits[:REFERENCE_TARGETS])}/{min(len(tasks), REFERENCE_TARGETS)}",
            "psnr_median": round(statistics.median(psnr), 1),
            "psnr_median_on_reference_targets": round(statistics.median(psnr[:REFERENCE_TARGETS]), 1),
            "evals_per_attack": round(sum(r.closure_evals for r in results) / len(tasks))}
    if "reference" in RESULTS:
        info["speedup"] = round(info["attacks_per_minute"] / RESULTS["reference"]["attacks_per_minute"], 1)
    benchmark.extra_info.update(info)
    RESULTS[label] = {**info, "images": [r.images for r in results[:REFERENCE_TARGETS]]}
    print(label, info)
    return info


def test_reference_one_at_a_time(benchmark, digits):
    attack = ATTACKS.build("inverting-gradients", {"steps": STEPS, "engine": "reference"})
    measure(benchmark, "reference", attack, make_tasks(digits, REFERENCE_TARGETS))


# (K, targets, compile): eager at K = 8 and 64, then compiled (torch.compile of the objective; its compile
# time, once per program size, is inside the measurement) on the same 64 targets and on a stream of 256
@pytest.mark.parametrize("k,targets,compiled", [(8, 8, False), (64, 64, False), (64, 64, True), (64, 256, True)])
def test_engine(benchmark, digits, k, targets, compiled):
    attack = ATTACKS.build("inverting-gradients", {"steps": STEPS, "slots": k, "compile": compiled})
    label = f"engine K={k}" + (f", {targets} targets" if targets > k else "") + (", compiled" if compiled else "")
    measure(benchmark, label, attack, make_tasks(digits, targets))


def test_summary():
    if "reference" not in RESULTS:
        pytest.skip("the timed tests did not run")
    print(f"\n{STEPS} iterations per attack\n")
    print("| run | targets | attacks/min | speed-up | success (SSIM >= 0.3) | on the reference's targets "
          "| median PSNR | evals/attack |")
    print("|---|---|---|---|---|---|---|---|")
    for label, info in RESULTS.items():
        print(f"| {label} | {info['targets']} | {info['attacks_per_minute']} | {info.get('speedup', 1.0)}x | "
              f"{info['success']} | {info['success_on_reference_targets']} | {info['psnr_median']} | "
              f"{info['evals_per_attack']} |")
    # the same algorithm: on the reference's targets the engine reconstructs the same images (float32
    # rounding aside, which signed steps can amplify), so its success there is the reference's
    reference = RESULTS["reference"]
    for label, info in RESULTS.items():
        if label != "reference":
            gap = max(float((a - b).abs().max()) for a, b in zip(info["images"], reference["images"]))
            print(f"{label}: largest pixel difference from the reference on its targets {gap:.2g}")
