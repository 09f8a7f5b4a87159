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
