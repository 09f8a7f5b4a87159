"""Each defense's transformation, and properties every registered gradient defense must keep."""
import math

import pytest
import torch
import torch.nn.functional as F

from leakbench.defenses.pruning import prune_smallest
from leakbench.defenses.quantization import int8_roundtrip
from leakbench.models import build_model
from leakbench.registry import DEFENSES


def _update(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(12, 1, 5, 5, generator=g) * 0.1, torch.randn(12, generator=g),
            torch.randn(10, 108, generator=g) * 0.01, torch.randn(10, generator=g)]


@pytest.mark.parametrize("name", DEFENSES.list())
def test_every_defense_keeps_shapes_dtypes_and_is_seeded(name):
    defense = DEFENSES.build(name)
    update = _update()
    a = defense.transform(update, generator=torch.Generator().manual_seed(1))
    b = defense.transform(update, generator=torch.Generator().manual_seed(1))
    assert [t.shape for t in a] == [t.shape for t in update]
    assert [t.dtype for t in a] == [t.dtype for t in update]
    assert all(torch.isfinite(t).all() for t in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "same seed must give the same shared update"
    assert all(torch.equal(u, v) for u, v in zip(update, _update())), "transform must not modify its input"


@pytest.mark.parametrize("name", DEFENSES.list())
def test_every_defense_shares_a_gradient_of_a_real_model(name):
    model = build_model("lenet-zhu", (1, 12, 12), 10, seed=0)
    x = torch.rand(2, 1, 12, 12)
    y = F.one_hot(torch.tensor([3, 7]), 10).float()
    shared = DEFENSES.build(name).share(model, x, y, generator=torch.Generator().manual_seed(0))
    assert [s.shape for s in shared] == [p.shape for p in model.parameters()]
    assert all(p.grad is None for p in model.parameters())


def test_none_shares_the_update_unchanged():
    update = _update()
    assert all(torch.equal(a, b) for a, b in zip(DEFENSES.build("none").transform(update), update))


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.2, 0.5, 0.7, 0.99, 1.0])
def test_pruning_zeroes_exactly_the_requested_fraction_of_smallest_entries(ratio):
    t = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    out = prune_smallest(t, ratio)
    k = int(ratio * t.numel())
    assert int((out == 0).sum()) == k
    kept = out != 0
    if 0 < k < t.numel():
        assert t[~kept].abs().max() <= t[kept].abs().min()  # the pruned are the smallest
    assert torch.equal(out[kept], t[kept])


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_pruning_defense_scopes(scope):
    update = _update()
    out = DEFENSES.build("pruning", {"ratio": 0.3, "scope": scope}).transform(update)
    if scope == "layer":
        for u, o in zip(update, out):
            assert int((o == 0).sum()) == int(0.3 * u.numel())
    else:
        total = sum(u.numel() for u in update)
        assert sum(int((o == 0).sum()) for o in out) == int(0.3 * total)


def test_int8_roundtrip_error_is_bounded_by_half_a_step():
    t = torch.randn(10_000, generator=torch.Generator().manual_seed(4)) * 3
    out = int8_roundtrip(t)
    scale = t.abs().max() / 127
    assert (out - t).abs().max() <= scale / 2 + 1e-6
    assert len(torch.unique(out)) <= 255
    assert torch.equal(int8_roundtrip(torch.zeros(5)), torch.zeros(5))


def test_half_precision_round_trips_match_the_formats():
    update = _update()
    fp16 = DEFENSES.build("quantization", {"format": "fp16"}).transform(update)
    bf16 = DEFENSES.build("quantization", {"format": "bf16"}).transform(update)
    for u, a, b in zip(update, fp16, bf16):
        assert torch.equal(a, u.half().float())
        assert torch.equal(b, u.bfloat16().float())
        assert (a - u).abs().max() <= u.abs().max() * 2 ** -11 + 1e-7
    big = DEFENSES.build("quantization", {"format": "fp16"}).transform([torch.tensor([1e6, -1e6])])
    assert torch.isfinite(big[0]).all(), "fp16 saturates instead of overflowing to inf"


@pytest.mark.parametrize("name", ["gaussian-noise", "laplacian-noise"])
@pytest.mark.parametrize("variance", [1e-4, 1e-2])
def test_noise_has_the_requested_variance_and_distribution(name, variance):
    from scipy import stats

    zeros = [torch.zeros(200_000, dtype=torch.float64)]
    noise = DEFENSES.build(name, {"variance": variance}).transform(
        zeros, generator=torch.Generator().manual_seed(5))[0].numpy()
    assert abs(noise.mean()) < 5 * math.sqrt(variance / len(noise))
    assert noise.var() == pytest.approx(variance, rel=0.02)
    if name == "gaussian-noise":
        ref = stats.norm(scale=math.sqrt(variance))
    else:
        ref = stats.laplace(scale=math.sqrt(variance / 2))
    assert stats.kstest(noise[:20_000], ref.cdf).pvalue > 1e-3


def test_large_batch_sets_the_victim_batch_size():
    assert DEFENSES.build("large-batch", {"batch_size": 16}).victim_batch_size(1) == 16
    assert DEFENSES.build("none").victim_batch_size(3) == 3


@pytest.mark.parametrize("variance", [1e-4, 1e-2])
def test_relative_distortion_reads_noise_against_the_gradient_size(variance):
    """A record's relative distortion is |shared - clean| / |clean|: 0 for no defense, and for noise of
    variance v about sqrt(v) / RMS(gradient), so the same variance hides more of a smaller gradient."""
    from leakbench.scoring.update import update_distortion
    from leakbench.threat import parameter_gradients

    model = build_model("lenet-zhu", (1, 8, 8), 10, seed=0)
    x, soft = torch.rand(1, 1, 8, 8), F.one_hot(torch.tensor([3]), 10).float()
    clean = parameter_gradients(model, x, soft)
    none = update_distortion(clean, DEFENSES.build("none").share(model, x, soft))
    assert none["relative_distortion"] == 0.0 and none["gradient_rms"] > 0
    noisy = update_distortion(clean, DEFENSES.build("gaussian-noise", {"variance": variance}).share(
        model, x, soft, generator=torch.Generator().manual_seed(0)))
    expected = math.sqrt(variance) / noisy["gradient_rms"]
    assert noisy["relative_distortion"] == pytest.approx(expected, rel=0.05)
    smaller = update_distortion([c / 10 for c in clean], [c / 10 + (s - c) for c, s in zip(
        clean, DEFENSES.build("gaussian-noise", {"variance": variance}).share(
            model, x, soft, generator=torch.Generator().manual_seed(0)))])
    assert smaller["relative_distortion"] == pytest.approx(10 * noisy["relative_distortion"], rel=1e-6)
    assert update_distortion(clean, clean[:-1])["relative_distortion"] is None  # another shape: not compared
