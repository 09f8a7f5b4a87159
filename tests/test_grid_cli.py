"""Grids as data, validation before running, and the CLI's exit codes and one-line errors."""
import subprocess
import sys

import pytest
import yaml

from leakbench.cli import main
from leakbench.errors import ConfigError
from leakbench.run.grid import builtin_grids, load_grid

TINY = {
    "name": "tiny",
    "datasets": [{"name": "digits", "params": {"image_size": 8}}],
    "models": ["lenet-zhu"],
    "attacks": [{"name": "idlg", "params": {"steps": 5}}],
    "defenses": ["none", {"name": "gaussian-noise", "sweep": {"variance": [1e-4, 1e-1]}}],
    "targets": 1,
    "accuracy": {"epochs": 1, "train_size": 64, "test_size": 64},
}


def write(tmp_path, obj, name="grid.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(obj) if not isinstance(obj, str) else obj)
    return path


@pytest.mark.parametrize("name", builtin_grids())
def test_shipped_grids_validate(name):
    grid = load_grid(name)
    assert grid.cells()
    assert main(["validate", name, "--no-data"]) == 0  # the file; its data may not be on this machine


def test_quick_covers_every_attack_and_every_defense_family():
    from leakbench import list_attacks, list_defenses
    from leakbench.registry import ATTACKS, DEFENSES

    grid = load_grid("quick")
    # the grid's own attacks are one-step gradient attacks; GAN and model inversion run in its hitaj-small subgrid
    # adaptive attacks (leaderboard protocol) read the defense's parameters; the quick grid runs the fixed ones
    gradient_attacks = {n for n in list_attacks() if ATTACKS.get(n).setting == "gradient"
                        and not getattr(ATTACKS.get(n), "adaptive", False)}
    assert {a.name for a in grid.attacks if ATTACKS.get(a.name).setting == "gradient"} == gradient_attacks
    # and the loss-threshold membership attack on each defense's trained model (no extra training)
    assert {a.name for a in grid.attacks} - gradient_attacks == {"membership-loss"}
    gradient_defenses = {n for n in list_defenses() if DEFENSES.get(n).family in
                         {"baseline", "noise", "sparsification", "quantization", "large-batch"}}
    assert gradient_defenses <= {d.name for d in grid.defenses}
    assert [d.name for d in grid.datasets] == ["digits"]


def test_sweeps_expand_and_include_merges(tmp_path):
    write(tmp_path, {"targets": 3, "accuracy": {"epochs": 2, "lr": 0.5}, "seeds": [0, 1]}, "base.yaml")
    grid = load_grid(write(tmp_path, {**TINY, "include": "base.yaml", "accuracy": {"epochs": 1}}))
    assert [d.params for d in grid.defenses if d.name == "gaussian-noise"] == [{"variance": 1e-4}, {"variance": 1e-1}]
    assert grid.targets == 1  # the including file wins
    assert grid.accuracy.epochs == 1 and grid.accuracy.lr == 0.5  # mappings merge
    assert grid.seeds == [0, 1]
    assert len(grid.cells()) == 1 * 3 * 2


@pytest.mark.parametrize("patch, message", [
    ({"attacks": [{"name": "dgl"}]}, "unknown attack 'dgl'. Did you mean 'dlg'?"),
    ({"attacks": ["gan-active"], "gan_verdict": {"min_ssim": "high"}},
     "gan_verdict.min_ssim = 'high' is invalid; allowed: auto, or a number in [-1, 1]"),
    ({"attacks": ["gan-active"], "protocol": {"theta_u": 2}}, "theta_u"),
    ({"subgrids": ["nope"]}, "unknown grid 'nope'"),
    ({"defenses": [{"name": "pruning", "params": {"ratio": 1.5}}]},
     "pruning: parameter 'ratio' = 1.5 is invalid; allowed: a number in [0.0, 1.0]"),
    ({"defenses": [{"name": "pruning", "sweep": {"ratio": 0.5}}]}, "sweep must map parameter names to non-empty lists"),
    ({"targetz": 3}, "unknown key 'targetz'. Did you mean 'targets'?"),
    ({"targets": 0}, "targets = 0 is invalid; allowed: an integer >= 1"),
    ({"seeds": "zero"}, "seeds = 'zero' is invalid"),
    ({"threat": {"model_state": "pretrained"}}, "threat.model_state = 'pretrained' is invalid; allowed: random-init, trained"),
    ({"accuracy": {"optimizer": "rmsprop"}}, "accuracy.optimizer = 'rmsprop' is invalid; allowed: 'sgd', 'adam'"),
    ({"datasets": [{"name": "digits", "params": {"scale": "[0,255]"}}]}, "'scale' = '[0,255]' is invalid"),
    ({"models": []}, "'models' must be a non-empty list"),
    ({"verdict": {"metric": "psnr", "threshold": "x"}}, "verdict.threshold = 'x' is invalid"),
])
def test_bad_grids_give_one_clean_line(tmp_path, capsys, patch, message):
    path = write(tmp_path, {**TINY, **patch})
    with pytest.raises(ConfigError) as err:
        load_grid(path)
    assert message in str(err.value)
    out_dir = tmp_path / "out"
    assert main(["run", "--grid", str(path), "--out", str(out_dir), "--no-progress"]) == 2
    err_text = capsys.readouterr().err.strip()
    assert err_text.startswith("leakbench: error: ") and message in err_text and "\n" not in err_text
    assert not out_dir.exists(), "bad input must write nothing"


def test_a_folder_named_like_a_shipped_grid_does_not_hide_it(tmp_path, monkeypatch, capsys):
    """`leakbench run --out quick` leaves a folder named quick; the next `leakbench run` from there
    must still find the shipped quick grid."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quick").mkdir()
    assert main(["validate", "quick"]) == 0
    assert "quick" in capsys.readouterr().out


def test_malformed_yaml_and_missing_files(tmp_path, capsys):
    assert main(["validate", str(write(tmp_path, "attacks: [dlg\n"))]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["validate", "quik"]) == 2
    assert "Did you mean 'quick'?" in capsys.readouterr().err
    assert main(["run", "--grid", "quick", "--device", "tpu"]) == 2
    assert "--device 'tpu' is invalid" in capsys.readouterr().err
    assert main(["run", "--bogus"]) == 2
    assert main(["report", str(tmp_path)]) == 2
    assert "results.jsonl" in capsys.readouterr().err


def test_console_script_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "leakbench.cli", "validate", str(write(tmp_path, {**TINY, "seeds": [-1]}))],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_list_command(capsys):
    assert main(["list", "attacks", "dlg*"]) == 0
    out = capsys.readouterr().out
    assert "dlg" in out and "dlg-batched" in out and "idlg" not in out
    assert main(["list", "grids"]) == 0
    assert "quick" in capsys.readouterr().out


def test_cuda_on_a_cpu_only_machine_is_bad_input(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["run", "--grid", "quick", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
