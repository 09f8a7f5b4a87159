"""The fast path at its defaults against the one-at-a-time reference of the same algorithm, in one run,
on settings nothing was tuned on: CIFAR-100 (100 classes, 32x32x3; targets from 100 of the train
split, the only one in the mirror; the stopping rules were calibrated on CIFAR-10 test targets 500-563)
with one network for every target, as in the DLG reference script. Each setting is a reference row
(``engine: reference``) followed by engine rows on a stream of targets whose first ones are the
reference's:

- ``lenet-dlg``: ``dlg`` on lenet-zhu (sigmoid, U(-0.5, 0.5) weights), 300 L-BFGS steps of up to 20
  evaluations: the reference on 8 targets, the engine without stopping rules (every step, compiled and
  native: the reference's attack on many targets) on 64 and the engine as a plain ``dlg`` runs it (its
  defaults: ``compile``/``native``/``slots`` at auto, the relative stop 5e-8 and the stall rule 500) on
  a stream of 128.
- ``resnet20-b1`` and ``resnet20-b4``: a plain ``dlg`` on resnet20-sigmoid (DLG Table 2's model, its
  defaults: BatchNorm, PyTorch's init) attacking one image and a batch of 4.
- ``dlg-batched``: the cyclic batch attack (eq. 5) at its defaults but fewer cyclic steps (batch 4, steps of
  up to 5 evaluations, no stopping rules) on lenet-zhu.
- ``inverting-gradients``: Inverting Gradients at its defaults but fewer Adam iterations, on lenet-zhu
  with ReLU and U(-0.5, 0.5) weights (the setting where it recovers what DLG cannot;
  benchmarks/test_ig_speed.py), labels read off the update as the attack does.

Success: for the DLG family every sample's MSE < 1e-3 after clamping to [0, 1] and one-to-one
matching; for Inverting Gradients every sample's SSIM >= 0.3 (the grids' verdict rule, as in
benchmarks/test_ig_speed.py). Each row gives its success rate with a 95% Wilson
interval beside the reference's, the fraction of this machine's matmul peak (a 1024^3 float32 matmul
timed in the same run; the FLOPs of one evaluation of the reference's objective, value and gradient,
from torch's FLOP counter) and the peak resident memory added while it ran.

Sizes: every setting reads LEAKBENCH_FASTPATH_<KEY>_STEPS, _REFERENCE_TARGETS and _TARGETS (KEY the
setting's name upper-cased with '-' as '_', e.g. LEAKBENCH_FASTPATH_RESNET20_B4_TARGETS). _TARGETS is
the longest engine stream (lenet-dlg's every-step row takes half of it). The defaults are in SETTINGS
below: lenet-dlg keeps the sizes of the run measured in the README (23 minutes); the others are sized
from their FLOPs per evaluation to take a few minutes per row at one thread on the 2-core machine, far
below the papers' iteration counts (so their success rates are not the papers'), and not always at
the engine's default slots (the table's last column: the default, and in brackets the instances
live at once; the memory column is the default's only where the two agree, e.g. resnet20-sigmoid at
batch 1 needs LEAKBENCH_FASTPATH_RESNET20_B1_TARGETS=16): resnet20-sigmoid
(4.4 GFLOP per evaluation at batch 1, 400 times lenet-zhu's 11 MFLOP) at 40 L-BFGS steps with 2
reference and 8 engine targets at batch 1, 15 steps with 2 and 4 at batch 4; dlg-batched at 600 cyclic
steps, 4 and 32 targets; Inverting Gradients at 500 iterations, 8 and 64 targets.

Run it alone on a quiet machine, one thread (all settings; select some with -k, keeping the last two
tests, e.g. -k "resnet20 or flops or summary"):

    OMP_NUM_THREADS=1 LEAKBENCH_BENCH_THREADS=1 LEAKBENCH_DATA_DIR=/path/to/mirror \\
        pytest benchmarks/test_fastpath_speed.py -s

(the mirror must hold cifar100/). The last test prints the table, each row beside its reference; the
numbers are also in each benchmark's extra_info. LEAKBENCH_FASTPATH_STEPS, _REFERENCE_TARGETS and
_TARGETS (no setting named) set every setting's size at once, below its own variables: a check that
everything runs, in a minute or two, is

    LEAKBENCH_FASTPATH_STEPS=1 LEAKBENCH_FASTPATH_REFERENCE_TARGETS=1 LEAKBENCH_FASTPATH_TARGETS=2 \\
        OMP_NUM_THREADS=1 LEAKBENCH_BENCH_THREADS=1 LEAKBENCH_DATA_DIR=/path/to/mirror \\
        pytest benchmarks/test_fastpath_speed.py -s

lenet-dlg measured once, one thread, on the 2-core machine shared with other jobs (load 2.7-4.7, 23
minutes): reference 2.25 attacks/min (4/8); engine every step 6.62 (2.9x, 47/64; 4/8 on the reference's
targets); a plain dlg on 128 targets 12.98 (5.8x, 86/128; 47/64 on targets 100-163, 4/8), 2,000
evaluations per attack against 3,868, 3.8% of a 124 GFLOP/s matmul peak, 0.5 GB resident memory added.
The other settings are not measured yet.
"""
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from leakbench.attacks.dlg import analytic_labels, attacker_model, dummy_inputs
from leakbench.attacks.engine import auto_slots
from leakbench.attacks.gradient_matching import (
    gradient_distance,
    matched_distance,
    total_variation,
)
from leakbench.data import load
from leakbench.models import build_model
from leakbench.registry import ATTACKS, DEFENSES
from leakbench.scoring.reconstruction import score_reconstruction
from leakbench.threat import IDENTITY_MAP, AttackTask

