"""The table logic on hand-made records: pooling over seeds, the verdict, and 'no verdict' when the
attack fails even against the undefended baseline."""
import json

from leakbench.run.figures import DEFENDED, LEAKS, NO_VERDICT
from leakbench.run.report import defendability_table, render


def record(attack, defense, family, leak_rate, *, seed=0, accuracy=0.9, psnr=20.0):
    return {
        "dataset": "digits", "model": "lenet-zhu", "seed": seed, "attack": attack, "attack_params": {},
        "defense_label": defense, "defense_family": family, "accuracy": accuracy, "privacy": {},
        "metrics": {"leak_rate": leak_rate, "psnr_median": psnr, "ssim_median": 0.5, "mse_median": 0.01,
                    "label_accuracy": 1.0, "recovered_rate": 0.0, "closure_evals_mean": 10},
        "verdict": {"max_leak_rate": 0.25, "rule": "rule"}, "wall_seconds": 1.0,
    }


def test_verdicts_pool_seeds_and_need_a_working_attack():
    records = [
        record("strong", "none", "baseline", 1.0), record("strong", "noise", "noise", 0.0),
        record("strong", "prune", "sparsification", 0.5, seed=0),
        record("strong", "prune", "sparsification", 0.0, seed=1),  # pooled leak rate 0.25: defended
        record("weak", "none", "baseline", 0.0), record("weak", "noise", "noise", 0.0),
        record("weak", "prune", "sparsification", 1.0),
    ]
    table = defendability_table(records).set_index("defense")
    assert table.loc["none", "strong defends"] == LEAKS
    assert table.loc["noise", "strong defends"] == DEFENDED
    assert table.loc["prune", "strong defends"] == DEFENDED and table.loc["prune", "strong leak"] == "25.0%"
    assert set(table["weak defends"]) == {NO_VERDICT}, "an attack that fails undefended rates nothing"
    assert table.loc["noise", "accuracy"] == "90.0%"


def test_figures_carry_the_tables_verdict_one_file_per_attack_dataset_and_model(tmp_path):
    """The PNG of each (attack, dataset, model) marks each defense as the table does, '–' included."""
    import numpy as np

    from leakbench.run.report import verdict_marks

    def record(key, model, defense, family, leak):
        return {"key": key, "grid": "g", "attack": "dlg", "attack_params": {}, "dataset": "digits", "model": model,
                "seed": 0, "defense": defense, "defense_label": defense, "defense_family": family,
                "accuracy": 0.9, "threat": {"setting": "gradient"},
                "metrics": {"leak_rate": leak, "psnr_median": 10.0},
                "verdict": {"defended": leak <= 0.25, "rule": "r", "max_leak_rate": 0.25}}

    records = [record("a", "m1", "none", "baseline", 1.0), record("b", "m1", "noise", "noise", 0.0),
               record("c", "m2", "none", "baseline", 0.0), record("d", "m2", "noise", "noise", 0.0)]
    assert verdict_marks(records) == {"a": LEAKS, "b": DEFENDED, "c": NO_VERDICT, "d": NO_VERDICT}
    for r in records:
        (tmp_path / "reconstructions").mkdir(exist_ok=True)
        np.savez(tmp_path / "reconstructions" / f"{r['key']}.npz", originals=np.zeros((2, 1, 8, 8), np.float32),
                 reconstructions=np.ones((2, 1, 8, 8), np.float32))
    with (tmp_path / "results.jsonl").open("w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    render(tmp_path, images=True)
    assert sorted(p.name for p in tmp_path.glob("reconstructions_*.png")) == [
        "reconstructions_dlg_digits_m1.png", "reconstructions_dlg_digits_m2.png"]


def test_tradeoff_plot_per_dataset_and_model_places_each_setting(tmp_path):
    """`run` and `paper` draw accuracy against leak rate per (dataset, model): one point per defense
    setting and attack, a line per family, the undefended point as a star."""
    import matplotlib.pyplot as plt

    from leakbench.run import figures
    from leakbench.run.report import summary_frame

    records = [record("dlg", "none", "baseline", 1.0, accuracy=0.95),
               record("dlg", "noise 1e-3", "noise", 0.75, accuracy=0.9),
               record("dlg", "noise 1e-2", "noise", 0.0, accuracy=0.6),
               record("dlg", "prune 0.5", "sparsification", 0.5, accuracy=0.94)]
    drawn = {}
    real_savefig = plt.Figure.savefig

    def capture(fig, path, *args, **kwargs):  # what each panel plots, read back from the figure
        ax = fig.axes[0]
        drawn["lines"] = {line.get_label(): list(zip(*line.get_data())) for line in ax.get_lines()}
        drawn["star"] = [tuple(o) for c in ax.collections for o in c.get_offsets()]
        return real_savefig(fig, path, *args, **kwargs)

    plt.Figure.savefig = capture
    try:
        paths = figures.tradeoff_plots(tmp_path, summary_frame(records))
    finally:
        plt.Figure.savefig = real_savefig
    assert [p.name for p in paths] == ["tradeoff_digits_lenet-zhu.png"] and paths[0].stat().st_size > 0
    assert drawn["lines"]["noise"] == [(75.0, 90.0), (0.0, 60.0)]
    assert drawn["lines"]["sparsification"] == [(50.0, 94.0)]
    assert drawn["star"] == [(100.0, 95.0)]
