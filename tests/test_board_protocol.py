"""The leaderboard protocol: its files, the adaptive attacks, and verify."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from leakbench.attacks.adaptive import matched_distance
from leakbench.data import load
from leakbench.errors import ConfigError
from leakbench.leaderboard.protocol import (
    check_one_recipe, current_protocols, load_protocol, protocols, recipe_of,
)
from leakbench.leaderboard.submit import submit
from leakbench.leaderboard.verify import verify_entries
from leakbench.models import build_model
from leakbench.registry import ATTACKS, DEFENSES
from leakbench.run.grid import load_grid
from leakbench.scoring.reconstruction import score_reconstruction
from leakbench.threat import IDENTITY_MAP, AttackTask

TINY = {
    "datasets": [{"name": "digits", "params": {"image_size": 8}}],
    "attacks": [{"name": "idlg", "params": {"steps": 4}}, {"name": "dlg", "params": {"steps": 4}}],
    "targets": 1,
    "accuracy": {"epochs": 1, "train_size": 96, "test_size": 64},
    "subgrids": [],  # the protocol's model-inversion subgrid has its own test (test_submission.py)
}


@pytest.fixture(scope="module")
def digits8():
    return load("digits", "test", image_size=8)


def pruned_task(data, *, ratio: float, index: int = 0) -> tuple[AttackTask, torch.Tensor]:
    x, y = data.images[index:index + 1], data.labels[index:index + 1]
    model = build_model("lenet-zhu", data.shape, data.num_classes, seed=index)
    defense = DEFENSES.build("pruning", {"ratio": ratio})
    shared = defense.share(model, x, F.one_hot(y, data.num_classes).float(), generator=torch.Generator().manual_seed(0))
    return AttackTask(model=model, shared=shared, input_shape=data.shape, num_classes=data.num_classes, batch_size=1,
                      seed=index, defense_params=defense.get_params(), defense_name="pruning",
                      attacker_map=defense.attacker_map(shared)), x


def test_shipped_protocols_state_what_the_issue_asks():
    known = protocols()
    assert set(known) == {"v1", "v1-smoke", "v2", "v2-smoke", "v3", "v3-smoke"}
    for name, protocol in known.items():
        grid = load_grid(protocol.grid)
        attacks = [a.name for a in grid.attacks]
        assert {"dlg", "idlg", "dlg-batched", "dlg-adaptive", "idlg-adaptive"} <= set(attacks)
        for a in grid.attacks:
            if a.name in ("dlg-adaptive", "idlg-adaptive"):
                assert a.params["restarts"] >= 2 and len(a.params["lr_sweep"]) >= 2
        assert grid.seeds == [0] and [m.name for m in grid.models] == ["lenet-zhu"]
        assert 0 < protocol.accuracy_floor_fraction < 1
        assert {"accuracy", "leak_rate_samples", "psnr_median", "ssim_median", "psnr_ceiling"} == set(protocol.tolerance)
        assert protocol.version == name[:2]
    # v1 and v2 are kept readable, closed to new entries; v3 takes them
    assert known["v1-smoke"].superseded_by == "v2-smoke" and known["v1"].superseded_by == "v2"
    assert known["v2-smoke"].superseded_by == "v3-smoke" and known["v2"].superseded_by == "v3"
    assert current_protocols() == ["v3-smoke", "v3"]
    smoke, full = load_grid(known["v3-smoke"].grid), load_grid(known["v3"].grid)
    # enough targets that a leak rate's interval can separate entries (16: 0% reads [0-19%], 100% [81-100%])
    assert [d.name for d in smoke.datasets] == ["digits"] and smoke.targets >= 16
    assert full.targets >= 16 and all(d.params["image_size"] == 32 for d in full.datasets)
    for name in ("v2-smoke", "v2", "v3-smoke", "v3"):
        inversion = next(c for c in load_grid(known[name].grid).cells() if c.attack.name == "model-inversion")
        assert inversion.attack.params["starts"] >= 16
    with pytest.raises(ConfigError, match="unknown protocol 'v4'"):
        load_protocol("v4")
    with pytest.raises(ConfigError, match=r"protocol 'v2-smoke' is superseded by 'v3-smoke' and takes no new "
                                          r"entries; allowed: v3-smoke, v3"):
        load_protocol("v2-smoke", for_submission=True)


@pytest.mark.parametrize("name", ["v3-smoke", "v3"])
def test_v3_adds_inverting_gradients_a_fedavg_setting_and_membership_inference(name):
    """Issue #18: the protocols run Inverting Gradients (and its adaptive variant) and attack a
    federated-averaging update whose local steps the attacker replays; each attack on a FedAvg update
    has its own score in an entry (``attack_key``), beside the same attack on a gradient."""
    from leakbench.threat import attack_key, attack_of_key

    cells = load_grid(protocols()[name].grid).cells()
    fedsgd = {c.attack.name for c in cells if c.grid.threat.get("local_steps", 1) == 1}
    fedavg = [c for c in cells if c.grid.threat.get("local_steps", 1) > 1]
    assert {"inverting-gradients", "inverting-gradients-adaptive", "membership-loss"} <= fedsgd
    assert {c.attack.name for c in fedavg} == {"dlg", "inverting-gradients"}
    for cell in fedavg:
        assert ATTACKS.get(cell.attack.name).replays_local_training
        assert cell.attack.params["batch_size"] >= 2 and cell.grid.threat["local_batch_size"] == 1
        record = {"attack": cell.attack.name, "threat": dict(cell.grid.threat)}
        assert attack_key(record) == f"{cell.attack.name}.fedavg"
        assert attack_of_key(attack_key(record)) == cell.attack.name
    assert len({attack_key({"attack": c.attack.name, "threat": dict(c.grid.threat)}) for c in cells}) == len(cells)
    # the protocol states its stop rules rather than inheriting defaults that a later version may change
    for cell in cells:
        if cell.attack.name in ("dlg", "idlg", "dlg-batched"):
            assert (cell.attack.params["stop_relative"], cell.attack.params["stall_window"]) == (0.0, 0)


def test_v2_protocols_train_every_part_with_one_recipe():
    """The fake-defense report: v1 trained the accuracy column with Adam and model inversion's MLP with
    SGD, so a defense could keep one and break the other. v2 states one optimiser, learning rate and
    batch size for every part, and refuses a protocol file whose parts disagree."""
    for name in ("v2-smoke", "v2", "v3-smoke", "v3"):
        protocol = load_protocol(name)
        grid = load_grid(protocol.grid)
        recipes = {g.name: recipe_of(g) for g in grid.all_grids()}
        assert len(recipes) >= 2 and len({tuple(sorted(r.items())) for r in recipes.values()}) == 1
        check_one_recipe(protocol, grid)
    v2 = load_protocol("v2-smoke")
    grid = load_grid(v2.grid)
    grid.subgrids[0].accuracy = dataclasses.replace(grid.subgrids[0].accuracy, optimizer="sgd", lr=0.05)
    with pytest.raises(ConfigError, match=r"protocol v2-smoke: grid leaderboard-v2-smoke-inversion trains with "
                                          r".*'sgd'.*; allowed: one training recipe"):
        check_one_recipe(v2, grid)
    check_one_recipe(load_protocol("v1-smoke"), load_grid(load_protocol("v1-smoke").grid))  # v1 predates the rule


def test_protocols_add_model_inversion_everywhere_and_the_gan_attack_on_the_gpu_protocol():
    """Model inversion (both protocols) attacks an MLP, the model it works on, trained under the defense:
    digits for the smoke protocols, MNIST for the GPU ones. gan-active runs in the GPU protocols only (MNIST, 12 rounds); the smoke files say
    why it leaves the GAN attacks out. Each attack runs in one cell, so an entry has one score per attack."""
    from leakbench.threat import attack_key

    cells = {name: {attack_key({"attack": c.attack.name, "threat": dict(c.grid.threat)}): c
                    for c in load_grid(p.grid).cells()} for name, p in protocols().items()}
    for name, dataset in (("v1-smoke", "digits"), ("v1", "mnist"), ("v2-smoke", "digits"), ("v2", "mnist"),
                          ("v3-smoke", "digits"), ("v3", "mnist")):
        assert len(cells[name]) == len(load_grid(protocols()[name].grid).cells())  # no attack twice
        inversion = cells[name]["model-inversion"]
        assert ATTACKS.get("model-inversion").setting == "model"
        assert (inversion.model.name, inversion.model.params["activation"]) == ("mlp", "sigmoid")
        assert inversion.dataset.name == dataset and [d.name for d in inversion.grid.defenses] == ["none"]
    assert {"gan-active", "gan-passive"}.isdisjoint(cells["v1-smoke"]) and {"gan-active"}.isdisjoint(cells["v2-smoke"])
    assert "gan-active" in cells["v2"] and "gan-active" in cells["v3"] and "gan-active" not in cells["v3-smoke"]
    gan = cells["v1"]["gan-active"]
    assert ATTACKS.get("gan-active").setting == "collaborative"
    assert gan.dataset.name == "mnist" and gan.protocol()["max_rounds"] == 12
    assert gan.model.params["extra_class"] is True  # the adversary's artificial class
    smoke_file = load_grid(protocols()["v3-smoke"].grid)
    assert "GAN" in smoke_file.description and "CPU" in smoke_file.description


def test_an_attack_in_two_cells_of_a_protocol_is_refused():
    from leakbench.leaderboard.build import build_entry
    from leakbench.leaderboard.protocol import Measured
    from leakbench.leaderboard.sandbox import DefenseSource

    record = {"attack": "dlg", "threat": {"setting": "gradient"}, "targets": 2, "accuracy": 0.9,
              "metrics": {"leak_rate": 0.5, "psnr_median": 20.0, "ssim_median": 0.6}}
    measured = Measured(records=[record, dict(record)], baseline_accuracy=0.9, params={}, label="none",
                        privacy_claim={}, seeds=[0], device="cpu", wall_seconds=1.0)
    with pytest.raises(ConfigError, match=r"protocol v1-smoke runs dlg in more than one cell") as err:
        build_entry(measured, protocol=load_protocol("v1-smoke"), name="x", authors="tests", link=None,
                    source=DefenseSource.parse("builtin:none"))
    assert "\n" not in str(err.value)


def test_pruning_adaptation_matches_exactly_the_surviving_coordinates(digits8):
    task, _ = pruned_task(digits8, ratio=0.7)
    space = task.attacker_map
    assert space.name == "surviving-coordinates"
    grads = [torch.randn_like(t) for t in task.shared]
    for g, mapped, t in zip(grads, space.apply(grads), task.shared):
        assert torch.equal(mapped[t == 0], torch.zeros_like(mapped[t == 0]))
        assert torch.equal(mapped[t != 0], g[t != 0])
    # the objective is the distance over the surviving coordinates only
    model = task.model
    x = torch.rand(1, *digits8.shape)
    soft = torch.full((1, digits8.num_classes), 1.0 / digits8.num_classes)
    params = [p for p in model.parameters() if p.requires_grad]
    from leakbench.threat import soft_cross_entropy

    dummy = torch.autograd.grad(soft_cross_entropy(model(x), soft), params)
    expected = sum((((d - t) * (t != 0)) ** 2).sum() for d, t in zip(dummy, task.shared))
    distance = float(matched_distance(model, x, soft, task.shared, space).detach())
    assert distance == pytest.approx(float(expected), rel=1e-5)
    # a defense that describes no deterministic part (noise, or a submission that does not opt in) gets
    # the identity: restarts and sweep only; the attack reads no defense name
    assert DEFENSES.build("gaussian-noise", {"variance": 1e-3}).attacker_map(task.shared) is IDENTITY_MAP


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "int8"])
def test_quantization_adaptation_uses_the_defense_quantiser_with_a_straight_through_gradient(digits8, fmt):
    task, _ = pruned_task(digits8, ratio=0.0)
    space = DEFENSES.build("quantization", {"format": fmt}).attacker_map(task.shared)
    assert space.name == f"quantization(format={fmt}) replayed, straight-through"
    grads = [torch.randn_like(t).requires_grad_(True) for t in task.shared]
    mapped = space.apply(grads)
    expected = DEFENSES.build("quantization", {"format": fmt}).transform([g.detach() for g in grads])
    assert all(torch.equal(m.detach(), e) for m, e in zip(mapped, expected))
    sum(m.sum() for m in mapped).backward()
    assert all(torch.equal(g.grad, torch.ones_like(g)) for g in grads)


def test_adaptive_attack_beats_the_fixed_one_on_heavy_pruning(digits8):
    """At 90% pruning iDLG matches zeros it cannot explain and fails; matching only the surviving
    coordinates recovers the image, with the same 20-step budget and no restarts."""
    task, x = pruned_task(digits8, ratio=0.9)
    fixed = ATTACKS.build("idlg", {"steps": 20}).run([task])[0]
    adaptive = ATTACKS.build("idlg-adaptive", {"steps": 20, "restarts": 1, "lr_sweep": [1.0]}).run([task])[0]
    ssim = {name: score_reconstruction(rec.images.clamp(0, 1), x, None, None, metrics=("ssim",))["ssim"][0]
            for name, rec in (("fixed", fixed), ("adaptive", adaptive))}
    assert ssim["adaptive"] > 0.9 > 0.5 > ssim["fixed"]
    assert adaptive.extra["adapted_to"] == "surviving-coordinates"


def test_adaptive_attack_keeps_the_run_with_the_lowest_gradient_distance(digits8):
    """The search's answer is at least as good, by the attacker-visible gradient distance, as each of its
    single runs (restart 0 at each step size is the same dummy as a one-restart search)."""
    task, _ = pruned_task(digits8, ratio=0.0)
    task.attacker_map = None  # as for `none`: nothing to adapt to
    rec = ATTACKS.build("dlg-adaptive", {"steps": 3, "restarts": 2, "lr_sweep": [1.0, 0.1],
                                         "cosine_restart": False}).run([task])[0]
    singles = [ATTACKS.build("dlg-adaptive", {"steps": 3, "restarts": 1, "lr_sweep": [lr],
                                              "cosine_restart": False}).run([task])[0]
               for lr in (1.0, 0.1)]
    assert rec.grad_distance <= min(s.grad_distance for s in singles)
    assert rec.extra["chosen_lr"] in (1.0, 0.1) and rec.extra["chosen_restart"] in (0, 1)
    assert rec.closure_evals >= sum(s.closure_evals for s in singles)  # it paid for all four runs


def test_the_cosine_restart_recovers_a_rescaled_update_the_l2_runs_cannot(digits8):
    """A defense that multiplies the update by 1000 and says nothing of it (the identity map): the L2
    objective chases a gradient a thousand times too large; the cosine run (Geiping et al. 2020) does not
    see the scale, recovers the image, and the attacker-visible choice picks it."""
    task, x = pruned_task(digits8, ratio=0.0)
    task.shared = [1000.0 * t for t in task.shared]
    task.attacker_map = None
    params = {"steps": 30, "restarts": 1, "lr_sweep": [1.0]}
    scores = {}
    for cosine in (False, True):
        rec = ATTACKS.build("idlg-adaptive", {**params, "cosine_restart": cosine}).run([task])[0]
        scores[cosine] = score_reconstruction(rec.images.clamp(0, 1), x, None, None, metrics=("ssim",))["ssim"][0]
        if cosine:
            assert rec.extra["chosen_objective"] == "cosine"
    assert scores[True] > 0.9 and scores[False] < 0.5, scores


def test_verify_passes_on_an_honest_entry_and_fails_on_a_tampered_one(tmp_path, capsys):
    root = tmp_path / "board"
    tiny = {**TINY, "targets": 3}  # v3-smoke tolerates one sample's flip: 3 targets make a full flip visible
    path, entry = submit("builtin:pruning", name="pruning-0.5", params={"ratio": 0.5}, root=root, overrides=tiny)
    assert verify_entries([path], root=root, protocol="v3-smoke", data_dir=None, overrides=tiny) == 0
    assert capsys.readouterr().out.startswith(f"ok   {path}")

    tampered = json.loads(path.read_text())
    tampered["accuracy"]["value"] = round(tampered["accuracy"]["value"] + 0.2, 4)
    tampered["accuracy"]["drop"] = round(tampered["accuracy"]["baseline"] - tampered["accuracy"]["value"], 4)
    tampered["flags"]["below_accuracy_floor"] = tampered["accuracy"]["value"] < tampered["flags"]["accuracy_floor"]
    first = next(iter(tampered["attacks"]))
    tampered["attacks"][first]["leak_rate"] = 1.0 if tampered["attacks"][first]["leak_rate"] < 0.5 else 0.0
    leaks = {a: s["leak_rate"] for a, s in tampered["attacks"].items()}
    tampered["worst_case"] = {"leak_rate": max(leaks.values()), "attack": max(leaks, key=leaks.get)}
    path.write_text(json.dumps(tampered))
    assert verify_entries([path], root=root, protocol="v3-smoke", data_dir=None, overrides=tiny) == 1
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"FAIL {path}") and "accuracy.value" in line and f"{first} leak rate" in line
    assert "\n" not in line


def test_verify_compares_psnr_below_the_ceiling_only():
    """The reported case: none.json's dlg PSNR 83.3 dB re-ran as 84.4 dB on another machine of the same
    kind (MSE 1e-8 vs 1e-9: rounding). Both are above the 60 dB ceiling, so they agree; below it, 1 dB
    of tolerance applies as before, and a recovery that fell below the ceiling is still caught."""
    from leakbench.leaderboard.verify import close

    tolerance = load_protocol("v3-smoke").tolerance
    assert close("psnr_median", 84.394, 83.329, tolerance)
    assert close("psnr_median", 60.5, 97.0, tolerance)
    assert not close("psnr_median", 45.0, 83.3, tolerance)          # no longer near-perfect: a real change
    assert close("psnr_median", 20.4, 20.0, tolerance) and not close("psnr_median", 21.5, 20.0, tolerance)
    assert not close("ssim_median", 0.9, 1.0, tolerance) and close("ssim_median", 0.97, 1.0, tolerance)


def test_the_cli_and_seeding_default_to_the_current_cpu_protocol():
    """A new protocol version moves every default with it (submit, verify, --smoke, seeding)."""
    import inspect

    from leakbench import cli
    from leakbench.leaderboard import builtin_entries, submit

    smoke = current_protocols()[0]
    assert smoke.endswith("-smoke")
    assert cli.DEFAULT_BOARD_PROTOCOL == cli.SMOKE_PROTOCOL == smoke
    assert inspect.signature(submit.submit).parameters["protocol"].default == smoke
    assert f'default="{smoke}"' in inspect.getsource(builtin_entries.main)
