"""A ResNet-18 with BatchNorm under the gradient threat model: the victim's BatchNorm runs in train mode
(batch statistics) or eval mode (running statistics), records say which and what the attacker was given,
and ``model_state: trained`` hands the attacker the trained weights and running statistics."""
import pytest
import torch
from torch import nn

from leakbench.models import build_model
from leakbench.run.grid import parse_grid
from leakbench.run.runner import RunOptions, Runner

# kuangliu/pytorch-cifar's ResNet18 (and breaching's) on 32x32x3 inputs with 10 classes
RESNET18_CIFAR10_PARAMETERS = 11_173_962


def test_resnet18_is_the_cifar_resnet18_with_running_batchnorm():
    model = build_model("resnet18", (3, 32, 32), 10)
    assert sum(p.numel() for p in model.parameters()) == RESNET18_CIFAR10_PARAMETERS
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 20 and all(m.track_running_stats for m in norms)
    small = build_model("resnet18", (1, 8, 8), 7, width=0.0625)
    assert small(torch.rand(2, 1, 8, 8)).shape == (2, 7)


def _grid(threat):
    return parse_grid({
        # 16x16: the last stage's map is 2x2, so one image has batch statistics to normalise by
        "datasets": [{"name": "digits", "params": {"image_size": 16}}],
        "models": [{"name": "resnet18", "params": {"width": 0.0625, "activation": "sigmoid"}}],
        "attacks": [{"name": "dlg", "params": {"steps": 2}}], "defenses": ["none"], "targets": 1,
        "threat": threat, "accuracy": {"epochs": 1, "train_size": 64, "test_size": 64, "batch_size": 16},
    })


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_records_say_how_the_victims_batchnorm_ran_and_what_the_attacker_got(tmp_path, bn_mode):
    grid = _grid({"model_state": "trained", "train_steps": 3, "bn_mode": bn_mode})
    (record,) = Runner(grid, RunOptions(out_dir=tmp_path, progress=False)).run()
    threat = record["threat"]
    assert threat["bn_mode"] == bn_mode and threat["model_state"] == "trained"
    given = threat["batchnorm_given_to_attacker"]
    assert ("running statistics" in given) == (bn_mode == "eval")
    assert record["per_target"]["closure_evals"][0] > 0
    # the trained weights' running statistics moved away from the init (mean 0, variance 1)
    cached = list((tmp_path / "cache" / "pretrained").glob("*.pt"))
    state = torch.load(cached[0], weights_only=True)
    assert any(k.endswith("running_mean") and float(v.abs().max()) > 0 for k, v in state.items())


def test_the_victims_batchnorm_mode_changes_what_it_shares():
    """Train mode normalises by the private batch's own statistics, eval mode by the running ones: the
    shared gradients differ, so the mode is part of the threat model (and of the cell's key)."""
    from leakbench.cells.gradient import _attacker_model, _victim_model
    from leakbench.threat import parameter_gradients

    model = build_model("resnet18", (1, 8, 8), 10, seed=0, width=0.0625, activation="sigmoid")
    with torch.no_grad():  # running statistics as after training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x, y = torch.rand(2, 1, 8, 8), torch.eye(10)[[3, 5]]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = parameter_gradients(_victim_model(model, "train"), x, y)
    evaluated = parameter_gradients(_victim_model(model, "eval"), x, y)
    assert sum(float((a - b).abs().sum()) for a, b in zip(train, evaluated)) > 1e-3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # shared model untouched
    # the attacker's model computes the victim's function in either mode
    for mode, shared in (("train", train), ("eval", evaluated)):
        attacker = _attacker_model(model, mode).eval()
        replay = parameter_gradients(attacker, x, y)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(replay, shared)), mode
    assert _grid({"bn_mode": "eval"}).cells()[0].key() != _grid({}).cells()[0].key()
