"""Record-level DP defenses of the collaborative protocol: ``dssgd-dp`` (Shokri-Shmatikov sparse vector
upload), ``dp-sgd`` (Abadi et al., Opacus accounting) and ``selective-sharing``."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from scipy import integrate, stats

from leakbench import DEFENSES
from leakbench.collab import sparse_vector_scales, sparse_vector_upload, upload_count
from leakbench.data import load
from leakbench.defenses.dp import per_example_gradients
from leakbench.errors import ConfigError
from leakbench.models import build_model
from leakbench.threat import parameter_gradients
from leakbench.training import TrainingConfig

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    return load("digits", "train", image_size=8), load("digits", "test", image_size=8)


def small_mlp(data, seed=0):
    return build_model("mlp", data.shape, data.num_classes, seed=seed, hidden=64, activation="tanh")


def one_hot(labels, k):
    return torch.nn.functional.one_hot(labels, k).float()


def bounded_by(values: torch.Tensor, gamma: float) -> bool:
    """|values| <= gamma, with gamma as the values' dtype represents it (float32 1e-3 is 1.00000005e-3)."""
    return float(values.abs().max()) <= float(torch.tensor(gamma, dtype=values.dtype))


# -- the sparse vector technique: formulas ------------------------------------------------------------------

@pytest.mark.parametrize("epsilon_c, gamma, count", [(100.0, 1e-3, 105707), (10.0, 1e-3, 10570), (0.01, 0.5, 7)])
def test_svt_noise_scales_match_numeric_sparse(epsilon_c, gamma, count):
    scales = sparse_vector_scales(epsilon_c=epsilon_c, gamma=gamma, count=count)
    epsilon = count * epsilon_c            # one upload's budget: c parameters at epsilon_c each
    sensitivity = 2 * gamma                # released values live in [-gamma, gamma]
    epsilon_1, epsilon_2 = 8 / 9 * epsilon, 2 / 9 * epsilon
    assert scales.threshold == pytest.approx(2 * count * sensitivity / epsilon_1)
    assert scales.candidate == pytest.approx(2 * scales.threshold)
    assert scales.value == pytest.approx(2 * count * sensitivity / epsilon_2)
    # the budget adds up: selection epsilon_1 (= 8/9) plus c Laplace releases of sensitivity 2 gamma (= 1/9)
    release = count * sensitivity / scales.value
    assert release == pytest.approx(epsilon / 9)
    assert epsilon_1 + release == pytest.approx(epsilon)


def _laplace_truncated_cdf(scale, bound):
    low, high = stats.laplace.cdf(-bound, scale=scale), stats.laplace.cdf(bound, scale=scale)
    return lambda x: (stats.laplace.cdf(x, scale=scale) - low) / (high - low)


def test_svt_released_values_follow_the_laplace_law():
    """With a zero update every released value is bound(Lap(value scale), gamma): a KS test accepts that
    law and rejects the same law at 1.5x the scale."""
    gamma, epsilon_c, n = 1.0, 100.0, 20_000
    index, values = sparse_vector_upload(torch.zeros(n, dtype=torch.float64), count=n, epsilon_c=epsilon_c,
                                         tau=0.0, gamma=gamma, generator=torch.Generator().manual_seed(0))
    scale = sparse_vector_scales(epsilon_c=epsilon_c, gamma=gamma, count=n).value
    inside = values[values.abs() < gamma].numpy()
    assert inside.size > 5000
    assert stats.kstest(inside, _laplace_truncated_cdf(scale, gamma)).pvalue > 1e-3
    assert stats.kstest(inside, _laplace_truncated_cdf(1.5 * scale, gamma)).pvalue < 1e-6
    # the clipped tail carries the rest of the mass: P(|Lap| >= gamma) = exp(-gamma / scale)
    tail = float((values.abs() >= gamma).double().mean())
    assert tail == pytest.approx(math.exp(-gamma / scale), abs=0.004)


