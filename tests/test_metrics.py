
import pytest
import torch

from leakbench.errors import ConfigError
from leakbench.registry import METRICS
from leakbench.scoring.reconstruction import RecognisabilityRule, match_reconstructions, score_reconstruction


def test_metrics_declare_direction_and_accumulate():
    assert METRICS.get("psnr").higher_is_better and METRICS.get("ssim").higher_is_better
    assert not METRICS.get("mse").higher_is_better
    m = METRICS.build("mse")
    x = torch.rand(3, 1, 12, 12)
    m.update(x, x)
    m.update(x, x * 0)
    values = m.compute()
    assert values.shape == (6,)
    assert torch.allclose(values[:3], torch.zeros(3))
    assert torch.allclose(values[3:], (x ** 2).flatten(1).mean(1))


def test_psnr_and_ssim_on_known_cases():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    noisy = (x + 0.1).clamp(0, 1)
    mse = ((noisy - x) ** 2).flatten(1).mean(1)
    assert torch.allclose(METRICS.build("psnr").update(noisy, x), 10 * torch.log10(1 / mse))
    assert torch.allclose(METRICS.build("ssim").update(x, x), torch.ones(2), atol=1e-5)
    other = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(99))
    assert (METRICS.build("ssim").update(other, x) < 0.2).all()
    assert METRICS.build("psnr").update(x, x).max() == 100.0


def test_hungarian_matching_recovers_the_permutation():
    g = torch.Generator().manual_seed(1)
    originals = torch.rand(6, 1, 8, 8, generator=g)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    recon = originals[perm] + 0.01 * torch.randn(6, 1, 8, 8, generator=g)
    matched = match_reconstructions(recon, originals)
    assert torch.equal(perm[torch.as_tensor(matched)], torch.arange(6))
    scores = score_reconstruction(recon, originals, torch.tensor([9, 9, 9, 9, 9, 9])[perm], torch.full((6,), 9))
    assert max(scores["mse"]) < 1e-3 and scores["label_correct"] == [1.0] * 6


def test_recognisability_rule():
    rule = RecognisabilityRule(metric="ssim", threshold=0.3, max_leak_rate=0.25)
    assert rule.recognisable([0.9, 0.29, 0.3]) == [True, False, True]
    assert rule.leak_rate([0.9, 0.1, 0.1, 0.1]) == 0.25 and rule.defended(0.25) and not rule.defended(0.5)
    lower = RecognisabilityRule(metric="mse", threshold=0.01)
    assert lower.recognisable([0.001, 0.1]) == [True, False]
    assert "ssim >= 0.3" in rule.describe()


@pytest.mark.parametrize("cfg, message", [
    ({"metric": "sim"}, "Did you mean 'ssim'"),
    ({"threshold": "high"}, "verdict.threshold"),
    ({"max_leak_rate": 2}, "verdict.max_leak_rate"),
    ({"thresh": 1}, "unknown key 'thresh'"),
])
def test_rule_config_errors(cfg, message):
    with pytest.raises(ConfigError, match=message):
        RecognisabilityRule.from_config(cfg)