FIRST = 100            # targets FIRST.. of the split; nothing was tuned on them
CLASSES = 100
RESULTS: dict[str, dict] = {}   # by row label, in the order the rows ran
FLOPS: dict[str, int] = {}      # by setting: one evaluation of the reference's objective

pytestmark = pytest.mark.usefixtures("bench_threads")  # benchmarks/conftest.py


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"{name}={value!r}: a positive whole number is allowed")
    return int(value)


@dataclass(frozen=True)
class Setting:
    """One attack on one model and batch size, its reference and its engine rows."""

    name: str
    attack: str
    model: str
    steps: int               # defaults, each overridden by LEAKBENCH_FASTPATH_<KEY>_STEPS etc.
    reference_targets: int
    targets: int
    batch: int = 1
    model_params: tuple = ()
    verdict: str = "mse"     # "mse": every sample's MSE < 1e-3; "ssim": every sample's SSIM >= 0.3
    # (test id, label, parameters, share of the targets): the engine rows after the reference
    engine_rows: tuple = (("defaults", "engine, its defaults", {}, 1.0),)

    def size(self, what: str) -> int:
        default = {"steps": self.steps, "reference_targets": self.reference_targets, "targets": self.targets}[what]
        default = env_int(f"LEAKBENCH_FASTPATH_{what.upper()}", default)  # every setting's
        return env_int(f"LEAKBENCH_FASTPATH_{self.name.upper().replace('-', '_')}_{what.upper()}", default)


SETTINGS = (
    Setting("lenet-dlg", "dlg", "lenet-zhu", steps=300, reference_targets=8, targets=128,
            engine_rows=(("every-step", "engine, every step (compiled, native)",
                          {"stop_relative": 0.0, "stall_window": 0, "compile": True, "native": True}, 0.5),
                         ("defaults", "engine, a plain dlg (its defaults)", {}, 1.0))),
    Setting("resnet20-b1", "dlg", "resnet20-sigmoid", steps=40, reference_targets=2, targets=8, batch=1),
    Setting("resnet20-b4", "dlg", "resnet20-sigmoid", steps=15, reference_targets=2, targets=4, batch=4),
    Setting("dlg-batched", "dlg-batched", "lenet-zhu", steps=600, reference_targets=4, targets=32, batch=4),
    Setting("inverting-gradients", "inverting-gradients", "lenet-zhu", steps=500, reference_targets=8,
            targets=64, model_params=(("activation", "relu"), ("init", "uniform")), verdict="ssim"),
)