@pytest.mark.parametrize("delta, tau", [(0.5, 0.1), (0.05, 0.4)])
def test_svt_selection_probability_matches_threshold_and_candidate_noise(delta, tau):
    """One candidate is selected iff |bound(delta)| + Lap(2s) >= tau + Lap(s): compare the frequency over
    many uploads with that probability, integrated numerically."""
    gamma, epsilon_c, draws = 1.0, 10.0, 6000
    scales = sparse_vector_scales(epsilon_c=epsilon_c, gamma=gamma, count=1)
    margin = min(abs(delta), gamma) - tau

    def selected_given_threshold(rho):
        return stats.laplace.pdf(rho, scale=scales.threshold) * stats.laplace.sf(rho - margin, scale=scales.candidate)

    expected = integrate.quad(selected_given_threshold, -math.inf, math.inf)[0]
    generator = torch.Generator().manual_seed(1)
    update = torch.tensor([delta], dtype=torch.float64)
    hits = sum(
        sparse_vector_upload(update, count=1, epsilon_c=epsilon_c, tau=tau, gamma=gamma, generator=generator)[0].numel()
        for _ in range(draws)
    )
    assert stats.binomtest(hits, draws, expected).pvalue > 1e-3
    assert abs(expected - 0.5) > 0.05  # the noise scales matter here (not a coin flip either way)


def test_svt_upload_respects_count_and_gamma():
    generator = torch.Generator().manual_seed(2)
    delta = torch.randn(5000, generator=generator) * 1e-3
    for epsilon_c in (100.0, 0.01):
        index, values = sparse_vector_upload(delta, count=300, epsilon_c=epsilon_c, tau=1e-4, gamma=1e-3,
                                             generator=generator)
        assert 0 < index.numel() <= 300 and index.unique().numel() == index.numel()
        assert bounded_by(values, 1e-3)


def test_svt_with_vanishing_noise_is_threshold_selection():
    """As epsilon_c grows the mechanism becomes 'random values above tau, bounded by gamma'."""
    generator = torch.Generator().manual_seed(3)
    delta = torch.randn(2000, generator=generator, dtype=torch.float64)
    tau, gamma = 1.0, 1.5
    index, values = sparse_vector_upload(delta, count=2000, epsilon_c=1e9, tau=tau, gamma=gamma,
                                         generator=generator)
    assert set(index.tolist()) == set((delta.abs() >= tau).nonzero().flatten().tolist())
    assert torch.allclose(values, delta[index].clamp(-gamma, gamma), atol=1e-6)


# -- dssgd-dp as a defense ------------------------------------------------------------------------------------

def test_dssgd_dp_builds_from_yaml_values_and_rejects_bad_ones():
    defense = DEFENSES.build("dssgd-dp", {"epsilon_c": "1e-2", "tau": "1e-4", "theta_u": 0.1})
    assert defense.epsilon_c == 0.01 and defense.tau == 1e-4
    assert defense.label() == "dssgd-dp(epsilon_c=0.01, theta_u=0.1)"  # headline + non-defaults
    assert defense.privacy(steps=1, sample_rate=1.0)["epsilon"] is None  # model size not known yet
    for bad in ({"epsilon_c": 0}, {"gamma": -1.0}, {"theta_u": 0.0}, {"order": "shuffled"}):
        with pytest.raises(ConfigError) as err:
            DEFENSES.build("dssgd-dp", bad)
        assert list(bad)[0] in str(err.value) and "\n" not in str(err.value)


def test_dssgd_dp_transform_of_one_step_gradient(digits):
    train, _ = digits
    model = small_mlp(train)
    x, y = train.images[:16], one_hot(train.labels[:16], 10)
    defense = DEFENSES.build("dssgd-dp", {"epsilon_c": 10.0, "theta_u": 0.1})
    gradient = defense.compute_update(model, x, y)
    shared = defense.share(model, x, y, generator=torch.Generator().manual_seed(0))
    assert [s.shape for s in shared] == [g.shape for g in gradient]
    n = sum(g.numel() for g in gradient)
    c = upload_count(0.1, n)
    flat = torch.cat([s.flatten() for s in shared])
    assert 0 < int((flat != 0).sum()) <= c and bounded_by(flat, defense.gamma)
    privacy = defense.privacy(steps=1, sample_rate=1.0)
    assert privacy["max_shared_per_epoch"] == c == math.floor(0.1 * n)
    assert privacy["epsilon"] == pytest.approx(c * 10.0) and privacy["delta"] == 0.0


def _dp_accuracy(defense_name, params, digits, rounds):
    train, test = digits
    defense = DEFENSES.build(defense_name, {"order": "round-robin-async", **params})
    config = TrainingConfig(epochs=rounds, optimizer="sgd", lr=0.1, momentum=0.0, batch_size=32)
    return defense.accuracy_run(model=small_mlp(train), train=train, test=test, config=config, seed=0)


