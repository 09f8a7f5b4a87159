"""Registered model architectures. A model component is a spec that builds an ``nn.Module`` for a data shape."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .params import Component, Param
from .registry import MODELS, register_model

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


# --- He et al. (CVPR 2016) CIFAR ResNets as the DLG paper ran them (Zhu et al. 2019, section 4.1) ---------

class _SigmoidBasicBlock(nn.Module):
    """A basic block: two 3x3 convolutions, no strides, sigmoid after the first and after the sum.
    The shortcut is He et al.'s option A, parameter-free: the identity, zero-padded with channels when the
    block widens (their option A also subsamples; with the strides removed nothing is subsampled)."""

    def __init__(self, in_planes: int, planes: int, batchnorm: bool, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=not batchnorm)
        self.bn1 = _norm(planes, batchnorm)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=not batchnorm)
        self.bn2 = _norm(planes, batchnorm)
        self.act = ACTIVATIONS[activation]()
        self.extra_channels = planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels)) if self.extra_channels else x
        return self.act(out + shortcut)


def _norm(planes: int, batchnorm: bool) -> nn.Module:
    # batch statistics in train and eval mode alike (no running buffers): the victim computes its update
    # and the attacker its dummy update through the same function, and the vectorised engine, which
    # cannot write running statistics under vmap, evaluates it unchanged
    return nn.BatchNorm2d(planes, track_running_stats=False) if batchnorm else nn.Identity()


class SigmoidCifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet-(6n+2): a 3x3 convolution, three stages of ``n`` basic blocks with 16, 32
    and 64 filters (times ``width``), global average pooling, one linear layer; with the two changes of the
    DLG paper: sigmoid for ReLU, and no strides (every stage keeps the input's spatial size)."""

    def __init__(self, in_channels: int, num_classes: int, *, blocks_per_stage: int, width: float = 1.0,
                 batchnorm: bool = True, activation: str = "sigmoid") -> None:
        super().__init__()
        widths = [max(1, round(w * width)) for w in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=not batchnorm)
        self.bn1 = _norm(widths[0], batchnorm)
        self.act = ACTIVATIONS[activation]()
        blocks, planes = [], widths[0]
        for stage_width in widths:
            for _ in range(blocks_per_stage):
                blocks.append(_SigmoidBasicBlock(planes, stage_width, batchnorm, activation))
                planes = stage_width
        self.stages = nn.Sequential(*blocks)
        self.fc = nn.Linear(planes, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (spatial size = the input's: no strides)."""
        return self.stages(self.act(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class _SigmoidResNetSpec(ModelSpec):
    """A CIFAR ResNet as the DLG paper ran it, at random initialisation.

    BatchNorm: on by default, for two reasons. The paper names two changes to He et al.'s network,
    sigmoid for ReLU and no strides (section 4.1), not a third; the reference repository's ResNet code
    (mit-han-lab/dlg, models/vision.py) keeps BatchNorm as well. And without it the sigmoid network
    forgets its input: every block ends in a sigmoid on the identity path (slope at most 1/4), so at a
    random init two different CIFAR-100 images with the same label give updates that differ by
    ||g1 - g2||^2 = 6e-13 for ResNet-20 and 9e-15 for ResNet-56 (||g||^2 about 30), nothing a
    gradient-matching attack can recover an image from; with BatchNorm they differ by 4e-2 and 5e-2.
    BatchNorm uses batch statistics in train and eval mode alike (no running buffers), so the victim's
    update and the attacker's dummy update go through the same function; for a single image they are
    statistics over its pixels (the spatial size is kept). ``batchnorm: false`` puts a bias on each
    convolution instead. Parameter counts with BatchNorm equal He et al.'s: 269,722 (ResNet-20) and
    853,018 (ResNet-56) for 32x32x3 inputs and 10 classes.

    Init: PyTorch's default U(+-1/sqrt(fan_in)) by default; the DLG reference's U(-0.5, 0.5) saturates the
    sigmoids of these deep networks (updates of two images differ by 3e-9 with BatchNorm).
    """

    blocks_per_stage: int
    params = (
        Param("width", float, 1.0, "multiplier of the 16/32/64 filters per stage (CPU-scale reductions)",
              low=0.0625, high=8.0),
        Param("batchnorm", bool, True, "BatchNorm after each convolution (batch statistics); see the docstring"),
        Param("activation", str, "sigmoid", "activation (the DLG paper: sigmoid for ReLU)", choices=tuple(ACTIVATIONS)),
        Param("init", str, "default", "'default': PyTorch's U(+-1/sqrt(fan_in)); 'uniform': U(-0.5, 0.5) like "
              "the DLG reference's weights_init", choices=("uniform", "default")),
    )

    def create(self, input_shape, num_classes, *, generator=None):
        model = SigmoidCifarResNet(input_shape[0], num_classes, blocks_per_stage=self.blocks_per_stage,
                                   width=self.width, batchnorm=self.batchnorm, activation=self.activation)
        if self.init == "uniform":
            _init_uniform_(model, 0.5, generator)
        else:
            _init_default_(model, generator)  # BatchNorm keeps its identity init (weight 1, bias 0)
        return model


@register_model("resnet20-sigmoid")
class ResNet20SigmoidSpec(_SigmoidResNetSpec):
    __doc__ = "ResNet-20 (n = 3 blocks per stage). " + _SigmoidResNetSpec.__doc__
    blocks_per_stage = 3


@register_model("resnet56-sigmoid")
class ResNet56SigmoidSpec(_SigmoidResNetSpec):
    __doc__ = "ResNet-56 (n = 9 blocks per stage), the model of the DLG paper's Fig. 3. " + _SigmoidResNetSpec.__doc__
    blocks_per_stage = 9


# --- ResNet-18 for CIFAR with BatchNorm (the network of the Inverting Gradients paper and breaching) -----

class _BasicBlock(nn.Module):
    """He et al.'s basic block: two 3x3 convolutions with BatchNorm, the activation after the first and
    after the sum; a 1x1 convolution with BatchNorm on the shortcut where the shape changes (option B)."""

    def __init__(self, in_planes: int, planes: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act = ACTIVATIONS[activation]()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet18(nn.Module):
    """ResNet-18 as CIFAR code writes it (kuangliu/pytorch-cifar, breaching's ``ResNet18``): a 3x3
    convolution without pooling, four stages of two basic blocks with 64/128/256/512 filters (times
    ``width``) and strides 1, 2, 2, 2, global average pooling, one linear layer. BatchNorm keeps running
    statistics: in train mode it normalises by the batch, in eval mode by those statistics (the threat's
    ``bn_mode`` says which the victim used)."""

    def __init__(self, in_channels: int, num_classes: int, *, width: float = 1.0, activation: str = "relu") -> None:
        super().__init__()
        widths = [max(1, round(w * width)) for w in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act = ACTIVATIONS[activation]()
        blocks, planes = [], widths[0]
        for stage, stage_width in enumerate(widths):
            for b in range(2):
                blocks.append(_BasicBlock(planes, stage_width, 2 if stage > 0 and b == 0 else 1, activation))
                planes = stage_width
        self.stages = nn.Sequential(*blocks)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.act(self.bn1(self.conv1(x)))).mean(dim=(2, 3)))


@register_model("resnet18")
class ResNet18Spec(ModelSpec):
    """ResNet-18 for CIFAR-sized images with BatchNorm (running statistics), ReLU by default: the trained
    ReLU network with BatchNorm that the field attacks today (Geiping et al. 2020). 11,173,962
    parameters at width 1 for 32x32x3 inputs and 10 classes; ``width`` scales the filters for CPU runs.
    With ReLU the gradient's own gradient w.r.t. the input exists but is piecewise constant in places;
    ``activation: sigmoid`` or ``tanh`` give a smooth network for L-BFGS attacks."""

    params = (
        Param("width", float, 1.0, "multiplier of the 64/128/256/512 filters per stage (CPU-scale reductions)",
              low=0.0625, high=4.0),
        Param("activation", str, "relu", "activation (ReLU as He et al.)", choices=tuple(ACTIVATIONS)),
    )

    def create(self, input_shape, num_classes, *, generator=None):
        model = CifarResNet18(input_shape[0], num_classes, width=self.width, activation=self.activation)
        _init_default_(model, generator)  # BatchNorm keeps its identity init (weight 1, bias 0)
        return model


def build_model(name: str, input_shape, num_classes: int, *, seed: int = 0, **params) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    return MODELS.build(name, params).create(tuple(input_shape), num_classes, generator=generator)


# --- Hitaj et al. (CCS 2017) Section 8.3: the collaboratively trained models -------------------------
#
# Both end in LogSoftMax like the Torch7 originals. leakbench's losses (``threat.soft_cross_entropy``,
# ``F.cross_entropy``) apply log_softmax to whatever the model returns; log_softmax is idempotent
# (log_softmax(log_softmax(z)) == log_softmax(z), since the outputs already log-sum-exp to 0), so
# feeding these log-probabilities in as "logits" gives exactly the intended NLL loss.

class HitajMNISTCNN(nn.Module):
    """Figure 15 (the Torch7 MNIST demo convnet): conv 5x5 1->32, tanh, max-pool 3x3/3, conv 5x5 32->64,
    tanh, max-pool 2x2/2, linear 256 -> 200, tanh, linear 200 -> outputs, log-softmax.

    The text gives the flattened size (256) but not the pooling windows; 3x3/3 then 2x2/2 is the only
    reading of the Torch7 demo that yields 64 x 2 x 2 = 256 for the paper's 32x32 input
    (32 -conv-> 28 -pool-> 9 -conv-> 5 -pool-> 2). It also yields 256 for unpadded 28x28 MNIST
    (28 -> 24 -> 8 -> 4 -> 2).
    """

    def __init__(self, in_channels: int, image_size: int, outputs: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=5), nn.Tanh(), nn.MaxPool2d(3, 3),
            nn.Conv2d(32, 64, kernel_size=5), nn.Tanh(), nn.MaxPool2d(2, 2),
        )
        flat = _flat_size(self.features, in_channels, image_size)
        self.classifier = nn.Sequential(nn.Linear(flat, 200), nn.Tanh(), nn.Linear(200, outputs),
                                        nn.LogSoftmax(dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class HitajATTCNN(nn.Module):
    """Figure 17 (AT&T faces, 64x64): three convolutions each followed by tanh and max pooling, then
    fully connected layers with tanh, 40 + 1 outputs, log-softmax.

    Figure 17 did not survive the text extraction, so the widths are our reading: the MNIST net's
    pattern extended by one stage (5x5 convolutions with 32, 64, 128 planes, 2x2 pooling, a 200-unit
    hidden layer). For 64x64 input: 64 -> 60 -> 30 -> 26 -> 13 -> 9 -> 4, so 128 x 4 x 4 = 2048 -> 200.
    """

    def __init__(self, in_channels: int, image_size: int, outputs: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=5), nn.Tanh(), nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, kernel_size=5), nn.Tanh(), nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, kernel_size=5), nn.Tanh(), nn.MaxPool2d(2, 2),
        )
        flat = _flat_size(self.features, in_channels, image_size)
        self.classifier = nn.Sequential(nn.Linear(flat, 200), nn.Tanh(), nn.Linear(200, outputs),
                                        nn.LogSoftmax(dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _flat_size(features: nn.Module, in_channels: int, image_size: int) -> int:
    """Width of the flattened feature map for a square input (a dry run, so odd sizes fail clearly)."""
    with torch.no_grad():
        try:
            out = features(torch.zeros(1, in_channels, image_size, image_size))
        except RuntimeError as exc:
            raise ValueError(f"input of {image_size}x{image_size} is too small for this network ({exc})") from None
    return int(out.numel())


class _HitajSpec(ModelSpec):
    params = (
        Param("extra_class", bool, True,
              "one output more than the data has classes: the adversary's artificial class (Hitaj et al.)"),
    )
    network: type[nn.Module]

    def create(self, input_shape, num_classes, *, generator=None):
        c, h, w = input_shape
        if h != w:
            raise ValueError(f"{self.registry_name} needs square images, got {h}x{w}")
        model = self.network(c, h, num_classes + int(self.extra_class))
        _init_default_(model, generator)  # Torch7's default reset: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        return model


@register_model("hitaj-mnist-cnn")
class HitajMNISTCNNSpec(_HitajSpec):
    """Hitaj et al. Figure 15 MNIST CNN (paper input: 32x32, scaled to [-1, 1])."""

    network = HitajMNISTCNN


@register_model("hitaj-att-cnn")
class HitajATTCNNSpec(_HitajSpec):
    """Hitaj et al. Figure 17 AT&T faces CNN (paper input: 64x64, scaled to [-1, 1])."""

    network = HitajATTCNN


def output_width(model: nn.Module, input_shape) -> int:
    """How many outputs (classes) a model has, e.g. classes + 1 for the Hitaj models' artificial class.
    One-hot labels are sized to this so every model trains and is attacked through the same loss."""
    param = next(model.parameters())
    with torch.no_grad():
        was_training = model.training
        model.eval()
        width = int(model(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype)).shape[-1])
        model.train(was_training)
    return width


# --- DLG Section 4.2: BERT's masked language model ---------------------------------------------------

class MaskedLMVictim(nn.Module):
    """A masked LM seen as a classifier of its masked positions: ``forward(input_ids)`` returns the
    logits at ``positions`` only, one row per masked token, so that the victim's shared gradient of
    ``soft_cross_entropy(logits, one-hot originals)`` is BERT's MLM loss (mean over the masked tokens)
    and every defense's ``share`` applies to it unchanged. Its parameters are the masked LM's."""

    def __init__(self, mlm: nn.Module, positions: torch.Tensor) -> None:
        super().__init__()
        self.mlm = mlm
        self.register_buffer("positions", positions.clone(), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.mlm(input_ids=input_ids).logits[:, self.positions].flatten(0, 1)


@register_model("bert-mlm")
class BertMLMSpec(ModelSpec):
    """``transformers.BertForMaskedLM`` from a ``BertConfig`` (BERT's own init, N(0, 0.02), drawn from
    the seed), for a vocabulary of ``num_classes`` tokens. The defaults are BERT-base's sizes.

    Three choices make gradient matching possible and are not BERT's defaults: attention is the "eager"
    implementation (plain matmul and softmax, twice differentiable; the fused kernels need not be);
    dropout is off (its masks are the victim's private randomness, which no attacker could replay); and
    the output layer has its own weights rather than the input embedding table's, because the attack
    works in embedding space, where the table's lookup gradient has nothing to be compared with (the
    output layer's gradient is matched, the table's is not)."""

    params = (
        Param("hidden", int, 768, "hidden size", low=8),
        Param("layers", int, 12, "transformer layers", low=1, high=48),
        Param("heads", int, 12, "attention heads (must divide hidden)", low=1),
        Param("intermediate", int, 3072, "feed-forward width", low=8),
        Param("max_positions", int, 512, "position embeddings (longest sequence)", low=8, high=4096),
        Param("init_std", float, 0.02, "std of the normal init of every weight (BERT's initializer_range)",
              low=1e-6, high=10.0),
    )
    twice_differentiable = True

    @classmethod
    def validate_params(cls, given):
        checked = super().validate_params(given)
        if checked["hidden"] % checked["heads"]:
            raise ConfigError(f"model 'bert-mlm': parameter 'heads' = {checked['heads']} is invalid; allowed: a "
                              f"divisor of hidden = {checked['hidden']}")
        return checked

    def create(self, input_shape, num_classes, *, generator=None):
        from transformers import BertConfig, BertForMaskedLM

        (length,) = input_shape
        if length > self.max_positions:
            raise ValueError(f"bert-mlm: sequences of {length} tokens need max_positions >= {length}")
        config = BertConfig(vocab_size=num_classes, hidden_size=self.hidden, num_hidden_layers=self.layers,
                            num_attention_heads=self.heads, intermediate_size=self.intermediate,
                            max_position_embeddings=self.max_positions, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, tie_word_embeddings=False,
                            initializer_range=self.init_std, attn_implementation="eager")
        seed = generator.initial_seed() if generator is not None else 0
        with torch.random.fork_rng(devices=[]):  # BERT initialises from the global RNG: seed it, then restore
            torch.manual_seed(seed)
            model = BertForMaskedLM(config)
        # the output bias is one parameter, as in BERT (untied output weights leave a second, unused copy)
        model.cls.predictions.decoder.bias = model.cls.predictions.bias
        return model.eval()