@pytest.fixture(scope="module")
def cifar100():
    data_dir = os.environ.get("LEAKBENCH_DATA_DIR")
    if not data_dir or not (Path(data_dir) / "cifar100").is_dir():
        pytest.skip("set LEAKBENCH_DATA_DIR to a mirror holding cifar100/")
    return load("cifar100", "train", data_dir=data_dir)


def make_tasks(data, setting: Setting, n: int):
    """Targets FIRST.. in consecutive batches of setting.batch, one network for all of them."""
    model = build_model(setting.model, data.shape, CLASSES, seed=0, **dict(setting.model_params))
    b, tasks = setting.batch, []
    for i in range(n):
        first = FIRST + i * b
        x, y = data.images[first:first + b], data.labels[first:first + b]
        shared = DEFENSES.build("none").share(model, x, F.one_hot(y, CLASSES).float())
        tasks.append((AttackTask(model=model, shared=shared, input_shape=data.shape, num_classes=CLASSES,
                                 batch_size=b, seed=first), x, y))
    return tasks


def wilson(hits: int, n: int) -> tuple[float, float]:
    from scipy.stats import binomtest

    ci = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="wilson")
    return ci.low, ci.high


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


def recovered(setting: Setting, result, x, y) -> bool:
    if setting.verdict == "ssim":
        return min(score_reconstruction(result.images.clamp(0, 1), x, None, y, metrics=("ssim",))["ssim"]) >= 0.3
    return max(score_reconstruction(result.images.clamp(0, 1), x, None, y, metrics=("mse",))["mse"]) < 1e-3


def engine_slots(attack, tasks) -> int:
    """The instances one engine program advances together: the attack's slots, or what 'auto' picks for
    these tasks (the engine's own rule), so that the memory column can be read against the default."""
    if attack.slots != "auto":
        return attack.slots
    task = tasks[0][0]
    width = task.batch_size * (math.prod(task.input_shape) + task.num_classes)  # images and label logits
    return auto_slots([t for t, _, _ in tasks], attack.history_size, width)


def measure(benchmark, setting: Setting, label: str, params: dict, tasks):
    steps = setting.size("steps")
    attack = ATTACKS.build(setting.attack, {"steps": steps, "batch_size": setting.batch, **params})
    with PeakRSS() as rss:
        results = benchmark.pedantic(lambda: attack.run([t for t, _, _ in tasks]), rounds=1, iterations=1)
    seconds = benchmark.stats.stats.mean
    hits = [recovered(setting, r, x, y) for r, (_, x, y) in zip(results, tasks)]
    evals = sum(r.closure_evals for r in results)
    first = setting.size("reference_targets")
    info = {"setting": setting.name, "targets": len(tasks), "steps": steps, "seconds": round(seconds, 1),
            "attacks_per_minute": round(60 * len(tasks) / seconds, 2),
            "hits": sum(hits), "success": f"{sum(hits)}/{len(tasks)}", "ci95": wilson(sum(hits), len(tasks)),
            "on_reference_targets": f"{sum(hits[:first])}/{min(first, len(tasks))}",
            "evals_per_attack": round(evals / len(tasks)), "ms_per_eval": round(1000 * seconds / max(evals, 1), 3),
            "peak_rss_added_mb": round((rss.peak - rss.base) / 2 ** 20)}
    if label != "reference":
        info["slots"] = engine_slots(attack, tasks)
    reference = RESULTS.get(f"{setting.name}: reference")
    if reference is not None and label != "reference":
        info["speedup"] = round(info["attacks_per_minute"] / reference["attacks_per_minute"], 1)
    benchmark.extra_info.update(info)
    RESULTS[f"{setting.name}: {label}"] = info
    print(setting.name, label, info)


# every setting's reference first, then its engine rows on streams of targets starting at the reference's
ROWS = [row for s in SETTINGS for row in (
    [pytest.param(s, "reference", {"engine": "reference"}, None, id=f"{s.name}-reference")]
    + [pytest.param(s, label, params, share, id=f"{s.name}-{row_id}")
       for row_id, label, params, share in s.engine_rows])]


