"""Membership inference (issue 19): the scores against scikit-learn and a worked example of the empirical
epsilon, then on real CIFAR-10 (small models, 200 members): an overfit undefended model leaks to both
attacks, DP-SGD at a small epsilon keeps the attack within the bound its epsilon implies, and a model that
never saw the "members" (both sets held out) passes the verdict."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import beta
from sklearn.metrics import roc_auc_score, roc_curve

from leakbench.registry import ATTACKS
from leakbench.run.grid import parse_grid
from leakbench.run.report import render
from leakbench.run.runner import RunOptions, Runner
from leakbench.scoring.membership import (
    MembershipRule, auc_of_scores, dp_tpr_bound, epsilon_from_rates, epsilon_lower_bound, null_false_alarm,
    score_membership, tpr_at_fpr, tpr_at_fpr_of_scores,
)


def test_empirical_epsilon_worked_example():
    # TPR 50% at FPR 1%: e^eps >= 0.5 / 0.01 = 50, so eps >= log 50 = 3.912; the other side,
    # (1 - 0.01) / (1 - 0.5) = 1.98, is weaker
    assert epsilon_from_rates(0.5, 0.01) == pytest.approx(math.log(50))
    assert epsilon_from_rates(0.5, 0.01) == pytest.approx(3.912, abs=1e-3)
    # with delta = 0.1: (0.5 - 0.1) / 0.01 = 40
    assert epsilon_from_rates(0.5, 0.01, delta=0.1) == pytest.approx(math.log(40))
    # the second side wins when the attack is sure of non-members: TPR 99.9%, FPR 50% -> 0.5 / 0.001 = 500
    assert epsilon_from_rates(0.999, 0.5) == pytest.approx(math.log(500))
    assert epsilon_from_rates(0.3, 0.3) == 0.0  # chance proves nothing
    # Clopper-Pearson: 50 of 100 members, 1 of 100 non-members; the exact bounds from the beta quantiles
    tpr_low = beta.ppf(0.025, 50, 51)
    fpr_high = beta.ppf(0.975, 2, 99)
    assert epsilon_lower_bound(50, 100, 1, 100) == pytest.approx(math.log(tpr_low / fpr_high), rel=1e-6)
    assert 0 < epsilon_lower_bound(50, 100, 1, 100) < math.log(50)  # conservative: below the point estimate
    # DP's bound on TPR at 1% FPR: e^1 x 0.01 = 2.7% at epsilon 1
    assert dp_tpr_bound(1.0, 0.0, 0.01) == pytest.approx(math.e * 0.01)


def test_scores_agree_with_scikit_learn_and_the_rule_can_fail():
    rng = np.random.default_rng(0)
    members, nonmembers = np.round(rng.normal(1, 1, 300), 1), np.round(rng.normal(0, 1, 400), 1)  # ties too
    labels = np.r_[np.ones(300), np.zeros(400)]
    fpr, tpr, _ = roc_curve(labels, np.r_[members, nonmembers])
    assert auc_of_scores(members, nonmembers) == pytest.approx(roc_auc_score(labels, np.r_[members, nonmembers]))
    for target in (0.001, 0.01, 0.1):
        assert tpr_at_fpr_of_scores(members, nonmembers, target) == pytest.approx(tpr_at_fpr(fpr, tpr, target)[0])
    leaky = score_membership(members, nonmembers, rule=MembershipRule())
    assert not leaky["verdict"]["defended"] and leaky["metrics"]["auc_interval"][0] > 0.7
    chance = score_membership(rng.normal(0, 1, 300), rng.normal(0, 1, 400), rule=MembershipRule())
    assert chance["verdict"]["defended"] and chance["metrics"]["epsilon_lower_bound"] == 0.0


def test_the_rule_rarely_flags_a_blind_attack_at_the_shipped_sizes():
    """The calibration of max_tpr_ratio: blind attacks (exchangeable scores) fail the default rule at most
    5% of the time with 360 (quick) and 500 (membership) members, while a ratio of 2 fails 10% at 500."""
    for count in (360, 500):
        assert null_false_alarm(count, count, MembershipRule()) <= 0.05
    assert null_false_alarm(500, 500, MembershipRule(max_tpr_ratio=2.0)) > 0.05
    # the simulated blind attack agrees with the closed form at the extreme: a ratio of 100 never fails
    assert null_false_alarm(500, 500, MembershipRule(max_tpr_ratio=100.0)) == 0.0


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory, cifar10_dir):
    """Loss and offline LiRA (4 reference models) on a small relu LeNet trained 20 epochs on 200 CIFAR-10
    images (overfit: it remembers its records), undefended and under centralized DP-SGD at noise 4."""
    grid = parse_grid({
        "name": "membership-test", "datasets": ["cifar10"],
        "models": [{"name": "lenet-zhu", "params": {"activation": "relu", "init": "default"}}],
        "attacks": [{"name": "membership-loss", "params": {"members": 200}},
                    {"name": "membership-lira", "params": {"members": 200, "reference_models": 4}}],
        "defenses": ["none", {"name": "dp-sgd", "params": {"noise_multiplier": 4.0, "max_grad_norm": 1.0,
                                                             "accuracy_setting": "centralized"}}],
        "seeds": [0],
        "accuracy": {"epochs": 20, "train_size": 200, "test_size": 200, "batch_size": 50, "optimizer": "adam",
                     "lr": 0.003},
    })
    out = tmp_path_factory.mktemp("membership")
    runner = Runner(grid, RunOptions(out_dir=out, data_dir=cifar10_dir, progress=False))
    runner.preflight()
    records = {(r["attack"], r["defense"]): r for r in runner.run()}
    return runner, records, out


@pytest.mark.realdata
@pytest.mark.parametrize("attack", ["membership-loss", "membership-lira"])
def test_an_overfit_undefended_model_leaks_membership(cifar_run, attack):
    _, records, _ = cifar_run
    record = records[(attack, "none")]
    m = record["metrics"]
    assert m["members"] == m["nonmembers"] == 200
    assert m["generalisation_gap"] > 0.3  # it overfits: the premise of the test
    assert m["auc"] > 0.6 and m["auc_interval"][0] > 0.55
    assert m["tpr_at_1%_fpr"] > 0.035  # well above the 1% of a guess, and beyond the rule's 3%
    assert record["verdict"]["defended"] is False and record["threat"]["setting"] == "membership"


@pytest.mark.realdata
def test_dp_sgd_at_a_small_epsilon_keeps_the_attack_within_its_bound(cifar_run):
    _, records, _ = cifar_run
    for attack in ("membership-loss", "membership-lira"):
        record = records[(attack, "dp-sgd")]
        epsilon, m = record["privacy"]["epsilon"], record["metrics"]
        assert epsilon < 5
        assert m["dp_tpr_bound"] == pytest.approx(dp_tpr_bound(epsilon, record["privacy"]["delta"], 0.01))
        assert m["tpr_at_1%_fpr"] <= m["dp_tpr_bound"]
        assert m["epsilon_lower_bound"] <= epsilon
        # and the attack does far worse than against the undefended model
        assert m["auc"] < records[(attack, "none")]["metrics"]["auc"]


@pytest.mark.realdata
def test_negative_control_a_model_that_never_saw_the_members_passes(cifar_run):
    """Both sets held out: members are non-members in disguise, so the attack may not tell them apart."""
    runner, _, _ = cifar_run
    cell = next(c for c in runner.grid.cells() if c.attack.name == "membership-loss" and c.defense.name == "none")
    _, model = runner.trained_model(cell)
    held_out = runner.context.membership_splits(cell).held_out
    first, second = held_out.subset(range(0, 400, 2)), held_out.subset(range(1, 400, 2))
    attack = ATTACKS.build("membership-loss", {})
    score = score_membership(attack.scores(model.cpu(), first.images, first.labels),
                             attack.scores(model.cpu(), second.images, second.labels), rule=MembershipRule())
    assert score["verdict"]["defended"] and abs(score["metrics"]["auc"] - 0.5) < 0.1


@pytest.mark.realdata
def test_the_table_and_the_roc_figure_show_membership(cifar_run):
    _, _, out = cifar_run
    table = render(out)
    header = next(line for line in table.splitlines() if line.startswith("| defense"))
    assert "membership-lira AUC" in header and "membership-lira eps lower bound" in header and "epsilon" in header
    assert (out / "roc_membership-lira_cifar10_lenet-zhu.png").stat().st_size > 10_000
