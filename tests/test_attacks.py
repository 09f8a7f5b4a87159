"""Gradient attacks against real reconstructions. Thresholds come from the papers: DLG recovers images
to MSE < 1e-3 (its Fig. 5 reports < 0.03 everywhere; the issue asks 1e-3) with the label; iDLG reads the
label off the gradient exactly for one sample; iterations grow with batch size (DLG Table 2)."""
import statistics

import pytest
import torch
import torch.nn.functional as F

from leakbench.attacks.dlg import analytic_labels
from leakbench.cells.gradient import CONVERGED_MSE
from leakbench.data import load
from leakbench.models import build_model
from leakbench.registry import ATTACKS, DEFENSES
from leakbench.scoring.reconstruction import score_reconstruction
from leakbench.threat import AttackTask

GRADIENT_ATTACKS = [n for n in ATTACKS.list() if ATTACKS.get(n).setting == "gradient"]


def attack_targets(data, attack, params, *, targets, batch_size=1, defense="none", first=0):
    """Run ``attack`` on ``targets`` private batches; return per-target scores and results."""
    attack = ATTACKS.build(attack, {"batch_size": batch_size, **params})
    out = []
    for t in range(targets):
        idx = torch.arange(first + t * batch_size, first + (t + 1) * batch_size)
        x, y = data.images[idx], data.labels[idx]
        model = build_model("lenet-zhu", data.shape, data.num_classes, seed=t)
        shared = DEFENSES.build(defense).share(model, x, F.one_hot(y, data.num_classes).float(),
                                               generator=torch.Generator().manual_seed(t))
        task = AttackTask(model=model, shared=shared, input_shape=data.shape, num_classes=data.num_classes,
                          batch_size=batch_size, seed=t)
        converged = [None]

        def monitor(step, images, labels, x=x, y=y, converged=converged):
            if converged[0] is None:
                mse = score_reconstruction(images.clamp(0, 1), x, None, y, metrics=("mse",))["mse"]
                if max(mse) < CONVERGED_MSE:
                    converged[0] = step

        rec = attack.run([task], monitors=[monitor])[0]
        scores = score_reconstruction(rec.images.clamp(0, 1), x, rec.labels, y)
        out.append({"scores": scores, "rec": rec, "converged_at": converged[0], "x": x, "y": y})
    return out


def recovered(result):
    s = result["scores"]
    return all(m < CONVERGED_MSE for m in s["mse"]) and all(c == 1.0 for c in s["label_correct"])


@pytest.mark.parametrize("name", GRADIENT_ATTACKS)
def test_every_gradient_attack_moves_toward_the_private_data(name):
    """Any registered gradient attack, undefended, ends much closer to the private batch than its random
    start, returns finite images of the right shape, counts its cost, and is deterministic per seed."""
    data = load("digits", "test", image_size=8)
    first = attack_targets(data, name, {"steps": 30}, targets=1, batch_size=2)[0]
    again = attack_targets(data, name, {"steps": 30}, targets=1, batch_size=2)[0]
    rec = first["rec"]
    assert rec.images.shape == (2, 1, 8, 8) and torch.isfinite(rec.images).all()
    assert rec.closure_evals >= rec.steps > 0
    assert torch.equal(rec.images, again["rec"].images)
    start = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    start_mse = score_reconstruction(start.clamp(0, 1), first["x"], None, first["y"], metrics=("mse",))["mse"]
    assert statistics.mean(first["scores"]["mse"]) < 0.5 * statistics.mean(start_mse), (first["scores"]["mse"], start_mse)


def test_dlg_recovers_embedded_digits():
    results = attack_targets(load("digits", "test", image_size=16), "dlg", {"steps": 100}, targets=3)
    assert sum(recovered(r) for r in results) >= 2, [r["scores"] for r in results]


def test_dlg_recovers_real_mnist(mnist_dir):
    data = load("mnist", "test", data_dir=mnist_dir)
    results = attack_targets(data, "dlg", {"steps": 100}, targets=4)
    # the reference loop recovers about 5 of 8 targets (issue baseline); demand at least half
    assert sum(recovered(r) for r in results) >= 2, [r["scores"]["mse"] for r in results]


@pytest.mark.parametrize("source", ["digits", "mnist"])
def test_idlg_recovers_the_label_analytically(source, request):
    data_dir = request.getfixturevalue("mnist_dir") if source == "mnist" else None
    data = load(source, "test", data_dir=data_dir, image_size=16 if source == "digits" else None)
    hits = 0
    for i in range(40):
        model = build_model("lenet-zhu", data.shape, data.num_classes, seed=i)
        x, y = data.images[i:i + 1], data.labels[i:i + 1]
        shared = DEFENSES.build("none").share(model, x, F.one_hot(y, data.num_classes).float())
        task = AttackTask(model=model, shared=shared, input_shape=data.shape, num_classes=data.num_classes,
                          batch_size=1)
        hits += int(analytic_labels(task)[0] == y[0])
    assert hits == 40  # exact for one sample with non-negative features (sigmoid)


def test_idlg_reconstructs_with_the_analytic_label():
    results = attack_targets(load("digits", "test", image_size=16), "idlg", {"steps": 60}, targets=2)
    assert all(r["rec"].label_method == "analytic" for r in results)
    assert sum(recovered(r) for r in results) >= 1
    assert all(r["scores"]["label_correct"] == [1.0] for r in results)


def test_batched_dlg_iterations_grow_with_batch_size():
    """DLG Table 2: 270, 602, 1173, 2711 iterations for batch sizes 1, 2, 4, 8 on ResNet-20/CIFAR.
    Here: median cyclic iterations until every sample is within MSE 1e-3 (censored at the budget), for
    batch sizes 1, 2, 4 on 8x8 digits; the batch-size-8 row is in the slow test."""
    data = load("digits", "test", image_size=8)
    budget = 300
    medians = {}
    for bs in (1, 2, 4):
        results = attack_targets(data, "dlg-batched", {"steps": budget, "stop_distance": 1e-9}, targets=3,
                                 batch_size=bs)
        medians[bs] = statistics.median(r["converged_at"] or budget for r in results)
    assert medians[1] < medians[2] <= medians[4], medians
    assert medians[1] < budget / 4, medians


def test_batched_dlg_recovers_batches_of_four():
    """Two private batches of 4: at least 7 of the 8 samples reconstructed recognisably (the default
    verdict rule, SSIM >= 0.3) within 800 cyclic iterations."""
    results = attack_targets(load("digits", "test", image_size=12), "dlg-batched", {"steps": 800,
                             "stop_distance": 1e-9}, targets=2, batch_size=4)
    ssim = [v for r in results for v in r["scores"]["ssim"]]
    assert sum(v >= 0.3 for v in ssim) >= 7, ssim


@pytest.mark.slow
def test_batched_dlg_table2_trend_up_to_eight():
    data = load("digits", "test", image_size=12)
    budget = 3000
    medians = {}
    for bs in (1, 2, 4, 8):
        results = attack_targets(data, "dlg-batched", {"steps": budget, "stop_distance": 1e-9}, targets=3,
                                 batch_size=bs)
        medians[bs] = statistics.median(r["converged_at"] or budget for r in results)
    assert medians[1] < medians[2] <= medians[4] <= medians[8], medians
