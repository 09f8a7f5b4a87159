"""A leaderboard that a fake defense cannot top: defenses that only obfuscate the update (invertible
transformations with no privacy effect) fool the fixed attacks, but the adaptive attacks replay the
submitted transform itself (in the sandbox: autograd, straight-through or expectation over draws) and
leak at least as much as against no defense at all."""
from __future__ import annotations

import textwrap

import pytest

from leakbench.leaderboard.bubblewrap import bwrap_problem
from leakbench.leaderboard.protocol import load_protocol, run_protocol
from leakbench.leaderboard.sandbox import DefenseSource, SandboxLimits

OBFUSCATIONS = textwrap.dedent('''
    import torch
    from leakbench import Defense

    def _fixed(u):  # a fixed, public, seed-free choice per tensor shape: no secret, no privacy
        return torch.Generator().manual_seed(u.numel())

    class Scale(Defense):
        def transform(self, update, *, generator=None):
            return [1000.0 * u for u in update]

    class Permute(Defense):
        def transform(self, update, *, generator=None):
            return [u.flatten()[torch.randperm(u.numel(), generator=_fixed(u))].view_as(u) for u in update]

    class FlipShift(Defense):
        def transform(self, update, *, generator=None):
            return [0.5 - 3.0 * u.flip(-1) for u in update]

    class Rescale(Defense):
        def transform(self, update, *, generator=None):
            return [u * torch.exp(torch.randn(u.shape, generator=_fixed(u))) for u in update]
''')


@pytest.fixture(scope="module")
def smoke_attacks():
    """The protocol's own dlg-adaptive at its configured budget, dlg for the control, two targets, one
    training epoch, no model inversion: the attacks are what is under test. (idlg-adaptive reads its
    labels from the shared update as it is, so a permuted update costs it its labels; dlg-adaptive
    optimises them, and one adaptive attack that leaks sets the worst case.)"""
    protocol = load_protocol("v3-smoke")
    attacks = [a for a in protocol.grid_raw()["attacks"] if a["name"] in ("dlg", "dlg-adaptive")]
    assert {a["name"] for a in attacks} == {"dlg", "dlg-adaptive"}
    overrides = {"attacks": attacks, "targets": 2, "subgrids": [],
                 "accuracy": {"epochs": 1, "train_size": 96, "test_size": 64}}
    return protocol, overrides


@pytest.fixture(scope="module")
def undefended(smoke_attacks):
    return leak_rates("builtin:none", smoke_attacks)


def leak_rates(spec: str, smoke_attacks) -> dict[str, float]:
    protocol, overrides = smoke_attacks
    measured = run_protocol(DefenseSource.parse(spec), {}, name="obfuscation", protocol=protocol,
                            overrides=overrides,
                            limits=SandboxLimits(timeout_s=600, trust_code=bwrap_problem() is not None))
    return {r["attack"]: r["metrics"]["leak_rate"] for r in measured.records}


@pytest.mark.parametrize("name", ["Scale", "Permute", "FlipShift", "Rescale"])
def test_an_obfuscation_only_defense_leaks_at_least_as_much_as_none(name, tmp_path, smoke_attacks, undefended):
    path = tmp_path / "obfuscations.py"
    path.write_text(OBFUSCATIONS)
    obfuscated = leak_rates(f"{path}:{name}", smoke_attacks)
    assert undefended["dlg"] == 1.0 and obfuscated["dlg"] == 0.0, "control: the obfuscation fools a fixed attack"
    assert obfuscated["dlg-adaptive"] >= undefended["dlg-adaptive"] == 1.0, obfuscated
