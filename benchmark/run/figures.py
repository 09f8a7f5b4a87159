"""Figures of what attacks produced, rendered from ``results.jsonl`` and the kept samples. Each modality
of data (``Dataset.modality``) has its figure: ``image`` draws reconstruction grids; another modality
(token sequences, say) registers its own with ``@FIGURES.register("text")``, so that records, tables and
reports never assume images."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np

from ..registry import DATASETS, Registry
from ..threat import attack_key

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

DEFENDED, LEAKS, NO_VERDICT = "✓", "✗", "–"

# modality -> figure(out_dir, records, marks) -> written paths; marks: the table's verdict mark by record key
FIGURES: Registry[Callable[[Path, list[dict], dict[str, str]], list[Path]]] = Registry("figure")


def modality_of(record: dict) -> str:
    """The modality of a record's data (image when its dataset is not registered here)."""
    name = record["dataset"]
    return DATASETS.get(name).modality if name in DATASETS else "image"


def render_samples(out: Path, records: list[dict], marks: dict[str, str]) -> list[Path]:
    """Every figure of ``records``, each modality's records drawn by its figure, marked as the table
    marks them (``marks``: record key -> ✓, ✗ or –)."""
    by_modality: dict[str, list[dict]] = {}
    for r in records:
        by_modality.setdefault(modality_of(r), []).append(r)
    return [path for modality, rs in by_modality.items() if modality in FIGURES
            for path in FIGURES.get(modality)(out, rs, marks)]


CELL_INCHES = 0.8  # one image: 88 px at the figures' 110 dpi (at least 48 px, so a person can judge it)
LABEL_INCHES_PER_CHAR = 0.065  # row labels at 7 pt


@FIGURES.register("image")
def image_grids(out: Path, records: list[dict], marks: dict[str, str], max_samples: int = 8) -> list[Path]:
    """One PNG per (attack, dataset, model): originals on top, then a row of matched reconstructions per
    defense setting (the block's first seed), each marked with the table's verdict (``marks`` by record
    key); for GAN attacks and model inversion the 'originals' are each sample's nearest real image of the
    victim's class."""
    written = []
    blocks = dict.fromkeys((attack_key(r), r["dataset"], r["model"]) for r in records)
    for attack, dataset, model in blocks:
        first = next(r for r in records if (attack_key(r), r["dataset"], r["model"]) == (attack, dataset, model))
        rows = [r for r in records if (attack_key(r), r["dataset"], r["model"], r["seed"])
                == (attack, dataset, model, first["seed"])]
        loaded = []
        for r in rows:
            path = out / "reconstructions" / f"{r['key']}.npz"
            if path.exists():
                with np.load(path) as z:
                    loaded.append((r, z["originals"][:max_samples], z["reconstructions"][:max_samples]))
        if not loaded:
            continue
        # a setting whose private batches differ from the first row's (large-batch) gets its own originals
        panels: list[tuple[str, np.ndarray]] = [("original", loaded[0][1])]
        for r, orig, recon in loaded:
            if orig.shape != loaded[0][1].shape or not np.array_equal(orig, loaded[0][1]):
                panels.append((f"original ({r['defense_label']})", orig))
            panels.append((f"{r['defense_label']} {marks.get(r['key'], NO_VERDICT)}", recon))
        path = out / f"reconstructions_{attack}_{dataset}_{model}.png"
        _draw_grid(panels, title=f"{attack} on {dataset} / {model} (seed {first['seed']})", path=path)
        written.append(path)
    return written


def _draw_grid(panels: list[tuple[str, np.ndarray]], *, title: str, path: Path) -> None:
    """Rows of images at a fixed size per image, each row's label in a column of its own (so long labels
    never shrink the images)."""
    n = max(len(images) for _, images in panels)
    label_w = 0.2 + LABEL_INCHES_PER_CHAR * max(len(label) for label, _ in panels)
    width, height = label_w + n * CELL_INCHES + 0.1, len(panels) * CELL_INCHES + 0.4
    fig = plt.figure(figsize=(width, height))
    fig.text(0.5, 1 - 0.15 / height, title, ha="center", va="center", fontsize=9)
    for i, (label, images) in enumerate(panels):
        bottom = (height - 0.4 - (i + 1) * CELL_INCHES) / height
        fig.text((label_w - 0.1) / width, bottom + CELL_INCHES / 2 / height, label, ha="right", va="center",
                 fontsize=7)
        for j, img in enumerate(images):
            ax = fig.add_axes(((label_w + j * CELL_INCHES) / width, bottom, 0.95 * CELL_INCHES / width,
                               0.95 * CELL_INCHES / height))
            ax.set_axis_off()
            img = np.clip(img, 0, 1)
            if img.shape[0] == 1:
                ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(np.transpose(img, (1, 2, 0)))
    fig.savefig(path, dpi=110)
    plt.close(fig)


