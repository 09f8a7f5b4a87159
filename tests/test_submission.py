"""Submitting a defense: the sandbox's limits and checks, the worked example end to end, entry points, and
a defense that tries to tell the accuracy run from the attack runs."""
from __future__ import annotations

import textwrap

import pytest

from leakbench.cli import main
from leakbench.errors import ConfigError
from leakbench.leaderboard.bubblewrap import bwrap_problem
from leakbench.leaderboard.sandbox import SandboxLimits, SubmissionError
from leakbench.leaderboard.schema import load_board, load_entry
from leakbench.leaderboard.submit import submit

# A tiny protocol override: the v3-smoke structure with budgets small enough for the test suite.
TINY = {
    "datasets": [{"name": "digits", "params": {"image_size": 8}}],
    "attacks": [{"name": "dlg", "params": {"steps": 4}},
                {"name": "dlg-adaptive", "params": {"steps": 2, "restarts": 1, "lr_sweep": [1.0, 0.1]}}],
    "targets": 1,
    "accuracy": {"epochs": 1, "train_size": 96, "test_size": 64},
    "subgrids": [],  # the protocol's model-inversion subgrid has its own test (below)
}
# Submissions run confined by bubblewrap where it can run (.ci/run installs it; tests/test_sandbox.py proves
# the confinement). Where it cannot, these tests of the protocol and its checks run the code unconfined.
NO_SANDBOX = bwrap_problem() is not None
FAST = SandboxLimits(timeout_s=120, memory_mb=4096, trust_code=NO_SANDBOX)


def defense_file(tmp_path, body: str, *, name: str = "bad_defense.py", cls: str = "Bad") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(f"""
        import math, time
        import torch
        from leakbench import Defense, Param

        class {cls}(Defense):
            def transform(self, update, *, generator=None):
        """) + textwrap.indent(textwrap.dedent(body), " " * 8))
    return f"{path}:{cls}"


def board_files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


