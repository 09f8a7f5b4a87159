"""An experiment: one table or figure of a paper, as data (``configs/paper/<name>.yaml``).

A file holds the paper's citation and the source of its values (table, figure, page), the claim in the
paper's words, the grid at each scale (``cpu``: reduced to run on 2 cores, its reductions stated;
``paper``: the paper's setting, meant for a GPU), and the comparisons: per row, which records it reads
(``where``), the paper's value, how our value is computed from the records (``ours``) and the rule by
which the two agree. No paper value or verdict lives in Python.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, UnknownNameError, did_you_mean
from ..run.grid import Grid, parse_grid, read_grid_yaml, resolve_grid_path
from ..yaml_config import deep_merge, read_text_file, safe_load_bounded
from .agreement import AgreementRule, build_rule, paper_kind

SCALES = ("cpu", "paper")
EXPERIMENT_KEYS = ("name", "paper", "title", "source", "claim", "scales", "comparisons", "trends", "figures",
                   "notes", "calibration")
CALIBRATION_KEYS = ("metric", "max_leak_rate", "fit_on", "shipped_threshold")
COMPARISON_KEYS = ("setting", "quantity", "where", "paper", "source", "ours", "rule", "why_it_may_differ")
OURS_KEYS = ("value", "per_sample", "stat", "scale", "relative_to", "min_baseline", "interval", "unit")
STATS = ("median", "mean")
INTERVALS = ("wilson", "bootstrap", "none")


@dataclass(frozen=True)
class Ours:
    """How our value is read from the matching records.

    ``value``: a dotted path into a record (``accuracy``, ``metrics.mse_median``), or ``verdict`` (the
    grid's verdict: true when the defense holds). ``per_sample``: a list in ``record.per_sample`` whose
    ``stat`` is our value (with a bootstrap interval). ``interval: wilson`` treats ``value`` as a rate
    over the record's samples. ``scale`` multiplies (100: percent). ``relative_to``: a ``where`` whose
    record's value divides ours (accuracy retained against no defense), times ``scale``."""

    value: str | None = None
    per_sample: str | None = None
    stat: str = "median"
    scale: float = 1.0
    relative_to: dict | None = None
    # the baseline must reach this for a ratio to mean anything (an accuracy at chance level, 1% on
    # CIFAR-100, makes "accuracy retained" a ratio of two noises); below it the row is not measured
    min_baseline: float | None = None
    interval: str = "none"
    unit: str = ""


@dataclass(frozen=True)
class Comparison:
    setting: str
    quantity: str
    where: dict
    paper: Any
    ours: Ours
    rule: AgreementRule
    source: str | None = None
    why_it_may_differ: str | None = None


@dataclass(frozen=True)
class Trend:
    """The paper's claim about an order across rows (``increasing``/``decreasing`` in ``quantity``)."""
    quantity: str
    order: str
    claim: str


@dataclass(frozen=True)
class Calibration:
    """Fit the verdict's per-sample threshold on some of the paper's verdict rows (``on``: their setting
    names, ``fit_on`` in the file) and report its agreement on the others, beside the shipped threshold's: a rule is judged on
    rows it was not fitted to."""
    metric: str
    max_leak_rate: float
    on: tuple[str, ...]
    shipped_threshold: float


@dataclass
class Experiment:
    name: str
    paper: str
    title: str
    source: str
    claim: str
    scales: dict[str, dict]
    comparisons: list[Comparison]
    trends: list[Trend] = field(default_factory=list)
    figures: str = ""
    notes: str = ""
    path: str = ""
    calibration: Calibration | None = None

    def grid(self, scale: str) -> Grid:
        """The experiment's grid at ``scale``, validated (a one-line ConfigError otherwise)."""
        if scale not in self.scales:
            raise ConfigError(f"experiment {self.name}: --scale {scale!r} is not defined; allowed: "
                              f"{', '.join(self.scales)}")
        spec = self.scales[scale]["grid"]
        if isinstance(spec, str):
            raw, source = read_grid_yaml(spec), str(resolve_grid_path(spec))
        else:  # an inline grid; `include:` names a shipped grid or a file next to the experiment
            spec = dict(spec)
            base = spec.pop("include", None)
            raw = deep_merge(read_grid_yaml(base), spec) if base else spec
            source = f"{self.path} (scale {scale})"
        return parse_grid(raw, source=source)

    def reductions(self, scale: str) -> list[str]:
        return list(self.scales.get(scale, {}).get("reductions", []))


def _experiment_files() -> dict[str, Any]:
    folder = resources.files("leakbench.configs").joinpath("paper")
    return {p.name[:-5]: p for p in folder.iterdir() if p.name.endswith(".yaml") and not p.name.startswith("_")}


def experiment_names(pattern: str = "*") -> list[str]:
    return sorted(n for n in _experiment_files() if fnmatch.fnmatchcase(n, pattern))


def is_experiment_file(spec: str) -> bool:
    """A YAML file on disk whose top level has ``comparisons`` (a grid never has)."""
    path = Path(spec)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return False
    try:
        raw = safe_load_bounded(read_text_file(path, where=str(path)), where=str(path))
    except (ConfigError, yaml.YAMLError):  # not readable as YAML: the grid reader names the problem
        return False
    return isinstance(raw, dict) and "comparisons" in raw


def load_experiment(name: str) -> Experiment:
    """A shipped experiment by name, or an experiment file by path; validated."""
    files = _experiment_files()
    if name in files:
        text, source = files[name].read_text(), f"configs/paper/{name}.yaml"
    elif name.endswith((".yaml", ".yml")) and Path(name).is_file():
        text, source = read_text_file(Path(name), where=f"experiment file {name}"), name
    else:
        raise UnknownNameError(f"unknown paper experiment {name!r}.{did_you_mean(name, list(files))} "
                               f"Available: {', '.join(sorted(files)) or '(none)'}, or a path to an experiment file")
    raw = safe_load_bounded(text, where=source)
    return parse_experiment(raw, source=source)


def _keys(obj: Any, allowed: tuple[str, ...], *, where: str, required: tuple[str, ...] = ()) -> dict:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where} is invalid; allowed: a mapping with keys {', '.join(allowed)}")
    for key in obj:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}.{did_you_mean(str(key), list(allowed))} "
                              f"Allowed: {', '.join(allowed)}")
    for key in required:
        if key not in obj:
            raise ConfigError(f"{where}: {key} is missing; required: {', '.join(required)}")
    return obj


