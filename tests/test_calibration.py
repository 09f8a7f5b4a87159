"""The shipped recognisability rule agrees with what DLG's Table 3 reports a human sees, on real data:
Gaussian noise of variance 1e-4 and 1e-3 does not defend, 1e-2 and 1e-1 do, fp16 does not; and the
accuracy column moves the same way (noise costs accuracy, fp16 costs none)."""
import pytest

from leakbench.run.grid import load_grid, parse_grid
from leakbench.run.runner import Runner, RunOptions

PAPER_VERDICTS = {  # Table 3: True = defends (✓), False = fails to defend (✗)
    "gaussian-noise(variance=0.0001)": False,
    "gaussian-noise(variance=0.001)": False,
    "gaussian-noise(variance=0.01)": True,
    "gaussian-noise(variance=0.1)": True,
    "quantization(format=fp16)": False,
}


@pytest.mark.parametrize("dataset, image_size", [("digits", 12), ("mnist", 16)])
def test_default_rule_reproduces_table3_direction(tmp_path, request, dataset, image_size):
    data_dir = request.getfixturevalue("mnist_dir") if dataset == "mnist" else None
    shipped = load_grid("quick")  # the default verdict rule, as users get it
    grid = parse_grid({
        "name": f"calibration-{dataset}",
        "datasets": [{"name": dataset, "params": {"image_size": image_size}}],
        "models": ["lenet-zhu"],
        "attacks": [{"name": "dlg", "params": {"steps": 60, "stop_distance": 1e-8}}],
        "defenses": ["none", {"name": "gaussian-noise", "sweep": {"variance": [1e-4, 1e-3, 1e-2, 1e-1]}},
                     {"name": "quantization", "params": {"format": "fp16"}}],
        "targets": 3,
        "verdict": vars(shipped.verdict),
        "accuracy": {"epochs": 3, "train_size": 1500, "test_size": 500},
    })
    records = Runner(grid, RunOptions(out_dir=tmp_path, data_dir=data_dir, progress=False)).run()
    by_label = {r["defense_label"]: r for r in records}
    # the undefended attack must work, or no verdict below means anything
    assert not by_label["none"]["verdict"]["defended"], by_label["none"]["metrics"]
    measured = {label: by_label[label]["verdict"]["defended"] for label in PAPER_VERDICTS}
    assert measured == PAPER_VERDICTS, {k: by_label[k]["metrics"]["ssim_median"] for k in PAPER_VERDICTS}
    accuracy = {label: r["accuracy"] for label, r in by_label.items()}
    assert accuracy["none"] - accuracy["gaussian-noise(variance=0.1)"] > 0.2, accuracy
    assert abs(accuracy["none"] - accuracy["quantization(format=fp16)"]) <= 0.02, accuracy
    assert accuracy["gaussian-noise(variance=0.0001)"] >= accuracy["gaussian-noise(variance=0.1)"], accuracy
