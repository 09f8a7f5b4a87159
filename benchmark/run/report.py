"""Accuracy-vs-defendability tables (like Table 3 of the DLG paper) and reconstruction grids,
rendered from ``results.jsonl`` alone, so ``leakbench report DIR`` can redo them at any time."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from ..cells.base import TableColumn
from ..errors import ConfigError
from ..registry import CELL_KINDS
from ..scoring.class_leak import describe_controls
from ..scoring.reconstruction import censored_median
from ..storage import atomic_write_text
from ..threat import attack_key
from .figures import DEFENDED, LEAKS, NO_VERDICT, render_samples, roc_plots, tradeoff_plots
from .results import ResultsStore, missing_field


def kind_columns(setting: str) -> tuple[TableColumn, ...]:
    """The per-attack table columns of a record's kind of cell (none when no installed plugin registers
    the kind: the leak rate and verdict still show)."""
    return CELL_KINDS.get(setting).columns if setting in CELL_KINDS else ()


def _formatted(value, style: str) -> str:
    if style in ("decibel", "number"):
        if value is None or math.isnan(value):
            return "–"
        return f"{value:.1f}" if style == "decibel" else f"{value:.3g}"
    return _pct(value)


def records_frame(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        m = r["metrics"]
        setting = r.get("threat", {}).get("setting", "gradient")  # records before settings were recorded
        rows.append({
            "dataset": r["dataset"], "model": r["model"], "seed": r["seed"],
            "attack": attack_key(r), "attack_params": json.dumps(r["attack_params"], sort_keys=True),
            "defense": r["defense_label"], "family": r["defense_family"],
            "accuracy": r.get("accuracy"), "epsilon": (r.get("privacy") or {}).get("epsilon"),
            "setting": setting,
            "leak_rate": m["leak_rate"], "psnr": m.get("psnr_median"), "ssim": m.get("ssim_median"),
            "mse": m.get("mse_median"), "label_accuracy": m.get("label_accuracy"),
            "oracle_accuracy": m.get("oracle_accuracy"), "protocol_accuracy": m.get("protocol_accuracy"),
            "recovered_rate": m.get("recovered_rate"), "closure_evals": m.get("closure_evals_mean"),
            "max_leak_rate": r["verdict"]["max_leak_rate"], "rule": r["verdict"]["rule"],
            "wall_seconds": r.get("wall_seconds"),
            # DLG Table 2's measurement (gradient cells): per target, the first iteration it was recovered
            "iterations_to_recover": list((r.get("per_target") or {}).get("iterations_to_recover") or []),
            # what the record's kind of cell shows beside the leak rate, pooled by summary_frame
            **{f"column:{c.metric}": m.get(c.metric) for c in kind_columns(setting)},
        })
    return pd.DataFrame(rows)


def summary_frame(records: list[dict]) -> pd.DataFrame:
    """One row per (dataset, model, defense setting, attack), pooled over seeds."""
    df = records_frame(records)
    keys = ["dataset", "model", "defense", "attack"]
    order = {k: list(dict.fromkeys(df[k])) for k in keys}  # keep the grid's order
    agg = df.groupby(keys, sort=False).agg(
        accuracy=("accuracy", "mean"), epsilon=("epsilon", "max"), leak_rate=("leak_rate", "mean"),
        psnr=("psnr", "median"), ssim=("ssim", "median"), label_accuracy=("label_accuracy", "mean"),
        recovered_rate=("recovered_rate", "mean"), closure_evals=("closure_evals", "mean"),
        max_leak_rate=("max_leak_rate", "first"), seeds=("seed", "nunique"), family=("family", "first"),
        setting=("setting", "first"), oracle_accuracy=("oracle_accuracy", "mean"),
        protocol_accuracy=("protocol_accuracy", "mean"),
        iterations_to_recover=("iterations_to_recover", lambda lists: [v for one in lists for v in one]),
        **{f"column:{c.metric}": (f"column:{c.metric}", c.pool)
           for c in dict.fromkeys(c for s in dict.fromkeys(df["setting"]) for c in kind_columns(s))},
    ).reset_index()
    agg["iterations_to_recover_median"] = [censored_median(v) if v else None for v in agg["iterations_to_recover"]]
    agg["defended"] = agg["leak_rate"] <= agg["max_leak_rate"]
    # A verdict needs an attack that works: when the same attack does not leak against `none` on the
    # same dataset and model, no defense row can be credited with stopping it.
    baseline = agg[agg["family"] == "baseline"].set_index(["dataset", "model", "attack"])["defended"]
    agg["attack_works"] = [
        not bool(baseline.get((d, m, a), False)) for d, m, a in zip(agg["dataset"], agg["model"], agg["attack"])
    ]
    for k in keys:
        agg[k] = pd.Categorical(agg[k], categories=order[k], ordered=True)
    return agg.sort_values(keys).reset_index(drop=True)


def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def verdict_mark(row) -> str:
    """A summary row's verdict as tables and figures show it: ✓ defends, ✗ leaks, – no verdict (the attack
    does not leak even against `none` on that dataset and model)."""
    return (DEFENDED if row["defended"] else LEAKS) if row["attack_works"] else NO_VERDICT


def defendability_table(records: list[dict]) -> pd.DataFrame:
    """The wide Table-3 layout: a row per defense setting, accuracy, then per attack the leak rate,
    the median PSNR and the verdict (✓ defends, ✗ leaks)."""
    s = summary_frame(records)
    multi = s[["dataset", "model"]].drop_duplicates().shape[0] > 1
    rows = []
    for (dataset, model, defense), part in s.groupby(["dataset", "model", "defense"], sort=False, observed=True):
        row = {}
        if multi:
            row["data / model"] = f"{dataset} / {model}"
        row["defense"] = str(defense)
        row["accuracy"] = _pct(part["accuracy"].iloc[0])
        eps = part["epsilon"].dropna()
        if s["epsilon"].notna().any():
            row["epsilon"] = f"{eps.iloc[0]:.3g}" if len(eps) else "–"
        for _, r in part.iterrows():
            a = str(r["attack"])
            row[f"{a} leak"] = _pct(r["leak_rate"])
            for column in kind_columns(r["setting"]):  # e.g. PSNR for reconstructions, oracle for class look-alikes
                row[f"{a} {column.label}"] = _formatted(r[f"column:{column.metric}"], column.style)
            row[f"{a} defends"] = verdict_mark(r)
        rows.append(row)
    return pd.DataFrame(rows).fillna("")  # blocks of a grid with different attacks leave gaps


def verdict_marks(records: list[dict], summary: pd.DataFrame | None = None) -> dict[str, str]:
    """The table's verdict mark of each record (by key): its row's pooled verdict, or no verdict where the
    attack does not leak against `none` on that dataset and model. Figures show exactly these marks."""
    summary = summary_frame(records) if summary is None else summary
    marks = {(str(row["dataset"]), str(row["model"]), str(row["defense"]), str(row["attack"])): verdict_mark(row)
             for _, row in summary.iterrows()}
    return {r["key"]: marks.get((r["dataset"], r["model"], r["defense_label"], attack_key(r)), NO_VERDICT)
            for r in records}


def verdict_notes(records: list[dict], summary: pd.DataFrame) -> list[str]:
    """Lines for the table's note: why each attack without a verdict has none (what its undefended cell
    measured), and the controls of the class-representative verdict per dataset and target class."""
    lines = []
    no_verdict = summary[(~summary["attack_works"]) & (summary["family"] == "baseline")]
    for _, row in no_verdict.iterrows():
        undefended = [r for r in records if (r["dataset"], r["model"], attack_key(r), r["defense_family"])
                      == (str(row["dataset"]), str(row["model"]), str(row["attack"]), "baseline")]
        why = f"undefended it leaks {row['leak_rate']:.0%} (at most {row['max_leak_rate']:.0%} is no leak)"
        conditions = (undefended[0]["verdict"].get("conditions") if undefended else None)
        if conditions:
            rounds = undefended[0]["metrics"].get("rounds")
            why += (f"{f' after {rounds} rounds' if rounds else ''}: the oracle takes {conditions['oracle']:.0%} "
                    f"of its samples for the class, {conditions['similar']:.0%} reach the SSIM bar "
                    f"({undefended[0]['verdict']['threshold']:.3f}), "
                    # the relative condition's share, where the rule had it on (0 otherwise)
                    + (f"{conditions['nearest_class']:.0%} are nearer a real image of the class than of any "
                       f"other, " if conditions.get("nearest_class") else "")
                    + f"{conditions['not_class_mean']:.0%} look more "
                    f"like a real image than like the class mean")
        lines.append(f"{NO_VERDICT} {row['attack']} on {row['dataset']} / {row['model']}: no verdict, {why}.")
    shown = set()
    for r in records:
        controls = r["verdict"].get("controls")
        where = (r["dataset"], (r.get("threat") or {}).get("target_class"))
        if controls and where not in shown:
            shown.add(where)
            lines.append(f"Verdict controls on {where[0]} (class {where[1]}, the held-out half the SSIM bar was "
                         f"not calibrated on): {describe_controls(controls)}.")
    return lines


def in_grid_order(records: list[dict], grid_json: Path) -> list[dict]:
    """Records in the grid's cell order (``cell_keys`` in grid.json), whatever order parallel workers
    finished them in, so that tables list the grid's rows and columns in its order."""
    try:
        keys = json.loads(grid_json.read_text())["cell_keys"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):  # written before cell_keys existed
        return records
    position = {key: i for i, key in enumerate(keys)}
    return sorted(records, key=lambda r: position.get(r.get("key"), len(position)))


