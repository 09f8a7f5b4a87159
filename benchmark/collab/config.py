"""What the participants of distributed selective SGD agree on before training (Hitaj et al.
Algorithm 1, pre-training phase): one frozen :class:`ProtocolConfig`, checked field by field."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Sequence

from ..errors import ConfigError

UPLOAD_CRITERIA = ("largest", "random", "threshold", "sparse-vector")
ORDERS = ("sequential", "round-robin-async")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class ProtocolConfig:
    """Everything the participants agree on before training (Hitaj et al. Algorithm 1, pre-training phase).

    Defaults are the Hitaj et al. MNIST setting (Section 8.4, Figure 6a): two participants with digits
    0-4 and 5-9, SGD with lr 1e-3, decay 1e-7, no momentum, batch 64, full upload and download.
    """

    model: str | None = "hitaj-mnist-cnn"      # registered architecture (unused when an initial model is given)
    model_params: dict = field(default_factory=dict)
    participant_labels: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
    samples_per_participant: int | None = None  # cap on each participant's private data (None: all)
    optimizer: str = "sgd"
    lr: float = 1e-3
    lr_decay: float = 1e-7                       # Torch7 style: lr / (1 + local_step * lr_decay)
    momentum: float = 0.0
    batch_size: int = 64
    local_epochs: int = 1                        # passes over the local data per turn
    local_batches: int | None = None             # optional cap on SGD steps per turn
    theta_u: float = 1.0                         # fraction of the update uploaded per turn
    theta_d: float = 1.0                         # fraction of the global parameters downloaded per turn
    upload_criterion: str = "largest"
    tau: float = 0.0                             # threshold of "threshold" and "sparse-vector" selection
    gamma: float | None = None                   # bound on each uploaded value (None: unbounded)
    epsilon_c: float | None = None               # "sparse-vector" only: privacy budget per uploaded parameter
    order: str = "sequential"
    max_rounds: int = 10                         # stopping rule: at most this many rounds ...
    target_accuracy: float | None = None         # ... or until the global test accuracy reaches this
    evaluate_local: bool = True                  # also test every local model each round (costs time)

    def __post_init__(self) -> None:
        # YAML gives lists; the config is frozen, so normalise once here
        labels = self.participant_labels
        if not isinstance(labels, (list, tuple)) or not labels:
            _bad("participant_labels", labels, "a non-empty list of label lists, one per participant")
        normalised = []
        for entry in labels:
            if not isinstance(entry, (list, tuple)) or any(
                    isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in entry):
                _bad("participant_labels", labels, "a list of lists of class indices >= 0")
            if len(set(entry)) != len(entry):
                _bad("participant_labels", labels, "label lists without repeats")
            normalised.append(tuple(int(v) for v in entry))
        object.__setattr__(self, "participant_labels", tuple(normalised))
        if not isinstance(self.model_params, Mapping):
            _bad("model_params", self.model_params, "a mapping")
        object.__setattr__(self, "model_params", dict(self.model_params))

        if self.model is not None and not isinstance(self.model, str):
            _bad("model", self.model, "a registered model name or null")
        _check_int(self, "samples_per_participant", low=1, nullable=True)
        _check_choice(self, "optimizer", OPTIMIZERS)
        _check_number(self, "lr", low=0.0, low_open=True)
        _check_number(self, "lr_decay", low=0.0)
        _check_number(self, "momentum", low=0.0, high=1.0, high_open=True)
        _check_int(self, "batch_size", low=1)
        _check_int(self, "local_epochs", low=1)
        _check_int(self, "local_batches", low=1, nullable=True)
        _check_number(self, "theta_u", low=0.0, high=1.0, low_open=True)
        _check_number(self, "theta_d", low=0.0, high=1.0)
        _check_choice(self, "upload_criterion", UPLOAD_CRITERIA)
        _check_number(self, "tau", low=0.0)
        _check_number(self, "gamma", low=0.0, low_open=True, nullable=True)
        _check_number(self, "epsilon_c", low=0.0, low_open=True, nullable=True)
        _check_choice(self, "order", ORDERS)
        _check_int(self, "max_rounds", low=0)
        _check_number(self, "target_accuracy", low=0.0, high=1.0, nullable=True)
        if not isinstance(self.evaluate_local, bool):
            _bad("evaluate_local", self.evaluate_local, "true or false")
        if self.upload_criterion == "sparse-vector":
            if self.epsilon_c is None:
                _bad("epsilon_c", None, "a number > 0 (upload_criterion 'sparse-vector' needs a budget)")
            if self.gamma is None:
                _bad("gamma", None, "a number > 0 (the sparse vector technique needs bounded values)")
        elif self.epsilon_c is not None:
            _bad("epsilon_c", self.epsilon_c, "null unless upload_criterion is 'sparse-vector'")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> "ProtocolConfig":
        cfg = dict(cfg or {})
        names = [f.name for f in fields(cls)]
        extra = sorted(set(cfg) - set(names))
        if extra:
            raise ConfigError(f"protocol: unknown key {extra[0]!r}; allowed: {', '.join(names)}")
        return cls(**cfg)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["participant_labels"] = [list(labels) for labels in self.participant_labels]
        return out


def _bad(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"protocol.{key} = {value!r} is invalid; allowed: {allowed}")


def _check_choice(cfg: ProtocolConfig, key: str, choices: Sequence[str]) -> None:
    value = getattr(cfg, key)
    if value not in choices:
        _bad(key, value, "one of " + ", ".join(repr(c) for c in choices))


def _check_int(cfg: ProtocolConfig, key: str, *, low: int, nullable: bool = False) -> None:
    value = getattr(cfg, key)
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _bad(key, value, f"an integer >= {low}" + (" or null" if nullable else ""))


def _check_number(cfg: ProtocolConfig, key: str, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False, high_open: bool = False, nullable: bool = False) -> None:
    value = getattr(cfg, key)
    if value is None and nullable:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        _bad(key, value, "a number" + (f" {bounds}" if bounds else "") + (" or null" if nullable else ""))
    object.__setattr__(cfg, key, float(value))


def check_protocol_mapping(raw: Any, *, where: str) -> dict:
    """A config's ``protocol:`` mapping (ProtocolConfig fields but the model, which the grid supplies),
    checked by building it: one-line ConfigErrors name ``where`` and the key. Returns it with
    ``participant_labels`` as tuples; {} for None."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of ProtocolConfig fields")
    allowed = sorted({f.name for f in fields(ProtocolConfig)} - {"model", "model_params"})
    extra = sorted(set(raw) - set(allowed))
    if extra:
        raise ConfigError(f"{where}: unknown key {extra[0]!r}; allowed: {', '.join(allowed)}")
    if "participant_labels" in raw:
        labels = raw["participant_labels"]
        if not isinstance(labels, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in labels):
            raise ConfigError(f"{where}.participant_labels = {labels!r} is invalid; allowed: a list of "
                              f"label lists, one per participant")
        raw = {**raw, "participant_labels": tuple(tuple(p) for p in labels)}
    ProtocolConfig(**{**raw, "model": None})  # its own checks raise one-line ConfigErrors
    return raw
