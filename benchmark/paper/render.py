"""A paper experiment's output: per row the setting, the paper's value, ours with its 95% interval,
whether they agree by the row's stated rule, and a note where they do not; as Markdown, CSV and LaTeX,
with the experiment's claim, scale, reductions and figures stated above the table."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from ..storage import atomic_write_text
from .experiment import Experiment
from .measure import CalibrationResult, Row


def paper_text(paper: Any) -> str:
    if isinstance(paper, bool):
        return "✓ defends" if paper else "✗ leaks"
    if isinstance(paper, dict):
        (kind, bound), = paper.items()
        return f"{'≤' if kind == 'at_most' else '≥'} {bound:g}"
    return f"{paper:g}"


def ours_text(row: Row) -> str:
    if row.ours is None:
        return "–"
    if isinstance(row.ours, bool):
        return "✓ defends" if row.ours else "✗ leaks"
    return f"{row.ours:.4g}"


def interval_text(row: Row) -> str:
    if row.low is None or row.high is None or row.low != row.low:
        return ""
    return f"[{row.low:.3g}, {row.high:.3g}]"


def agree_text(row: Row) -> str:
    return "–" if row.agrees is None else ("yes" if row.agrees else "**no**")


def rows_frame(rows: list[Row], *, markdown: bool = True) -> pd.DataFrame:
    return pd.DataFrame([{
        "setting": r.setting, "quantity": r.quantity, "paper": paper_text(r.paper), "ours": ours_text(r),
        "95% interval": interval_text(r),
        "agrees": agree_text(r) if markdown else ("" if r.agrees is None else str(r.agrees).lower()),
        "rule": r.rule, "note": r.note,
    } for r in rows])


def header(experiment: Experiment, scale: str, rows: list[Row], trends: list[tuple], figures: list[str],
           calibration: CalibrationResult | None = None) -> list[str]:
    agreed = sum(r.agrees is True for r in rows)
    measured = sum(r.agrees is not None for r in rows)
    lines = [f"# {experiment.title}", "",
             f"{experiment.paper}. Source of the paper's values: {experiment.source}.", "",
             f"**The paper's claim.** {experiment.claim}", "",
             f"**Scale: `{scale}`.** Grid from `{experiment.path}`."]
    reductions = experiment.reductions(scale)
    if reductions:
        lines += ["Departures from the paper's setting at this scale:", ""] + [f"- {r}" for r in reductions]
    lines += ["", f"**Agreement: {agreed} of {measured} measured rows agree** ({len(rows) - measured} not measured). "
                  f"Each row states its rule; a note gives what was measured where a row does not agree."]
    for trend, paper_ok, ours_ok, sentence in trends:
        verdict = ("cannot be checked" if ours_ok is None or paper_ok is None
                   else "agrees" if ours_ok and paper_ok else "does not agree")
        lines += ["", f"**Trend ({trend.quantity}, {trend.order}): {verdict}.** {sentence}"]
    if calibration is not None:
        lines += ["", f"**Is the verdict rule circular?** {calibration.text}"]
    if experiment.notes:
        lines += ["", experiment.notes]
    shown = ", ".join(f"[{name}]({name})" for name in figures) or "none written"
    lines += ["", f"**Figures.** Ours: {shown}." + (f" {experiment.figures}" if experiment.figures else "")]
    return lines


def write_tables(out: Path, experiment: Experiment, scale: str, rows: list[Row], trends: list[tuple],
                 calibration: CalibrationResult | None = None) -> str:
    """Write ``paper.md``, ``paper.csv`` and ``paper.tex`` into ``out``; return the Markdown."""
    figures = sorted(p.name for p in out.glob("*.png"))
    md = "\n".join(header(experiment, scale, rows, trends, figures, calibration) + [
        "", tabulate(rows_frame(rows), headers="keys", tablefmt="github", showindex=False, disable_numparse=True)]) + "\n"
    atomic_write_text(out / "paper.md", md)
    atomic_write_text(out / "paper.csv", rows_frame(rows, markdown=False).to_csv(index=False))
    tex = rows_frame(rows, markdown=False).drop(columns=["rule"]).to_latex(index=False, escape=True)
    atomic_write_text(out / "paper.tex", f"% {experiment.title} ({experiment.source}); scale {scale}\n{tex}")
    return md