@FIGURES.register("text")
def text_transcripts(out: Path, records: list[dict], marks: dict[str, str]) -> list[Path]:
    """One Markdown file per (attack, dataset, model), the text counterpart of the image grids: per
    defense setting (the block's first seed) and sentence, the original and the recovered text after
    each recorded step, marked with the table's verdict, with token accuracy and exact match (DLG Table 1's
    layout: iterations down, examples across, here one table per sentence)."""
    written = []
    blocks = dict.fromkeys((attack_key(r), r["dataset"], r["model"]) for r in records)
    for attack, dataset, model in blocks:
        rows = [r for r in records if (attack_key(r), r["dataset"], r["model"]) == (attack, dataset, model)]
        rows = [r for r in rows if r["seed"] == rows[0]["seed"]]
        lines = [f"# {attack} on {dataset} / {model} (seed {rows[0]['seed']})", ""]
        for r in rows:
            per = r["per_target"]
            lines += [f"## {r['defense_label']} {marks.get(r['key'], NO_VERDICT)}", ""]
            for i, text in enumerate(per["text"]):
                score = (f"Sentence {i + 1}: token accuracy {100 * per['token_accuracy'][i]:.1f}%, exact match "
                         f"{'yes' if per['exact_match'][i] else 'no'}")
                lines += [score, "", "| step | text |", "|---|---|"]
                lines += [f"| {step} | {_cell(recovered)} |" for step, recovered in per["history"][i].items()]
                lines += [f"| original | {_cell(text)} |", ""]
        path = out / f"reconstructions_{attack}_{dataset}_{model}.md"
        path.write_text("\n".join(lines), encoding="utf-8")
        written.append(path)
    return written


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or "(empty)"


def tradeoff_plots(out: Path, summary) -> list[Path]:
    """One PNG per (dataset, model), ``tradeoff_<dataset>_<model>.png``: accuracy against leak rate, a panel
    per attack, one point per defense setting, a line per defense family (settings in the grid's order,
    e.g. noise from weak to strong), the undefended point marked with a star: the picture DLG's Fig. 7
    and Table 3 describe together."""
    written = []
    summary = summary[summary["accuracy"].notna()]
    for (dataset, model), block in summary.groupby(["dataset", "model"], sort=False, observed=True):
        attacks = list(dict.fromkeys(block["attack"]))
        if not attacks:
            continue
        fig, axes = plt.subplots(1, len(attacks), figsize=(3.6 * len(attacks), 3.4), squeeze=False, dpi=110)
        for ax, attack in zip(axes[0], attacks):
            rows = block[block["attack"] == attack]
            for family, points in rows.groupby("family", sort=False, observed=True):
                x, y = 100 * points["leak_rate"].to_numpy(float), 100 * points["accuracy"].to_numpy(float)
                if family == "baseline":
                    ax.scatter(x, y, marker="*", s=160, color="black", zorder=3, label="none")
                else:
                    ax.plot(x, y, marker="o", markersize=4, linewidth=1, label=str(family))
            ax.set_title(str(attack), fontsize=9)
            ax.set_xlabel("leak rate (%)", fontsize=8)
            ax.set_xlim(-5, 105)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
        axes[0][0].set_ylabel("accuracy (%)", fontsize=8)
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.suptitle(f"accuracy vs leak rate: {dataset} / {model}", fontsize=9)
        written.append(_saved(fig, out / f"tradeoff_{dataset}_{model}.png"))
    return written


def _saved(fig, path: Path) -> Path:
    """Lay out, write and close a figure."""
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def roc_plots(out: Path, records: list[dict]) -> list[Path]:
    """One PNG per (attack, dataset, model) of membership records, ``roc_<attack>_<dataset>_<model>.png``:
    the ROC curve on log-log axes (Carlini et al. 2022, Fig. 1), one curve per defense setting (the block's
    first seed), its TPR at 1% FPR in the legend, and the chance diagonal."""
    written = []
    with_roc = [r for r in records if r.get("roc")]
    for attack, dataset, model in dict.fromkeys((attack_key(r), r["dataset"], r["model"]) for r in with_roc):
        rows = [r for r in with_roc if (attack_key(r), r["dataset"], r["model"]) == (attack, dataset, model)]
        rows = [r for r in rows if r["seed"] == rows[0]["seed"]]
        fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=110)
        floor = 1.0 / max(2, max(r["metrics"].get("nonmembers", 2) for r in rows))
        ax.plot([floor, 1], [floor, 1], color="grey", linestyle="--", linewidth=0.8, label="chance")
        for r in rows:
            fpr, tpr = np.asarray(r["roc"]["fpr"]), np.asarray(r["roc"]["tpr"])
            ax.plot(np.maximum(fpr, floor / 2), np.maximum(tpr, floor / 2), linewidth=1,
                    label=f"{r['defense_label']} ({100 * r['metrics']['leak_rate']:.1f}%)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(floor / 2, 1)
        ax.set_ylim(floor / 2, 1)
        ax.axvline(0.01, color="grey", linewidth=0.5)
        ax.set(xlabel="false positive rate", ylabel="true positive rate")
        ax.xaxis.label.set_fontsize(8)
        ax.yaxis.label.set_fontsize(8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower right", title="defense (TPR at 1% FPR)", title_fontsize=6)
        ax.set_title(f"{attack} on {dataset} / {model} (seed {rows[0]['seed']})", fontsize=8)
        written.append(_saved(fig, out / f"roc_{attack}_{dataset}_{model}.png"))
    return written