BROKEN = {
    "crash": ("raise ZeroDivisionError('boom')", "transform failed: ZeroDivisionError: boom (bad_defense.py line"),
    "nan": ("return [u * float('nan') for u in update]", "transform tensor 0 has non-finite values"),
    "wrong-shape": ("return [u.flatten() for u in update]", "transform tensor 0 has shape"),
    "wrong-dtype": ("return [u.double() for u in update]", "has dtype float64, expected float32"),
    "wrong-count": ("return update[:-1]", "tensors, expected"),
    "not-a-list": ("return update[0]", "transform returned Tensor, expected a list of tensors"),
    "process-exit": ("import os; os._exit(3)", "the sandbox process exited with status 3 while answering share"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_defense_fails_with_one_line_and_writes_nothing(tmp_path, kind):
    body, expected = BROKEN[kind]
    root = tmp_path / "board"
    with pytest.raises(SubmissionError) as err:
        submit(defense_file(tmp_path, body), name="broken", root=root, overrides=TINY, limits=FAST)
    message = str(err.value)
    assert expected in message and "\n" not in message
    assert board_files(root) == []


def test_cli_reports_a_crash_on_one_line_with_exit_2(tmp_path, capsys):
    root = tmp_path / "board"
    (root / "v3-smoke").mkdir(parents=True)
    (root / "v3-smoke" / "kept.json").write_text("{}")
    code = main(["submit", defense_file(tmp_path, "raise ValueError('no')"), "--name", "broken",
                 "--root", str(root), "--smoke", *(["--trust-code"] if NO_SANDBOX else [])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("leakbench: error: submitted defense") and "ValueError: no" in err[-1]
    assert not any("Traceback" in line for line in err)
    assert board_files(root) == ["v3-smoke", "v3-smoke/kept.json"]  # the board is untouched


def test_timeout_kills_the_sandbox(tmp_path):
    root = tmp_path / "board"
    with pytest.raises(SubmissionError, match=r"timed out: the submission's time limit of 8 s \(--timeout\)"):
        submit(defense_file(tmp_path, "time.sleep(600)"), name="slow", root=root, overrides=TINY,
               limits=SandboxLimits(timeout_s=8, memory_mb=4096, trust_code=NO_SANDBOX))
    assert board_files(root) == []


def test_memory_limit_stops_a_runaway_allocation(tmp_path):
    root = tmp_path / "board"
    body = "hog = torch.ones(2 ** 29)  # 2 GiB of float32\nreturn [u.clone() for u in update]"
    with pytest.raises(SubmissionError, match="out of memory|MemoryError|memory"):
        submit(defense_file(tmp_path, body), name="hog", root=root, overrides=TINY,
               limits=SandboxLimits(timeout_s=120, memory_mb=1024, trust_code=NO_SANDBOX))
    assert board_files(root) == []


def test_bad_inputs_fail_before_running(tmp_path):
    root = tmp_path / "board"
    spec = "examples/defenses/clipped_noise.py:ClippedNoise"
    with pytest.raises(ConfigError, match="--name 'Bad Name' is invalid"):
        submit(spec, name="Bad Name", root=root)
    with pytest.raises(ConfigError, match="does not exist"):
        submit("missing.py:X", name="x", root=root)
    with pytest.raises(ConfigError, match="unknown parameter 'clp'"):
        submit(spec, name="x", root=root, params={"clp": 1.0}, overrides=TINY, limits=FAST)
    assert board_files(root) == []


def test_worked_example_submits_and_appears_on_the_board(tmp_path):
    """examples/defenses/clipped_noise.py, written only against the public API, becomes a valid entry
    whose numbers come from the protocol run; a second submission under the same name is refused."""
    root = tmp_path / "board"
    path, entry = submit("examples/defenses/clipped_noise.py:ClippedNoise", name="clipped-noise", authors="tests",
                         params={"clip": 1.0, "noise_ratio": 0.5}, root=root, overrides=TINY, limits=FAST,
                         reported={"claim": "robust"})
    assert path == root / "v3-smoke" / "clipped-noise.json"
    loaded = load_entry(path)  # the board's validator accepts it
    assert [e.name for e in load_board("v3-smoke", root)] == ["clipped-noise"]
    assert loaded.data["defense"] == {"source": "file:examples/defenses/clipped_noise.py:ClippedNoise",
                                      "params": {"clip": 1.0, "noise_ratio": 0.5}}
    assert set(entry["attacks"]) == {"dlg", "dlg-adaptive"}
    assert entry["attacks"]["dlg-adaptive"]["variant"] == "adaptive" and entry["attacks"]["dlg"]["variant"] == "fixed"
    assert entry["worst_case"]["leak_rate"] == max(a["leak_rate"] for a in entry["attacks"].values())
    assert 0 < entry["accuracy"]["baseline"] <= 1 and entry["flags"]["accuracy_floor"] == pytest.approx(
        0.5 * entry["accuracy"]["baseline"], abs=1e-4)
    assert entry["privacy"] == {} and entry["reported"] == {"claim": "robust"}
    assert entry["provenance"]["wall_seconds"] > 0
    with pytest.raises(ConfigError, match="already exists"):
        submit("examples/defenses/clipped_noise.py:ClippedNoise", name="clipped-noise", root=root, overrides=TINY)


# -- telling the accuracy run from the attack runs ------------------------------------------------------

NOISE = """
    import math
    import torch
    from leakbench import Defense, Param

    class {cls}(Defense):
        params = (Param("variance", float, 1e-3),)

        def noisy(self, update, generator, variance):
            std = math.sqrt(variance)
            return [u + std * torch.randn(u.shape, generator=generator, dtype=u.dtype) for u in update]
"""
HONEST = NOISE + """
        def transform(self, update, *, generator=None):
            return self.noisy(update, generator, self.variance)
"""
# Looks for any sign of being attacked: leakbench's attack and training functions on the stack, the modules
# they live in, the process it runs in. Attacked, it shares pure noise (the attacks get nothing); trained,
# it is honest. It also fails loudly if two calls ever come through different call stacks.
SNIFFER = NOISE + """
        stacks = set()
        strict = True  # fail if two calls come through different call stacks

        def attacked(self):
            import inspect, os, sys
            names = {f.function for f in inspect.stack()}
            files = {f.filename for f in inspect.stack()}
            self.stacks.add(tuple(sorted(names)))
            if self.strict and len(self.stacks) > 1:
                raise RuntimeError(f"saw {len(self.stacks)} different call stacks")
            training = "train_with_defense" in names or "accuracy_run" in names
            attack = bool(names & {"run_gradient_cell", "run_cell", "run_one"}) or any(
                "attacks" in f or "runner" in f for f in files) or os.environ.get("PYTEST_CURRENT_TEST")
            return bool(attack) and not training

        def transform(self, update, *, generator=None):
            if self.attacked():
                return self.noisy([torch.zeros_like(u) for u in update], generator, 1.0)
            return self.noisy(update, generator, self.variance)
"""


def _numbers(entry):
    return entry["accuracy"], entry["attacks"], entry["worst_case"]


def test_a_defense_that_tries_to_tell_the_runs_apart_gains_nothing(tmp_path, monkeypatch):
    """Honest noise (installed as an entry-point plugin) and a sniffer that cheats whenever it sees an
    attack get identical entries: in the sandbox every update comes through the same call with the same
    kind of inputs. Run in-process, the same sniffer would cheat, which is why submissions never are."""
    plugin = tmp_path / "site"
    (plugin / "honest_plugin-0.1.dist-info").mkdir(parents=True)
    (plugin / "honest_plugin.py").write_text(textwrap.dedent(HONEST.replace("{cls}", "HonestNoise")))
    (plugin / "honest_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: honest-plugin\n"
                                                                    "Version: 0.1\n")
    (plugin / "honest_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[leakbench.defenses]\nhonest-noise = honest_plugin:HonestNoise\n")
    monkeypatch.setenv("PYTHONPATH", str(plugin))  # what `pip install` would make visible to the sandbox
    sniffer = tmp_path / "sniffer.py"
    sniffer.write_text(textwrap.dedent(SNIFFER.replace("{cls}", "Sniffer")))
    params = {"variance": 1e-4}

    _, honest = submit("entry-point:honest-noise", name="noise", root=tmp_path / "a", params=params,
                       overrides=TINY, limits=FAST)
    _, cheat = submit(f"{sniffer}:Sniffer", name="noise", root=tmp_path / "b", params=params,
                      overrides=TINY, limits=FAST)
    assert honest["defense"]["source"] == "entry-point:honest-noise"
    assert _numbers(cheat) == _numbers(honest)
    assert honest["attacks"]["dlg"]["psnr_median"] > 15  # variance 1e-4 leaks: cheating would have shown

    # the same sniffer run in-process (as trusted built-ins are) does detect the attacks and cheats
    import importlib.util

    from leakbench.registry import DEFENSES

    spec = importlib.util.spec_from_file_location("sniffer_in_process", sniffer)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.Sniffer.strict = False  # in-process the stacks do differ; let it cheat
    DEFENSES.add("test-sniffer-in-process", module.Sniffer)
    try:
        _, in_process = submit("builtin:test-sniffer-in-process", name="noise", root=tmp_path / "c", params=params,
                               overrides=TINY)
        # honest while trained, pure noise when attacked
        assert in_process["accuracy"]["value"] > in_process["flags"]["accuracy_floor"]
        assert in_process["attacks"]["dlg"]["psnr_median"] < honest["attacks"]["dlg"]["psnr_median"] - 5
    finally:
        DEFENSES.remove("test-sniffer-in-process")


# -- attacks on the trained model and inside the collaborative protocol ---------------------------------

# The v3-smoke model-inversion subgrid's structure (an MLP on the digits) with test-sized budgets.
TINY_INVERSION = {
    "name": "tiny-inversion",
    "datasets": [{"name": "digits", "params": {"image_size": 8}}],
    "models": [{"name": "mlp", "params": {"depth": 1, "hidden": 32, "activation": "sigmoid"}}],
    "attacks": [{"name": "model-inversion", "params": {"target_class": 3, "steps": 30, "step_size": 1.0}}],
    "defenses": ["none"],
    "gan_verdict": {"min_ssim": 0.3},
    # one epoch: the proxy of a sandboxed defense draws the child's seed from the run's generator, which the
    # next epoch's batch order also draws from, so only a one-epoch run matches an in-process run batch for batch
    # the v2 protocols' one training recipe (Adam 1e-3, batch 32) in every part, as the main grid's
    "accuracy": {"epochs": 1, "batch_size": 32, "optimizer": "adam", "lr": 0.001, "train_size": 128, "test_size": 64},
}
HALVED = """
    import torch
    from leakbench import Defense

    class Halved(Defense):
        # shares half of each update (every other coordinate): a change that Adam, scale-invariant, sees
        def transform(self, update, *, generator=None):
            return [(u.flatten() * (torch.arange(u.numel()) % 2 == 0)).view_as(u) for u in update]
"""


def test_model_inversion_attacks_the_model_the_submitted_defense_trained(tmp_path, monkeypatch):
    """The model-inversion cell inverts the model its accuracy run trained through the sandboxed defense:
    the weights it attacks equal an in-process accuracy run of the same (deterministic) class, and differ
    from the undefended model's. Its entry scores are the GAN-style fields, and count in the worst case."""
    import importlib.util

    import torch

    from leakbench.attacks.model_inversion import ModelInversion
    from leakbench.leaderboard.protocol import protocol_grid
    from leakbench.registry import DEFENSES
    from leakbench.run.runner import Runner, RunOptions

    attacked = []
    invert = ModelInversion.attack_model

    def spy(self, model, **kwargs):
        attacked.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return invert(self, model, **kwargs)

    monkeypatch.setattr(ModelInversion, "attack_model", spy)
    path = tmp_path / "halved.py"
    path.write_text(textwrap.dedent(HALVED))
    _, entry = submit(f"{path}:Halved", name="halved", root=tmp_path / "board", limits=FAST,
                      overrides={**TINY, "subgrids": [TINY_INVERSION]})
    assert len(attacked) == 1
    scores = entry["attacks"]["model-inversion"]
    assert set(scores) == {"leak_rate", "oracle_accuracy", "nn_ssim_mean", "targets", "protocol_accuracy", "variant"}
    assert scores["variant"] == "fixed" and scores["targets"] == 1 and scores["nn_ssim_mean"] is not None
    assert set(entry["attacks"]) == {"dlg", "dlg-adaptive", "model-inversion"}
    assert entry["worst_case"]["leak_rate"] == max(a["leak_rate"] for a in entry["attacks"].values())

    def trained(defense_name):
        grid = protocol_grid(TINY_INVERSION, {"name": defense_name, "params": {}}, source="tiny-inversion")
        runner = Runner(grid, RunOptions(out_dir=tmp_path / defense_name, progress=False))
        accuracy, model = runner.trained_model(grid.cells()[0])
        return accuracy, model.state_dict()

    spec = importlib.util.spec_from_file_location("halved_in_process", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    DEFENSES.add("test-halved-in-process", module.Halved)
    try:
        accuracy, halved = trained("test-halved-in-process")
    finally:
        DEFENSES.remove("test-halved-in-process")
    _, undefended = trained("none")
    assert set(attacked[0]) == set(halved)
    assert all(torch.allclose(attacked[0][k], halved[k], atol=1e-6) for k in halved)
    assert max(float((attacked[0][k] - undefended[k]).abs().max()) for k in undefended) > 1e-3
    assert scores["protocol_accuracy"] == pytest.approx(accuracy["accuracy"], abs=1e-4)


# The v2 GAN subgrid's structure (gan-active, hitaj-mnist-cnn, two participants) on the digits, tiny.
TINY_GAN = {
    "name": "tiny-gan",
    "datasets": [{"name": "digits", "params": {"image_size": 32, "scale": "[-1,1]"},
                  "protocol": {"participant_labels": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]],
                               "samples_per_participant": 64}}],
    "models": [{"name": "hitaj-mnist-cnn", "params": {"extra_class": True}}],
    "attacks": [{"name": "gan-active", "params": {"target_class": 3, "generator_width": 4, "samples": 8,
                                                  "generator_batch": 8}}],
    "defenses": ["none"],
    "protocol": {"lr": 0.05, "max_rounds": 2, "local_batches": 2, "evaluate_local": False},
    "gan_verdict": {"min_ssim": 0.3},
    "accuracy": {"epochs": 1, "batch_size": 32, "optimizer": "adam", "lr": 0.001, "train_size": 64, "test_size": 64},
}
# Logs every transform call (to a file the test reads: the object lives in the sandbox) and whether its own
# compute_update produced the update; shares nothing.
ZERO_UPLOADS = """
    import json
    import torch
    from leakbench import Defense

    class ZeroUploads(Defense):
        computed = False

        def compute_update(self, model, x, soft_labels, *, generator=None):
            self.computed = True
            return super().compute_update(model, x, soft_labels, generator=generator)

        def transform(self, update, *, generator=None):
            with open(LOG, "a") as log:
                log.write(json.dumps({"after_compute_update": self.computed,
                                      "shapes": [list(u.shape) for u in update]}) + "\\n")
            self.computed = False
            return [torch.zeros_like(u) for u in update]
"""


def test_gan_uploads_go_through_the_submitted_transform(tmp_path):
    """In the GAN cell every participant's upload (the turn's parameter delta, computed by leakbench) goes
    through the sandboxed object's transform: one transform-only call per participant and round, with the
    shared model's shapes. Its zeros reach the server (the global model never moves). The cell's scores
    enter the entry with the GAN-style fields and count in the worst case."""
    import json

    from leakbench.leaderboard.build import build_entry
    from leakbench.leaderboard.protocol import load_protocol, run_protocol
    from leakbench.leaderboard.sandbox import DefenseSource
    from leakbench.models import build_model

    log = tmp_path / "transform.log"
    path = tmp_path / "zero_uploads.py"
    path.write_text(textwrap.dedent(ZERO_UPLOADS).replace("LOG", repr(str(log))))
    source = DefenseSource.parse(f"{path}:ZeroUploads")
    protocol = load_protocol("v3-smoke")
    # the defense logs its calls to a file of the test's: outside the bubblewrap sandbox, which would
    # refuse that write (tests/test_sandbox.py proves it), so this trusted test code runs unconfined
    trusted = SandboxLimits(timeout_s=120, memory_mb=4096, trust_code=True)
    measured = run_protocol(source, {}, name="zero", protocol=protocol, limits=trusted,
                            overrides={**TINY, "attacks": TINY["attacks"][:1], "subgrids": [TINY_GAN]})
    gan = next(r for r in measured.records if r["attack"] == "gan-active")

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    uploads = [c for c in calls if not c["after_compute_update"]]
    rounds, participants = len(gan["trace"]), len(gan["threat"]["participant_labels"])
    assert rounds == TINY_GAN["protocol"]["max_rounds"] and participants == 2
    assert len(uploads) == rounds * participants
    model = build_model("hitaj-mnist-cnn", (1, 32, 32), 10, extra_class=True)
    shapes = [list(p.shape) for p in model.parameters() if p.requires_grad]
    assert all(c["shapes"] == shapes for c in uploads)
    assert len({t["global_accuracy"] for t in gan["trace"]}) == 1  # zero uploads: the global model stays put

    entry = build_entry(measured, protocol=protocol, name="zero", authors="tests", link=None, source=source)
    scores = entry["attacks"]["gan-active"]
    assert scores["variant"] == "fixed" and {"oracle_accuracy", "nn_ssim_mean"} <= set(scores)
    assert "psnr_median" not in scores
    assert entry["worst_case"]["leak_rate"] == max(a["leak_rate"] for a in entry["attacks"].values())


def test_the_parent_checks_every_update_by_the_childs_rules():
    """What comes back from the sandbox is checked again in the parent, with the same rules and a
    one-line message naming the submission."""
    import torch

    from leakbench.leaderboard.sandbox import check_update

    params = [("w", torch.zeros(2, 3)), ("b", torch.zeros(3))]
    good = [torch.ones(2, 3), torch.ones(3)]
    assert check_update(good, params, "demo") == good
    for update, problem in (([torch.ones(2, 3)], "1 tensors, expected 2"),
                            ([torch.ones(3, 2), torch.ones(3)], "tensor 0 has shape (3, 2), expected (2, 3)"),
                            ([torch.ones(2, 3), torch.ones(3).double()], "tensor 1 has dtype float64"),
                            ([torch.ones(2, 3), torch.full((3,), float("inf"))], "tensor 1 has non-finite")):
        with pytest.raises(SubmissionError, match=r"^submitted defense demo: share") as err:
            check_update(update, params, "demo")
        assert problem in str(err.value) and "\n" not in str(err.value)



def test_adaptive_attacks_replay_a_submitted_transform_in_the_sandbox(tmp_path):
    """Adaptive attacks replay a submission's own transform on their dummy update: forward exactly,
    backward through autograd where it is differentiable and straight-through where not (rounding), and
    averaged over fixed draws where it is random. No submission can opt out."""
    import torch

    from leakbench.leaderboard.sandbox import EOT_DRAWS, DefenseSource, submitted_defense
    from leakbench.registry import DEFENSES

    update = [torch.randn(3, 4), torch.randn(4)]

    def replayed(body: str, cotangent_scale: float = 1.0):
        path = tmp_path / "d.py"
        path.write_text(body)
        with submitted_defense(DefenseSource.parse(f"{path}:D"), {}, name="d", limits=FAST) as sub:
            defense = DEFENSES.build(sub.registry_name, sub.params)
            space = defense.attacker_map(defense.transform(update))
            dummy = [u.clone().requires_grad_(True) for u in update]
            mapped = space.apply(dummy)
            sum((m * cotangent_scale).sum() for m in mapped).backward()
            return space.name, [m.detach() for m in mapped], [d.grad for d in dummy]

    head = "import torch\nfrom leakbench import Defense\nclass D(Defense):\n"
    # rounding: exact forward, straight-through backward
    name, mapped, grads = replayed(head + "    def transform(self, update, *, generator=None):\n"
                                          "        return [torch.round(u * 100) / 100 for u in update]\n")
    assert "replayed in the sandbox" in name
    assert all(torch.equal(m, torch.round(u * 100) / 100) for m, u in zip(mapped, update))
    assert all(torch.equal(g, torch.ones_like(g)) for g in grads)
    # an invertible linear obfuscation: autograd's exact derivative (3 per coordinate), not the identity
    name, mapped, grads = replayed(head + "    def transform(self, update, *, generator=None):\n"
                                          "        return [3 * u.flip(-1) + 1 for u in update]\n")
    assert all(torch.allclose(m, 3 * u.flip(-1) + 1) for m, u in zip(mapped, update))
    assert all(torch.allclose(g, torch.full_like(g, 3.0)) for g in grads)
    # a random transform: the mean over the fixed draws, the same on every call
    noisy = head + ("    def transform(self, update, *, generator=None):\n"
                    "        return [u + torch.randn(u.shape, generator=generator) for u in update]\n")
    _, first, grads = replayed(noisy)
    _, again, _ = replayed(noisy)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(torch.allclose(g, torch.ones_like(g)) for g in grads)
    noise = torch.cat([(m - u).flatten() for m, u in zip(first, update)])
    assert 0.1 < float(noise.std()) < 0.7  # a mean of EOT_DRAWS = 8 standard normals has std 0.35
    assert EOT_DRAWS == 8


def test_a_defense_that_answers_differently_when_differentiated_is_caught(tmp_path):
    """The one replay call a defense can tell apart (its inputs need a gradient) must give the same
    result as any other call on the same update; a defense that lies there fails the submission."""
    import torch

    from leakbench.leaderboard.sandbox import DefenseSource, SubmissionError, submitted_defense
    from leakbench.registry import DEFENSES

    path = tmp_path / "liar.py"
    path.write_text("import torch\nfrom leakbench import Defense\nclass Liar(Defense):\n"
                    "    def transform(self, update, *, generator=None):\n"
                    "        if any(u.requires_grad for u in update):\n"
                    "            return [torch.zeros_like(u) + 0 * u for u in update]\n"
                    "        return [2 * u for u in update]\n")
    update = [torch.randn(3, 4)]
    with submitted_defense(DefenseSource.parse(f"{path}:Liar"), {}, name="liar", limits=FAST) as sub:
        defense = DEFENSES.build(sub.registry_name, sub.params)
        space = defense.attacker_map(defense.transform(update))
        dummy = [u.clone().requires_grad_(True) for u in update]
        mapped = space.apply(dummy)
        with pytest.raises(SubmissionError, match="another result when it is differentiated"):
            sum(m.sum() for m in mapped).backward()


# -- federated averaging ---------------------------------------------------------------------------------

CLIPPED_STEPS = """
    import torch
    from leakbench import Defense

    class ClippedSteps(Defense):
        # its own compute_update (each local step's gradient scaled to norm at most 0.5) and transform
        def compute_update(self, model, x, soft_labels, *, generator=None):
            update = super().compute_update(model, x, soft_labels, generator=generator)
            norm = torch.sqrt(sum((u ** 2).sum() for u in update))
            return [u * min(1.0, 0.5 / float(norm)) for u in update]

        def transform(self, update, *, generator=None):
            return [u + 0.001 * torch.randn(u.shape, generator=generator) for u in update]
"""


def test_a_submitted_defense_shares_a_fedavg_update_as_it_does_in_process(tmp_path):
    """Under federated averaging the sandbox runs the victim's local steps with the submission's own
    compute_update, then its transform, in the same "share" request as FedSGD (so the defense cannot
    tell an attacked FedAvg update apart): the update equals the same class's run in process, and
    differs from the FedSGD share of the same batch."""
    import importlib.util

    import torch
    import torch.nn.functional as F

    from leakbench.data import load
    from leakbench.leaderboard.sandbox import DefenseSource, submitted_defense
    from leakbench.models import build_model
    from leakbench.registry import DEFENSES
    from leakbench.threat import LocalTraining

    path = tmp_path / "clipped_steps.py"
    path.write_text(textwrap.dedent(CLIPPED_STEPS))
    data = load("digits", "test", image_size=8)
    x, soft = data.images[:2], F.one_hot(data.labels[:2], data.num_classes).float()
    model = build_model("lenet-zhu", data.shape, data.num_classes, seed=0)
    local = LocalTraining(steps=3, lr=0.1, batch_size=1)
    spec = importlib.util.spec_from_file_location("clipped_steps", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # the sandbox seeds the child's generator with a draw from the caller's: the in-process run does too
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(7)))
    in_process = module.ClippedSteps().share_after_local_training(
        model, x, soft, local, generator=torch.Generator().manual_seed(seed))
    with submitted_defense(DefenseSource.parse(f"{path}:ClippedSteps"), {}, name="clipped-steps",
                           limits=FAST) as submitted:
        defense = DEFENSES.build(submitted.registry_name, submitted.params)
        sandboxed = defense.share_after_local_training(model, x, soft, local,
                                                       generator=torch.Generator().manual_seed(7))
        fedsgd = defense.share(model, x, soft, generator=torch.Generator().manual_seed(7))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(sandboxed, in_process))
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(sandboxed, fedsgd))


def test_a_submitted_defense_cannot_claim_a_secure_aggregate(tmp_path):
    """How many clients a secure aggregate hides the victim among is the deployment's, not something a
    submitted defense's code does: a class that sets it is refused, so no entry is credited for an
    aggregation its protocol never ran (the built-in secure-aggregation is leakbench's own code and
    runs in process, where the attacked cells simulate the other clients)."""
    root = tmp_path / "board"
    path = tmp_path / "many_clients.py"
    path.write_text(textwrap.dedent("""
        from leakbench import Defense

        class ManyClients(Defense):
            def aggregated_clients(self):
                return 1024
    """))
    with pytest.raises(ConfigError, match=r"overrides aggregated_clients; a submitted defense implements transform"):
        submit(f"{path}:ManyClients", name="many-clients", root=root, overrides=TINY, limits=FAST)
    assert board_files(root) == []