def test_tight_epsilon_leaves_accuracy_near_chance_while_loose_epsilon_learns(digits):
    """Hitaj et al. Figs. 12-13: at epsilon_c = 0.01 the model does not learn; at 100 it does (same
    protocol, tau 1e-4, gamma 1e-3, same rounds)."""
    tight = _dp_accuracy("dssgd-dp", {"epsilon_c": 0.01}, digits, rounds=20)
    loose = _dp_accuracy("dssgd-dp", {"epsilon_c": 100.0}, digits, rounds=20)
    chance = 1 / 10
    assert tight["params_uploaded"] > 0  # noise was uploaded: it is not learning, not idle
    # no better than chance or the untrained model (which may beat chance by luck)
    assert tight["accuracy"] <= max(chance, tight["initial_accuracy"]) + 0.05, tight["accuracy_per_round"]
    assert loose["accuracy"] >= 0.4 and loose["accuracy"] >= tight["accuracy"] + 0.25, loose["accuracy_per_round"]
    privacy = tight["privacy"]
    c = upload_count(1.0, tight["num_params"])
    assert privacy["epsilon"] == pytest.approx(c * 0.01)
    assert privacy["uploads"] == 20 and privacy["epsilon_basic_composition"] == pytest.approx(20 * c * 0.01)


# -- selective sharing as a defense ---------------------------------------------------------------------------

def test_selective_sharing_transform_shares_exactly_the_largest_fraction(digits):
    train, _ = digits
    model = small_mlp(train)
    x, y = train.images[:16], one_hot(train.labels[:16], 10)
    defense = DEFENSES.build("selective-sharing", {"theta_u": 0.1, "gamma": 0.01})
    gradient = torch.cat([g.flatten() for g in defense.compute_update(model, x, y)])
    shared = torch.cat([s.flatten() for s in defense.share(model, x, y)])
    c = upload_count(0.1, gradient.numel())
    nonzero = (shared != 0).nonzero().flatten()
    assert nonzero.numel() == c
    assert set(nonzero.tolist()) == set(torch.topk(gradient.abs(), c).indices.tolist())
    assert torch.equal(shared[nonzero], gradient[nonzero].clamp(-0.01, 0.01))


def test_selective_sharing_accuracy_runs_the_protocol(digits):
    out = _dp_accuracy("selective-sharing", {"theta_u": 0.1}, digits, rounds=4)
    assert out["setting"] == "collaborative" and out["rounds"] == 4
    assert out["accuracy"] >= 0.6 and "privacy" not in out
    per_round_upload = 2 * upload_count(0.1, out["num_params"])
    assert out["params_uploaded"] == 4 * per_round_upload


# -- DP-SGD ---------------------------------------------------------------------------------------------------

def test_per_example_gradients_match_one_at_a_time(digits):
    train, _ = digits
    model = small_mlp(train)
    x, y = train.images[:6], one_hot(train.labels[:6], 10)
    batched = per_example_gradients(model, x, y)
    for i in range(6):
        single = parameter_gradients(model, x[i:i + 1], y[i:i + 1])
        for b, s in zip(batched, single):
            assert torch.allclose(b[i], s, atol=1e-6)


def test_dp_sgd_clips_each_example_then_averages(digits):
    train, _ = digits
    model = small_mlp(train)
    x, y = train.images[:8], one_hot(train.labels[:8], 10)
    clip = 0.05
    defense = DEFENSES.build("dp-sgd", {"noise_multiplier": 0.0, "max_grad_norm": clip})
    update = defense.compute_update(model, x, y)
    expected = [torch.zeros_like(u) for u in update]
    for i in range(8):
        single = parameter_gradients(model, x[i:i + 1], y[i:i + 1])
        norm = torch.cat([g.flatten() for g in single]).norm()
        assert norm > clip  # the bound binds for every example here
        for e, g in zip(expected, single):
            e += g * (clip / (norm + 1e-6)) / 8
    assert all(torch.allclose(u, e, atol=1e-7) for u, e in zip(update, expected))
    unclipped = DEFENSES.build("dp-sgd", {"noise_multiplier": 0.0, "max_grad_norm": 1e6}).compute_update(model, x, y)
    assert all(torch.allclose(u, g, atol=1e-6) for u, g in zip(unclipped, parameter_gradients(model, x, y)))


