"""The distribution is one package assembled from the repo's top-level folders, and works installed
regularly (from the built wheel) and editable (the README's test line installs it so)."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import leakbench

REPO = Path(__file__).resolve().parents[1]


def test_pytest_never_imports_the_plugin_folders_as_top_level_packages():
    from leakbench import attacks, defenses

    assert "attacks" not in sys.modules and "defenses" not in sys.modules and "benchmark" not in sys.modules
    assert Path(attacks.__file__).parent.name == "attacks"
    assert Path(defenses.__file__).parent.name == "defenses"


def test_editable_or_regular_install_resolves_every_subpackage():
    from leakbench import attacks, defenses

    root = Path(leakbench.__file__).parent
    if root == REPO / "benchmark":  # editable: the mapping points into the repo's folders
        assert Path(attacks.__file__).parent == REPO / "attacks"
        assert Path(defenses.__file__).parent == REPO / "defenses"
    else:  # regular: one package directory in site-packages
        assert Path(attacks.__file__).parent == root / "attacks"
    from importlib import resources

    assert resources.files("leakbench.configs").joinpath("quick.yaml").is_file()


def test_built_wheel_is_complete_and_runs_from_a_clean_location(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(REPO)], check=True, cwd=tmp_path)
    wheel = next(dist.glob("leakbench-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("leakbench/__init__.py", "leakbench/cli.py", "leakbench/attacks/dlg.py",
                     "leakbench/defenses/noise.py", "leakbench/configs/quick.yaml", "leakbench/configs/full.yaml",
                     "leakbench/configs/_defaults.yaml", "leakbench/attacks/lbfgs_direction.cpp"):
        assert expected in names, expected
    assert not any(n.startswith(("attacks/", "defenses/", "benchmark/", "tests/")) for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, cwd=tmp_path)
    code = ("import leakbench, sys; from leakbench.run.grid import load_grid; "
            "print(leakbench.__file__); print(len(load_grid('quick').cells())); print(','.join(leakbench.list_attacks()))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    file, cells, attacks = out.stdout.strip().splitlines()
    assert Path(file).is_relative_to(site)
    assert int(cells) > 0 and "dlg" in attacks.split(",")
