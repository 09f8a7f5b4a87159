"""The accuracy column: train the model with the defense applied to every gradient step, then test."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .data import ImageData
from .errors import ConfigError
from .params import Param, check_section
from .models import output_width


@dataclass(frozen=True)
class TrainingConfig:
    """How the accuracy column is trained. Cheap by default; the ``full`` grid raises it."""

    epochs: int = 3
    batch_size: int = 32           # a large-batch defense overrides it
    optimizer: str = "adam"
    lr: float = 0.01
    momentum: float = 0.9          # SGD only
    train_size: int | None = None  # cap on training samples (None: all)
    test_size: int | None = None   # cap on test samples (None: all)
    model_params: dict = field(default_factory=dict)  # overrides of the grid model's parameters
    # test on this fraction of the train split, held out from training, instead of the test split: for a
    # mirror that has no test split (the shared CIFAR-100 holds 486 training images and no test split)
    holdout_fraction: float | None = None

    @classmethod
    def from_config(cls, cfg: dict | None) -> "TrainingConfig":
        checked = check_section("accuracy", cfg, (
            Param("epochs", int, low=0), Param("batch_size", int, low=1),
            Param("lr", float, low=0.0), Param("momentum", float, low=0.0),
            Param("train_size", int, low=1, nullable=True), Param("test_size", int, low=1, nullable=True),
            Param("holdout_fraction", float, low=0.01, high=0.9, nullable=True),
        ), also=("optimizer", "model_params"))
        out = cls(**checked)
        if out.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"accuracy.optimizer = {out.optimizer!r} is invalid; allowed: 'sgd', 'adam'")
        if not isinstance(out.model_params, dict):
            raise ConfigError(f"accuracy.model_params = {out.model_params!r} is invalid; allowed: a mapping")
        return out

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["holdout_fraction"] is None:  # absent when unused, so existing cache keys and records stay
            del out["holdout_fraction"]
        return out

    def splits(self) -> tuple[str, ...]:
        """The dataset splits the accuracy run reads."""
        return ("train",) if self.holdout_fraction else ("train", "test")


def evaluate(model: torch.nn.Module, data: ImageData, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            logits = model(data.images[start:start + batch_size].to(device))
            correct += int((logits.argmax(-1).cpu() == data.labels[start:start + batch_size]).sum())
    return correct / max(1, len(data))


def train_with_defense(model: torch.nn.Module, defense, train: ImageData, test: ImageData,
                       cfg: TrainingConfig, *, seed: int = 0, max_steps: int | None = None) -> dict[str, Any]:
    """Train ``model`` for ``cfg.epochs`` with every step's update passed through ``defense``
    (``compute_update`` then ``transform``, exactly what the victim would share), and test it."""
    started = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    train = train.capped(cfg.train_size, generator=g)
    test = test.capped(cfg.test_size)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.lr)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    batch_size = defense.victim_batch_size(cfg.batch_size)
    width = output_width(model, train.shape)
    device = next(model.parameters()).device
    steps = 0
    non_finite = False
    for _ in range(cfg.epochs):
        order = torch.randperm(len(train), generator=g)
        for start in range(0, len(train), batch_size):
            idx = order[start:start + batch_size]
            model.train()
            x = train.images[idx].to(device)
            y = F.one_hot(train.labels[idx], width).float().to(device)
            update = defense.share(model, x, y, generator=g)
            for p, u in zip(params, update):
                p.grad = u.to(p.dtype)
            opt.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        if not all(bool(torch.isfinite(p).all()) for p in params):
            non_finite = True
            break
    accuracy = 0.0 if non_finite else evaluate(model, test)
    out = {
        "accuracy": accuracy,
        "train_steps": steps,
        "train_samples": len(train),
        "test_samples": len(test),
        "train_batch_size": batch_size,
        "train_seconds": round(time.perf_counter() - started, 3),
        "diverged": non_finite,
    }
    privacy = defense.privacy(steps=steps, sample_rate=batch_size / max(1, len(train)))
    if privacy:
        out["privacy"] = privacy
    return out