def test_dp_sgd_noise_has_the_stated_std(digits):
    train, _ = digits
    model = small_mlp(train)
    x, y = train.images[:4], one_hot(train.labels[:4], 10)
    sigma, clip, batch = 2.0, 0.5, 4
    defense = DEFENSES.build("dp-sgd", {"noise_multiplier": sigma, "max_grad_norm": clip})
    a, b = (torch.cat([u.flatten() for u in defense.compute_update(model, x, y, generator=g)])
            for g in (torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)))
    # the clipped mean is the same in both; the difference is noise with variance 2 (sigma C / B)^2
    assert float((a - b).std() / math.sqrt(2)) == pytest.approx(sigma * clip / batch, rel=0.05)


@pytest.mark.parametrize("noise_multiplier, sample_rate, steps",
                         [(1.0, 0.01, 1000), (0.7, 64 / 8776, 250), (4.0, 0.5, 3)])
def test_dp_sgd_epsilon_matches_opacus_accountant(noise_multiplier, sample_rate, steps):
    from opacus.accountants import RDPAccountant

    defense = DEFENSES.build("dp-sgd", {"noise_multiplier": noise_multiplier, "delta": 1e-5})
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    privacy = defense.privacy(steps=steps, sample_rate=sample_rate)
    assert privacy["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
    assert privacy["delta"] == 1e-5 and privacy["accountant"] == "rdp"


def test_dp_sgd_inside_the_protocol_learns_and_accounts_per_participant(digits):
    from opacus.accountants import RDPAccountant

    out = _dp_accuracy("dp-sgd", {"noise_multiplier": 0.5, "max_grad_norm": 1.0}, digits, rounds=6)
    assert out["accuracy"] >= 0.5, out["accuracy_per_round"]
    privacy = out["privacy"]
    for steps, samples, epsilon in zip(out["local_steps"], out["participant_samples"],
                                       privacy["epsilon_per_participant"]):
        accountant = RDPAccountant()
        for _ in range(steps):
            accountant.step(noise_multiplier=0.5, sample_rate=32 / samples)
        assert epsilon == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
    assert privacy["epsilon"] == max(privacy["epsilon_per_participant"]) > 0


def test_dp_sgd_centralized_setting_reports_epsilon_of_its_steps(digits):
    train, test = digits
    defense = DEFENSES.build("dp-sgd", {"noise_multiplier": 1.0, "accuracy_setting": "centralized"})
    config = TrainingConfig(epochs=1, batch_size=64, lr=0.01)
    out = defense.accuracy_run(model=small_mlp(train), train=train, test=test, config=config, seed=0)
    assert out["train_steps"] == math.ceil(len(train) / 64)
    assert out["privacy"]["epsilon"] == pytest.approx(
        defense.privacy(steps=out["train_steps"], sample_rate=64 / len(train))["epsilon"])


# -- real MNIST -----------------------------------------------------------------------------------------------

@pytest.mark.realdata
def test_tight_epsilon_does_not_learn_on_mnist():
    data_dir = os.environ.get("LEAKBENCH_DATA_DIR")
    if not data_dir or not Path(data_dir, "mnist").is_dir():
        pytest.skip("real MNIST needs LEAKBENCH_DATA_DIR with an mnist/ mirror")
    train = load("mnist", "train", data_dir=data_dir, scale="[-1,1]").subset(torch.arange(2000))
    test = load("mnist", "test", data_dir=data_dir, scale="[-1,1]").subset(torch.arange(1000))
    model = build_model("hitaj-mnist-cnn", train.shape, train.num_classes, seed=0)
    defense = DEFENSES.build("dssgd-dp", {"epsilon_c": 0.01, "local_batches": 5})
    config = TrainingConfig(epochs=3, optimizer="sgd", lr=0.1, momentum=0.0, batch_size=64)
    out = defense.accuracy_run(model=model, train=train, test=test, config=config, seed=0)
    assert out["params_uploaded"] > 0
    assert out["accuracy"] <= max(0.1, out["initial_accuracy"]) + 0.05, out["accuracy_per_round"]
    assert out["privacy"]["epsilon"] == pytest.approx(upload_count(1.0, out["num_params"]) * 0.01)
