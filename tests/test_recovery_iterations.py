"""DLG Table 2 as leakbench measures it: a grid's gradient records carry, per target, the first iteration at
which the private batch was recovered (``iterations_to_recover``), and summary.csv its median per row."""
import json

import pandas as pd
import yaml

from leakbench.cli import main
from leakbench.run.results import ResultsStore
from leakbench.scoring.reconstruction import censored_median

# a Table-2-like grid at tiny scale: the batched attack of eq. 5, batch sizes 1 and 4 set as the victim's
# (large-batch), 8x8 digits, the DLG LeNet at its random init
TINY_TABLE2 = {
    "name": "tiny-table2",
    "datasets": [{"name": "digits", "params": {"image_size": 8}}],
    "models": ["lenet-zhu"],
    "attacks": [{"name": "dlg-batched", "params": {"batch_size": 1, "steps": 150, "stop_distance": 1e-9}}],
    "defenses": [{"name": "large-batch", "sweep": {"batch_size": [1, 4]}}],
    "targets": 3,
    "accuracy": {"epochs": 0, "test_size": 50},
}


def test_iterations_to_recover_grow_with_batch_size(tmp_path):
    grid = tmp_path / "tiny-table2.yaml"
    grid.write_text(yaml.safe_dump(TINY_TABLE2))
    out = tmp_path / "out"
    assert main(["run", "--grid", str(grid), "--out", str(out), "--no-progress"]) == 0
    by_batch = {r["threat"]["batch_size"]: r for r in ResultsStore(out / "results.jsonl").records()}
    assert set(by_batch) == {1, 4}
    for record in by_batch.values():
        iterations = record["per_target"]["iterations_to_recover"]
        assert len(iterations) == 3 and "MSE < 0.001" in record["recovery_rule"]
        # recovered no later than the attack stopped
        assert all(it is None or 1 <= it <= steps for it, steps in zip(iterations, record["per_target"]["steps"]))
        assert record["metrics"]["iterations_to_recover_median"] == censored_median(iterations)
        # the evaluator's view of the shared update: its size, and (no defense here) nothing changed
        assert len(record["per_target"]["gradient_rms"]) == 3 and record["metrics"]["gradient_rms_median"] > 0
        assert record["metrics"]["relative_distortion_median"] == 0.0
    single = by_batch[1]["per_target"]["iterations_to_recover"]
    assert sum(it is not None for it in single) >= 2, single
    median = {bs: by_batch[bs]["metrics"]["iterations_to_recover_median"] for bs in by_batch}
    assert median[1] is not None and (median[4] is None or median[4] > median[1]), median
    summary = pd.read_csv(out / "summary.csv")
    assert "iterations_to_recover_median" in summary.columns
    pooled = {row["defense"]: json.loads(row["iterations_to_recover"])
              for _, row in summary.iterrows()}
    assert pooled["large-batch(batch_size=1)"] == single


def test_censored_median_counts_never_as_beyond_the_budget():
    assert censored_median([10, 30, None]) == 30.0
    assert censored_median([10, None, None]) is None
    assert censored_median([10, 20]) == 15.0
    assert censored_median([]) is None