def readable_records(store: ResultsStore) -> list[dict]:
    """The store's records that the tables can read; another schema's record is named and skipped."""
    out = []
    for number, record in store.numbered():
        missing = missing_field(record)
        if missing is None:
            out.append(record)
        else:
            print(f"leakbench: warning: {store.path}:{number}: skipped, a record of another schema "
                  f"(it has no {missing!r})", file=sys.stderr)
    return out


def render(out_dir: str | Path, *, images: bool = True) -> str:
    """Write table.md, table.csv, table.tex (and reconstruction PNGs) into ``out_dir``; return the
    Markdown table with its legend."""
    out = Path(out_dir)
    records = in_grid_order(readable_records(ResultsStore(out / "results.jsonl")), out / "grid.json")
    if not records:
        raise ConfigError(f"no finished cells in {out / 'results.jsonl'}; run `leakbench run --out {out}` first")
    table = defendability_table(records)

    # one table per dataset/model block: blocks with different attacks would leave wide gaps
    blocks = {}
    for r in records:
        blocks.setdefault((r["dataset"], r["model"]), []).append(r)

    rule = "; ".join(dict.fromkeys(r["verdict"]["rule"] for r in records))
    grid = records[0].get("grid", "")
    def block_tables(fmt: str, heading) -> str:
        parts = []
        for (dataset, model), rs in blocks.items():
            block = defendability_table(rs)
            block = block.loc[:, [c for c in block.columns if (block[c] != "").any()]]
            text = tabulate(block, headers="keys", tablefmt=fmt, showindex=False)
            parts.append(heading(dataset, model) + text if len(blocks) > 1 else text)
        return "\n\n".join(parts)

    md = block_tables("github", lambda d, m: f"**{d} / {m}**\n\n")
    legend = (f"\nGrid `{grid}`, {len(records)} cells. Accuracy: test accuracy of the model trained with the "
              f"defense on every step (for protocol defenses such as dssgd-dp: the global model of the "
              f"collaborative protocol run under it). Leak: fraction of attacked samples reconstructed recognisably "
              f"({rule}). PSNR: median over samples, dB. For collaborative attacks (GAN) and model inversion: oracle = "
              f"fraction of generated or inverted samples an independent classifier assigns to the victim's class; "
              f"model acc = the global model's accuracy at the end of the attacked protocol run (model "
              f"inversion: the attacked model's accuracy). {DEFENDED} defends, {LEAKS} leaks, {NO_VERDICT} no "
              f"verdict: the attack does not leak even against `none` here, so it cannot rate a defense.\n")
    if any(r.get("roc") for r in records):
        legend += ("\nMembership inference (membership-*): leak = TPR at 1% FPR of members (records the model trained "
                   "on) against as many held-out non-members; AUC; TPR@0.1% = TPR at 0.1% FPR; eps lower bound = the "
                   "epsilon that the attack's (TPR, FPR) at 1% FPR proves at least (Clopper-Pearson 95%), beside the "
                   "defense's epsilon where it has one. ROC curves: roc_<attack>_<dataset>_<model>.png.\n")
    summary = summary_frame(records)
    notes = verdict_notes(records, summary)
    if notes:
        legend += "\n" + "\n".join(f"- {line}" for line in notes) + "\n"
    atomic_write_text(out / "table.md", md + "\n" + legend)
    atomic_write_text(out / "table.csv", table.to_csv(index=False))
    atomic_write_text(out / "table.tex", block_tables("latex_booktabs", lambda d, m: f"% {d} / {m}\n") + "\n")
    # per-target lists as JSON (null: never recovered) rather than Python's repr
    summary.assign(iterations_to_recover=summary["iterations_to_recover"].map(json.dumps)).to_csv(
        out / "summary.csv", index=False)
    if images:
        written = set(render_samples(out, records, verdict_marks(records, summary)))
        written |= set(tradeoff_plots(out, summary))
        written |= set(roc_plots(out, records))
        earlier = {*out.glob("reconstructions_*.png"), *out.glob("reconstructions_*.md"), *out.glob("tradeoff_*.png"),
                   *out.glob("roc_*.png")}
        for stale in earlier - written:  # figures of an earlier rendering
            stale.unlink()
    return md + "\n" + legend
