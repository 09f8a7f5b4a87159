"""Registered model architectures. A model component is a spec that builds an ``nn.Module`` for a data shape."""
from __future__ import annotations

import torch
from torch import nn

from .params import Component, Param
from .registry import register_model

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


class ModelSpec(Component):
    """Small abstract base: ``create(input_shape, num_classes, generator)`` returns a fresh module."""

    def create(self, input_shape: tuple[int, int, int], num_classes: int, *,
               generator: torch.Generator | None = None) -> nn.Module:
        raise NotImplementedError

    @property
    def twice_differentiable(self) -> bool:
        """Gradient-matching attacks need smooth activations (the DLG paper swaps ReLU for sigmoid)."""
        return getattr(self, "activation", "sigmoid") != "relu"


def _init_uniform_(module: nn.Module, bound: float, generator: torch.Generator | None) -> None:
    # The DLG reference code initialises every weight and bias uniform(-0.5, 0.5).
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)


def _init_default_(module: nn.Module, generator: torch.Generator | None) -> None:
    # PyTorch's default init (kaiming_uniform with a=sqrt(5) gives bound 1/sqrt(fan_in) for weights and
    # biases), drawn from our generator so a model is reproducible per seed.
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                bound = 1.0 / fan_in ** 0.5
                m.weight.copy_((torch.rand(m.weight.shape, generator=generator) * 2 - 1) * bound)
                if m.bias is not None:
                    m.bias.copy_((torch.rand(m.bias.shape, generator=generator) * 2 - 1) * bound)


class LeNetZhu(nn.Module):
    """The DLG paper's LeNet: three 5x5 convolutions (12 channels, strides 2, 2, 1), one linear layer."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, activation: str = "sigmoid") -> None:
        super().__init__()
        act = ACTIVATIONS[activation]
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 12, kernel_size=5, padding=2, stride=2), act(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2), act(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1), act(),
        )
        side = (image_size + 1) // 2
        side = (side + 1) // 2
        self.fc = nn.Linear(12 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


@register_model("lenet-zhu")
class LeNetZhuSpec(ModelSpec):
    params = (
        Param("activation", str, "sigmoid", "activation after each convolution", choices=tuple(ACTIVATIONS)),
        Param("init", str, "uniform", "'uniform': U(-0.5, 0.5) like the DLG reference code; 'default': PyTorch's",
              choices=("uniform", "default")),
    )

    def create(self, input_shape, num_classes, *, generator=None):
        c, h, w = input_shape
        if h != w:
            raise ValueError(f"lenet-zhu needs square images, got {h}x{w}")
        model = LeNetZhu(c, h, num_classes, self.activation)
        if self.init == "uniform":
            _init_uniform_(model, 0.5, generator)
        else:
            _init_default_(model, generator)
        return model


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int, activation: str) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_model("mlp")
class MLPSpec(ModelSpec):
    params = (
        Param("hidden", int, 256, "width of the hidden layer", low=1),
        Param("depth", int, 1, "number of hidden layers", low=0, high=8),
        Param("activation", str, "sigmoid", "hidden activation", choices=tuple(ACTIVATIONS)),
        Param("init", str, "default", "'uniform': U(-0.5, 0.5); 'default': PyTorch's", choices=("uniform", "default")),
    )

    def create(self, input_shape, num_classes, *, generator=None):
        c, h, w = input_shape
        model = MLP(c * h * w, (self.hidden,) * self.depth, num_classes, self.activation)
        if self.init == "uniform":
            _init_uniform_(model, 0.5, generator)
        else:
            _init_default_(model, generator)
        return model


def build_model(name: str, input_shape, num_classes: int, *, seed: int = 0, **params) -> nn.Module:
    from .registry import MODELS

    generator = torch.Generator().manual_seed(seed)
    return MODELS.build(name, params).create(tuple(input_shape), num_classes, generator=generator)
