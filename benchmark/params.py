"""Declared parameters: every component says what it takes, so a grid is validated before anything runs."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import ConfigError, did_you_mean

_REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """One keyword parameter of a component: its type, default and allowed values."""

    name: str
    type: type
    default: Any = _REQUIRED
    help: str = ""
    choices: tuple | None = None
    low: float | None = None  # inclusive bounds
    high: float | None = None
    nullable: bool = False
    also: tuple = ()  # literal values accepted beside the type's (e.g. "auto" for a bool)

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def allowed(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
            self.type, self.type.__name__
        )
        if self.low is not None and self.high is not None:
            kind += f" in [{self.low}, {self.high}]"
        elif self.low is not None:
            kind += f" >= {self.low}"
        elif self.high is not None:
            kind += f" <= {self.high}"
        return kind + (" or null" if self.nullable else "") + "".join(f" or {a!r}" for a in self.also)

    def coerce(self, value: Any, owner: str) -> Any:
        return self.check(value, f"{owner}: parameter {self.name!r}")

    def check(self, value: Any, where: str) -> Any:
        """``value`` converted to this parameter's type, or a one-line ConfigError naming ``where``."""
        bad = ConfigError(f"{where} = {value!r} is invalid; allowed: {self.allowed()}")
        if any(type(value) is type(a) and value == a for a in self.also):
            return value
        if value is None:
            if self.nullable:
                return None
            raise bad
        if self.type is bool:
            if not isinstance(value, bool):
                raise bad
        elif self.type is int:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
                raise bad
            value = int(value)
        elif self.type is float:
            if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
                try:
                    value = float(value)
                except ValueError:
                    raise bad from None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad
            value = float(value)
        elif self.type is str:
            if not isinstance(value, str):
                raise bad
        if self.choices is not None and value not in self.choices:
            raise bad
        if self.low is not None and value < self.low:
            raise bad
        if self.high is not None and value > self.high:
            raise bad
        return value


class Component:
    """Base of every registered component: keyword-only construction from declared parameters.

    Subclasses list their parameters in ``params``; the constructor validates the keywords
    against them and stores each as an attribute of the same name.
    """

    params: ClassVar[tuple[Param, ...]] = ()
    registry_name: ClassVar[str] = ""

    def __init__(self, **kwargs: Any) -> None:
        for name, value in self.validate_params(kwargs).items():
            setattr(self, name, value)

    @classmethod
    def owner_name(cls) -> str:
        return f"{cls.registry_name or cls.__name__}"

    @classmethod
    def validate_params(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Check keywords against the declared parameters; fill defaults. Raises ConfigError."""
        declared = {p.name: p for p in cls.params}
        unknown = sorted(set(given) - set(declared))
        if unknown:
            raise ConfigError(
                f"{cls.owner_name()}: unknown parameter {unknown[0]!r}.{did_you_mean(unknown[0], declared)} "
                f"Allowed: {', '.join(declared) or '(none)'}"
            )
        out: dict[str, Any] = {}
        for p in cls.params:
            if p.name in given:
                out[p.name] = p.coerce(given[p.name], cls.owner_name())
            elif p.required:
                raise ConfigError(f"{cls.owner_name()}: missing required parameter {p.name!r} ({p.allowed()})")
            else:
                out[p.name] = p.default
        return out

    def get_params(self) -> dict[str, Any]:
        return {p.name: getattr(self, p.name) for p in self.params}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


def check_section(section: str, cfg: Any, params: tuple[Param, ...], *, also: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config mapping (``accuracy:``, ``verdict:`` ...) checked against declared parameters: unknown keys
    and bad values raise one-line ConfigErrors naming ``section.key``. Keys that are absent stay absent
    (the caller's defaults apply); keys in ``also`` are allowed and returned unchecked."""
    cfg = dict(cfg or {}) if isinstance(cfg, dict) or cfg is None else None
    if cfg is None:
        raise ConfigError(f"{section} must be a mapping of keys")
    declared = {p.name: p for p in params}
    allowed = sorted(set(declared) | set(also))
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ConfigError(f"{section}: unknown key {unknown[0]!r}.{did_you_mean(unknown[0], allowed)} "
                          f"Allowed: {', '.join(allowed)}")
    return {k: declared[k].check(v, f"{section}.{k}") if k in declared else v for k, v in cfg.items()}
