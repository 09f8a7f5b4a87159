"""Agreement rules: whether our value agrees with a paper's, as each experiment file states per value.

A rule is a small class behind a registry, so an experiment names it (``rule: {name: factor, factor: 3.16}``)
and the output states it in words beside every row."""
from __future__ import annotations

import math
from typing import Any, ClassVar

from ..errors import ConfigError
from ..params import Component, Param
from ..registry import Registry

AGREEMENT_RULES: Registry[type["AgreementRule"]] = Registry("agreement rule")


class AgreementRule(Component):
    """Compares our value with the paper's. ``paper`` is a number, a bound (``{at_most: x}`` or
    ``{at_least: x}``) or a verdict (true: the paper says the defense holds)."""

    accepts: ClassVar[tuple[str, ...]] = ("number",)

    def agrees(self, ours: Any, paper: Any) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


def paper_kind(paper: Any) -> str:
    if isinstance(paper, bool):
        return "verdict"
    if isinstance(paper, (int, float)):
        return "number"
    if isinstance(paper, dict) and len(paper) == 1 and next(iter(paper)) in ("at_most", "at_least") \
            and isinstance(next(iter(paper.values())), (int, float)):
        return "bound"
    raise ConfigError(f"paper value {paper!r} is invalid; allowed: a number, {{at_most: x}}, {{at_least: x}}, "
                      f"or true/false (the paper's verdict: the defense holds)")


def _bound_holds(ours: float, paper: dict, slack: float = 0.0) -> bool:
    if "at_most" in paper:
        return ours <= paper["at_most"] + slack
    return ours >= paper["at_least"] - slack


@AGREEMENT_RULES.register("within")
class Within(AgreementRule):
    """Our value is within ``tolerance`` of the paper's (or of its bound)."""
    accepts = ("number", "bound")
    params = (Param("tolerance", float, 0.0, "largest absolute difference that still agrees", low=0.0),)

    def agrees(self, ours, paper) -> bool:
        if isinstance(paper, dict):
            return _bound_holds(ours, paper, self.tolerance)
        return abs(ours - paper) <= self.tolerance + 1e-12

    def describe(self) -> str:
        return f"|ours - paper| <= {self.tolerance:g}"


@AGREEMENT_RULES.register("factor")
class Factor(AgreementRule):
    """Our value is within a factor of the paper's: the order of magnitude agrees."""
    accepts = ("number",)
    params = (Param("factor", float, math.sqrt(10), "largest ratio either way that still agrees", low=1.0),)

    def agrees(self, ours, paper) -> bool:
        if ours is None or ours <= 0 or paper <= 0:
            return False
        return max(ours / paper, paper / ours) <= self.factor + 1e-12

    def describe(self) -> str:
        return f"ours within a factor of {self.factor:.3g} of the paper's (the same order of magnitude)"


@AGREEMENT_RULES.register("bound")
class Bound(AgreementRule):
    """Our value satisfies the paper's bound (``{at_most: x}``: the paper reports "< x")."""
    accepts = ("bound",)
    params = ()

    def agrees(self, ours, paper) -> bool:
        return ours is not None and _bound_holds(ours, paper)

    def describe(self) -> str:
        return "ours satisfies the paper's bound"


@AGREEMENT_RULES.register("same-verdict")
class SameVerdict(AgreementRule):
    """Our verdict (the defense holds or not, by the grid's stated rule) equals the paper's."""
    accepts = ("verdict",)
    params = ()

    def agrees(self, ours, paper) -> bool:
        return ours is not None and bool(ours) == bool(paper)

    def describe(self) -> str:
        return "the same verdict (the defense holds / does not)"


def build_rule(spec: Any, *, where: str) -> AgreementRule:
    """A rule from ``{name: ..., params...}`` (or a bare name); a one-line ConfigError otherwise."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"{where}: rule {spec!r} is invalid; allowed: a mapping with name "
                          f"({', '.join(AGREEMENT_RULES.list())}) and its parameters")
    params = {k: v for k, v in spec.items() if k != "name"}
    try:
        return AGREEMENT_RULES.build(spec["name"], params)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