@pytest.mark.parametrize("setting,label,params,share", ROWS)
def test_row(benchmark, cifar100, setting, label, params, share):
    if share is None:
        n = setting.size("reference_targets")
    else:
        n = max(1, round(share * setting.size("targets")))
        if setting.attack != "inverting-gradients":
            from leakbench.attacks.native import lbfgs_kernel

            lbfgs_kernel()  # built (or found cached) outside the timed run
    measure(benchmark, setting, label, params, make_tasks(cifar100, setting, n))


def evaluation_flops(setting: Setting, data) -> int:
    """FLOPs of one evaluation of the reference's objective (value and gradient) for this setting.
    backward rather than autograd.grad: the counter's module hooks refuse autograd.grad of a
    double-backward graph."""
    from torch.utils.flop_counter import FlopCounterMode

    task, _, _ = make_tasks(data, setting, 1)[0]
    model = attacker_model(task)
    x, logits = dummy_inputs(task, torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    logits.requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        if setting.attack == "inverting-gradients":
            onehot = F.one_hot(analytic_labels(task), CLASSES).float()
            value = matched_distance(model, x, onehot, list(task.shared), IDENTITY_MAP, cosine=True)
            value = value + 1e-4 * total_variation(x)  # the attack's tv weight
            value.backward(inputs=[x])
        else:
            value = gradient_distance(model, x, F.softmax(logits, -1), list(task.shared))
            value.backward(inputs=[x, logits])
    return counter.get_total_flops()


def test_flops_and_peak_fraction(cifar100):
    """Each measured setting's FLOPs per evaluation against this machine's matmul peak measured now."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    peak = 2 * 1024 ** 3 * reps / (time.perf_counter() - start)
    FLOPS["matmul_peak"] = peak
    for setting in SETTINGS:
        if any(info["setting"] == setting.name for info in RESULTS.values()):
            FLOPS[setting.name] = evaluation_flops(setting, cifar100)
            assert FLOPS[setting.name] > 0
    for info in RESULTS.values():
        info["peak_fraction"] = round(FLOPS[info["setting"]] / (info["ms_per_eval"] / 1000) / peak, 4)
    print({k: (round(v / 1e9, 1) if k == "matmul_peak" else round(v / 1e6, 2)) for k, v in FLOPS.items()},
          "(matmul peak in GFLOP/s, settings in MFLOP per evaluation)")


def percent(ci: tuple[float, float]) -> str:
    return f"{100 * ci[0]:.0f}-{100 * ci[1]:.0f}%"


def test_summary():
    if not RESULTS:
        pytest.skip("the timed tests did not run")
    print(f"\nload average {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    print("| setting | run | targets | steps | attacks/min | reference attacks/min | speed-up | success "
          "| 95% interval | reference success | reference 95% interval | intervals overlap "
          "| on the reference's targets | evals/attack | reference evals/attack | ms/eval | peak fraction "
          "| peak RSS added | slots (live) |")
    print("|---" * 19 + "|")
    for label, info in RESULTS.items():
        reference = RESULTS.get(f"{info['setting']}: reference")
        if reference is None or reference is info:
            continue
        overlap = info["ci95"][0] <= reference["ci95"][1] and reference["ci95"][0] <= info["ci95"][1]
        print(f"| {info['setting']} | {label.split(': ', 1)[1]} | {info['targets']} | {info['steps']} "
              f"| {info['attacks_per_minute']} | {reference['attacks_per_minute']} | {info['speedup']}x "
              f"| {info['success']} | {percent(info['ci95'])} | {reference['success']} "
              f"| {percent(reference['ci95'])} | {'yes' if overlap else 'no'} | {info['on_reference_targets']} "
              f"| {info['evals_per_attack']} | {reference['evals_per_attack']} | {info['ms_per_eval']} "
              f"| {info.get('peak_fraction', '')} | {info['peak_rss_added_mb']} MB "
              f"| {info['slots']} ({min(info['slots'], info['targets'])}) |")