def _text(obj: dict, key: str, *, where: str, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {key} is {value!r}; allowed: a non-empty string")
    return " ".join(value.split())


def parse_experiment(raw: Any, *, source: str) -> Experiment:
    raw = _keys(raw, EXPERIMENT_KEYS, where=source,
                required=("name", "paper", "title", "source", "claim", "scales", "comparisons"))
    scales = _keys(raw["scales"], SCALES, where=f"{source}: scales", required=("cpu",))
    for scale, spec in scales.items():
        spec = _keys(spec, ("grid", "reductions"), where=f"{source}: scales.{scale}", required=("grid",))
        if not isinstance(spec["grid"], (str, dict)):
            raise ConfigError(f"{source}: scales.{scale}.grid is invalid; allowed: a grid name or path, or a mapping")
        reductions = spec.get("reductions", [])
        if not isinstance(reductions, list) or not all(isinstance(r, str) for r in reductions):
            raise ConfigError(f"{source}: scales.{scale}.reductions is invalid; allowed: a list of sentences")
        if scale == "cpu" and not reductions:
            raise ConfigError(f"{source}: scales.cpu.reductions is missing; required: how the cpu scale departs "
                              f"from the paper's setting (fewer targets, smaller images or widths, fewer steps)")
    comparisons = []
    if not isinstance(raw["comparisons"], list) or not raw["comparisons"]:
        raise ConfigError(f"{source}: comparisons is invalid; allowed: a non-empty list")
    for i, spec in enumerate(raw["comparisons"]):
        where = f"{source}: comparisons[{i}]"
        spec = _keys(spec, COMPARISON_KEYS, where=where, required=("setting", "quantity", "where", "paper", "ours",
                                                                  "rule"))
        if not isinstance(spec["where"], dict):
            raise ConfigError(f"{where}: where is invalid; allowed: a mapping of record fields to values")
        ours_raw = _keys(spec["ours"], OURS_KEYS, where=f"{where}.ours")
        ours = Ours(**ours_raw)
        if (ours.value is None) == (ours.per_sample is None):
            raise ConfigError(f"{where}.ours: give exactly one of value and per_sample")
        if ours.min_baseline is not None and (ours.relative_to is None or isinstance(ours.min_baseline, bool)
                                              or not isinstance(ours.min_baseline, (int, float))):
            raise ConfigError(f"{where}.ours: min_baseline {ours.min_baseline!r} is invalid; allowed: a number, "
                              f"with relative_to")
        if ours.stat not in STATS or ours.interval not in INTERVALS:
            raise ConfigError(f"{where}.ours: stat {ours.stat!r} / interval {ours.interval!r} is invalid; allowed: "
                              f"stat {', '.join(STATS)}; interval {', '.join(INTERVALS)}")
        kind = paper_kind(spec["paper"])
        rule = build_rule(spec["rule"], where=where)
        if kind not in rule.accepts:
            raise ConfigError(f"{where}: rule {rule.registry_name!r} does not compare a {kind} paper value; "
                              f"allowed: {', '.join(rule.accepts)}")
        if (kind == "verdict") != (ours.value == "verdict"):
            raise ConfigError(f"{where}: a paper verdict (true/false) compares with ours.value: verdict, and only it")
        comparisons.append(Comparison(setting=_text(spec, "setting", where=where),
                                      quantity=_text(spec, "quantity", where=where), where=dict(spec["where"]),
                                      paper=spec["paper"], ours=ours, rule=rule,
                                      source=_text(spec, "source", where=where, required=False) or None,
                                      why_it_may_differ=_text(spec, "why_it_may_differ", where=where,
                                                              required=False) or None))
    trends = []
    for i, spec in enumerate(raw.get("trends") or []):
        where = f"{source}: trends[{i}]"
        spec = _keys(spec, ("quantity", "order", "claim"), where=where, required=("quantity", "order", "claim"))
        if spec["order"] not in ("increasing", "decreasing"):
            raise ConfigError(f"{where}: order {spec['order']!r} is invalid; allowed: increasing, decreasing")
        if not any(c.quantity == spec["quantity"] for c in comparisons):
            raise ConfigError(f"{where}: quantity {spec['quantity']!r} has no comparisons")
        trends.append(Trend(spec["quantity"], spec["order"], _text(spec, "claim", where=where)))
    calibration = None
    if raw.get("calibration") is not None:
        where = f"{source}: calibration"
        spec = _keys(raw["calibration"], CALIBRATION_KEYS, where=where, required=CALIBRATION_KEYS)
        verdict_rows = {c.setting for c in comparisons if c.ours.value == "verdict"}
        on = spec["fit_on"]
        if not isinstance(on, list) or not on or any(name not in verdict_rows for name in on) \
                or set(on) == verdict_rows:
            raise ConfigError(f"{where}: fit_on is {on!r}; allowed: some (not all) settings of the verdict rows: "
                              f"{', '.join(sorted(verdict_rows))}")
        calibration = Calibration(str(spec["metric"]), float(spec["max_leak_rate"]), tuple(on),
                                  float(spec["shipped_threshold"]))
    return Experiment(calibration=calibration, name=_text(raw, "name", where=source), paper=_text(raw, "paper", where=source),
                      title=_text(raw, "title", where=source), source=_text(raw, "source", where=source),
                      claim=_text(raw, "claim", where=source), scales=dict(scales), comparisons=comparisons,
                      trends=trends, figures=_text(raw, "figures", where=source, required=False),
                      notes=_text(raw, "notes", where=source, required=False), path=source)
