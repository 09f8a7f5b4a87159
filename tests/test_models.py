"""The CIFAR ResNets as the DLG paper ran them (section 4.1: sigmoid for ReLU, no strides)."""
import pytest
import torch
from leakbench.models import build_model
from leakbench.threat import soft_cross_entropy
from torch import nn

RESNETS = ["resnet20-sigmoid", "resnet56-sigmoid"]

# He et al. (CVPR 2016) Table 6 gives 0.27M parameters for ResNet-20 and 0.85M for ResNet-56 on CIFAR-10.
# Exactly, with option-A (parameter-free) shortcuts, bias-free convolutions and BatchNorm: 3x3 convolutions
# 3*16*9 + 2n blocks' convs per stage (16->16, 16->32 then 32->32, 32->64 then 64->64), BatchNorm
# 2 * (16 + 2n*(16 + 32 + 64)), linear 64*10 + 10: 269,722 for n = 3 and 853,018 for n = 9 (the counts
# akamaster/pytorch_resnet_cifar10 prints for its resnet20 and resnet56).
STANDARD_CIFAR10_COUNTS = {"resnet20-sigmoid": 269_722, "resnet56-sigmoid": 853_018}


@pytest.mark.parametrize("name", RESNETS)
def test_parameter_count_matches_he_et_al(name):
    model = build_model(name, (3, 32, 32), 10, batchnorm=True)
    assert sum(p.numel() for p in model.parameters()) == STANDARD_CIFAR10_COUNTS[name]
    # without BatchNorm each convolution carries a bias instead of BatchNorm's scale and shift
    without = build_model(name, (3, 32, 32), 10, batchnorm=False)
    convs = [m for m in without.modules() if isinstance(m, nn.Conv2d)]
    assert sum(p.numel() for p in without.parameters()) == (
        STANDARD_CIFAR10_COUNTS[name] - sum(c.out_channels for c in convs))


@pytest.mark.parametrize("name", RESNETS)
@pytest.mark.parametrize("batchnorm", [False, True])
def test_no_strides_and_output_shape(name, batchnorm):
    model = build_model(name, (1, 8, 8), 7, width=0.25, batchnorm=batchnorm)
    x = torch.rand(3, 1, 8, 8)
    assert model(x).shape == (3, 7)
    assert all(m.stride == (1, 1) for m in model.modules() if isinstance(m, nn.Conv2d))
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in model.modules())
    assert model.features(x).shape == (3, 16, 8, 8)  # width 0.25: 4/8/16 filters, spatial size kept
    assert all(isinstance(m, nn.Sigmoid) for m in model.modules() if isinstance(m, (nn.ReLU, nn.Sigmoid)))


@pytest.mark.parametrize("name", RESNETS)
@pytest.mark.parametrize("batchnorm", [False, True])
def test_twice_differentiable(name, batchnorm):
    """What DLG needs: the gradient of the gradient's norm w.r.t. the input exists, finite and non-zero."""
    model = build_model(name, (3, 8, 8), 10, seed=1, width=0.25, batchnorm=batchnorm)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    labels = torch.nn.functional.one_hot(torch.tensor([1, 4]), 10).float()
    grads = torch.autograd.grad(soft_cross_entropy(model(x), labels), list(model.parameters()), create_graph=True)
    (second,) = torch.autograd.grad(sum((g ** 2).sum() for g in grads), x)
    assert torch.isfinite(second).all() and second.abs().max() > 0


def test_seeded_and_width_scaled():
    a = build_model("resnet20-sigmoid", (3, 8, 8), 10, seed=3, width=0.5)
    b = build_model("resnet20-sigmoid", (3, 8, 8), 10, seed=3, width=0.5)
    c = build_model("resnet20-sigmoid", (3, 8, 8), 10, seed=4, width=0.5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert a.fc.in_features == 32


def _update_gap(model, first, second, label) -> float:
    """||g(first) - g(second)||^2 / ||g(first)||^2 for the updates of two images with one label."""
    g1 = torch.autograd.grad(soft_cross_entropy(model(first), label), list(model.parameters()))
    g2 = torch.autograd.grad(soft_cross_entropy(model(second), label), list(model.parameters()))
    return sum(float(((a - b) ** 2).sum()) for a, b in zip(g1, g2)) / sum(float((a ** 2).sum()) for a in g1)


@pytest.mark.parametrize("name", RESNETS)
def test_default_update_depends_on_the_image(name):
    """The defaults (BatchNorm, PyTorch's init) keep the input in the update, which a gradient-matching
    attack needs; without BatchNorm the sigmoids on the identity path all but erase it (the spec's
    docstring)."""
    first, second = torch.rand(2, 1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    label = torch.nn.functional.one_hot(torch.tensor([3]), 10).float()
    with_bn = _update_gap(build_model(name, (3, 8, 8), 10, seed=0, width=0.5), first, second, label)
    without = _update_gap(build_model(name, (3, 8, 8), 10, seed=0, width=0.5, batchnorm=False), first, second, label)
    assert without < 1e-3 * with_bn, (with_bn, without)
