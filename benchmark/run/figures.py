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

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

DEFENDED, LEAKS, NO_VERDICT = "✓", "✗", "–"

# modality -> figure(out_dir, records) -> written paths
FIGURES: Registry[Callable[[Path, list[dict]], list[Path]]] = Registry("figure")


def modality_of(record: dict) -> str:
    """The modality of a record's data (image when its dataset is not registered here)."""
    name = record["dataset"]
    return DATASETS.get(name).modality if name in DATASETS else "image"


def render_samples(out: Path, records: list[dict]) -> list[Path]:
    """Every figure of ``records``, each modality's records drawn by its figure."""
    by_modality: dict[str, list[dict]] = {}
    for r in records:
        by_modality.setdefault(modality_of(r), []).append(r)
    return [path for modality, rs in by_modality.items() if modality in FIGURES
            for path in FIGURES.get(modality)(out, rs)]


@FIGURES.register("image")
def image_grids(out: Path, records: list[dict], max_samples: int = 8) -> list[Path]:
    """One PNG per attack: originals on top, then a row of matched reconstructions per defense setting
    (the attack's first dataset, model and seed in the grid); for GAN attacks the 'originals' are each
    sample's nearest real image of the victim's class."""
    written = []
    for attack in dict.fromkeys(r["attack"] for r in records):
        first = next(r for r in records if r["attack"] == attack)  # its first dataset, model and seed
        rows = [r for r in records if r["attack"] == attack and r["dataset"] == first["dataset"]
                and r["model"] == first["model"] and r["seed"] == first["seed"]]
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
            mark = DEFENDED if r["verdict"]["defended"] else LEAKS
            panels.append((f"{r['defense_label']} {mark}", recon))
        n = max(len(images) for _, images in panels)
        fig, axes = plt.subplots(len(panels), n, figsize=(1.2 * n + 1.8, 1.2 * len(panels)), squeeze=False)
        for ax in axes.flat:
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        for i, (label, images) in enumerate(panels):
            for j, img in enumerate(images):
                img = np.clip(img, 0, 1)
                if img.shape[0] == 1:
                    axes[i, j].imshow(img[0], cmap="gray", vmin=0, vmax=1)
                else:
                    axes[i, j].imshow(np.transpose(img, (1, 2, 0)))
            axes[i, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
        fig.suptitle(f"{attack} on {first['dataset']} / {first['model']}", fontsize=9)
        fig.tight_layout()
        path = out / f"reconstructions_{attack}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")  # keep the long row labels
        plt.close(fig)
        written.append(path)
    return written
