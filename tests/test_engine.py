"""The vectorised attack engine: a batched L-BFGS with per-instance state must follow, per instance,
the trajectory of a separate ``torch.optim.LBFGS`` run (checked in float64, where rounding cannot hide
a wrong formula), and the batched DLG family must reproduce the one-at-a-time attacks."""
import re
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from leakbench.attacks.batched_lbfgs import DIVERGED, BatchedLBFGS
from leakbench.data import load
from leakbench.models import build_model
from leakbench.registry import ATTACKS, DEFENSES
from leakbench.threat import AttackTask

M, D = 6, 12


def _problem(seed=0):
    """M smooth non-convex functions (quadratic + quartic + ripple), each with its own coefficients."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, D, D, generator=g, dtype=torch.float64)
    a = a @ a.transpose(1, 2) / D + 0.1 * torch.eye(D, dtype=torch.float64)
    c = torch.randn(M, D, generator=g, dtype=torch.float64)

    def f(i, x):
        return 0.5 * x @ a[i] @ x - c[i] @ x + 0.05 * (x ** 4).sum() + 0.1 * torch.sin(3 * x).sum()

    def objective(ids, rows):
        rows = rows.detach().requires_grad_(True)
        values = torch.stack([f(int(i), rows[j]) for j, i in enumerate(ids)])
        grad, = torch.autograd.grad(values.sum(), rows)
        return values.detach(), grad

    x0 = torch.randn(M, D, generator=g, dtype=torch.float64) * 2
    return f, objective, x0


def _torch_lbfgs(f, i, x0, *, steps, **kw):
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], **kw)

    def closure():
        opt.zero_grad()
        value = f(i, x)
        value.backward()
        return value

    for _ in range(steps):
        opt.step(closure)
    return x.detach()


def _native_kernel():
    from torch.utils.cpp_extension import is_ninja_available

    from leakbench.attacks.native import lbfgs_kernel

    if (shutil.which("c++") is None and shutil.which("g++") is None) or not is_ninja_available():
        pytest.skip("the native kernel needs a C++ compiler and ninja (torch's extension builder)")
    kernel = lbfgs_kernel()
    assert kernel is not None, "a compiler and ninja are present, so the kernel must build"
    return kernel


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
@pytest.mark.parametrize("history_size,max_iter,lr,slots", [(5, 20, 1.0, 6), (100, 20, 1.0, 2), (3, 5, 0.5, 4)])
def test_batched_lbfgs_matches_torch_lbfgs_per_instance_in_float64(history_size, max_iter, lr, slots, native):
    """Every instance ends where its own torch.optim.LBFGS ends, whatever the batch (fewer slots than
    instances exercises refilling and compaction; history 3 and 5 exercise the ring buffer), with the
    directions computed by torch or by the native kernel."""
    if native:
        _native_kernel()
    f, objective, x0 = _problem()
    steps = 12
    result = BatchedLBFGS(steps=steps, lr=lr, max_iter=max_iter, history_size=history_size,
                          slots=slots, native=native).minimize(objective, x0)
    for i in range(M):
        expected = _torch_lbfgs(f, i, x0[i], steps=steps, lr=lr, max_iter=max_iter, history_size=history_size)
        assert torch.allclose(result.x[i], expected, atol=1e-8, rtol=0), f"instance {i} left torch's trajectory"
    assert (result.evals > 0).all()


def test_native_kernel_computes_the_torch_directions_and_gram_updates():
    """One call of the kernel against the torch path on the same state: partly filled and wrapped ring
    buffers, slots that append a pair or not, slots whose direction is not needed."""
    from leakbench.attacks.batched_lbfgs import _SlotState

    kernel = _native_kernel()
    k, width, m = 9, 40, 6
    g = torch.Generator().manual_seed(3)
    states = []
    for _ in range(2):
        st = _SlotState(k, width, m, "cpu", torch.float64)
        states.append(st)
    ref, nat = states
    ref.n_hist.copy_(torch.tensor([0, 1, 3, 6, 6, 6, 2, 6, 5]))
    ref.head.copy_(torch.tensor([0, 0, 0, 0, 2, 5, 0, 3, 0]))
    ref.hist.copy_(torch.randn(k, 2 * m, width, generator=g, dtype=torch.float64))
    for i in range(k):  # unfilled rows are zero, as a fresh state leaves them
        n = int(ref.n_hist[i])
        if n < m:
            ref.hist[i, n:m] = 0
            ref.hist[i, m + n:] = 0
    s_rows, y_rows = ref.hist[:, :m], ref.hist[:, m:]
    ref.sy.copy_(s_rows @ y_rows.transpose(1, 2) + 5 * torch.eye(m, dtype=torch.float64))  # R well conditioned
    ref.yy.copy_(y_rows @ y_rows.transpose(1, 2))
    ref.h_diag.copy_(torch.rand(k, generator=g, dtype=torch.float64) + 0.5)
    for name in ("n_hist", "head", "hist", "sy", "yy", "h_diag"):
        getattr(nat, name).copy_(getattr(ref, name))
    nat.kernel = kernel
    step, change, grad = (torch.randn(k, width, generator=g, dtype=torch.float64) for _ in range(3))
    accept = torch.tensor([True, False, True, True, False, True, False, True, True])
    rows_mask = accept | torch.tensor([False, True, False, False, True, False, False, False, False])
    expected = ref.update_and_multiply(accept, step, change, grad, rows_mask)
    got = nat.update_and_multiply(accept, step, change, grad, rows_mask)
    use = rows_mask & (ref.n_hist > 0)
    torch.testing.assert_close(got[use], expected[use], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[~use], (ref.h_diag[:, None] * grad)[~use], rtol=0, atol=0)
    for name in ("hist", "sy", "yy", "n_hist", "head"):
        torch.testing.assert_close(getattr(nat, name), getattr(ref, name), rtol=1e-10, atol=1e-12)


def test_an_unbuildable_native_kernel_warns_once_and_the_torch_path_runs(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    from leakbench.attacks import native

    def fail(**kw):
        raise RuntimeError("Error building extension: no compiler")

    monkeypatch.setattr(native, "_built", {})
    monkeypatch.setattr(cpp_extension, "load", fail)
    f, objective, x0 = _problem()
    with pytest.warns(RuntimeWarning, match="native L-BFGS kernel unavailable .*no compiler"):
        fallback = BatchedLBFGS(steps=3, native=True).minimize(objective, x0)
    assert native.lbfgs_kernel() is None  # the failure is remembered: no second build, no second warning
    plain = BatchedLBFGS(steps=3).minimize(objective, x0)
    assert torch.equal(fallback.x, plain.x)


def test_batched_lbfgs_first_steps_match_on_a_chaotic_problem():
    """On the Rosenbrock valley with lr 1 and no line search, trajectories are chaotic (rounding grows
    by ~1e3 per 20-evaluation step: 1.5e-11 after one step, 8e-9 after two, 5e-6 after three); the
    first two steps must still agree to that precision."""
    g = torch.Generator().manual_seed(1)
    scale = torch.rand(M, generator=g, dtype=torch.float64) * 50 + 50

    def f(i, x):
        return (scale[i] * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()

    def objective(ids, rows):
        rows = rows.detach().requires_grad_(True)
        values = torch.stack([f(int(i), rows[j]) for j, i in enumerate(ids)])
        grad, = torch.autograd.grad(values.sum(), rows)
        return values.detach(), grad

    x0 = torch.randn(M, 20, generator=g, dtype=torch.float64) * 0.5
    for steps, tol in ((1, 1e-10), (2, 1e-7)):
        result = BatchedLBFGS(steps=steps, history_size=5).minimize(objective, x0)
        for i in range(M):
            expected = _torch_lbfgs(f, i, x0[i], steps=steps, history_size=5)
            assert torch.allclose(result.x[i], expected, atol=tol, rtol=0)


def test_a_diverging_instance_is_reported_and_does_not_touch_the_others():
    f, objective, x0 = _problem()

    def poisoned(ids, rows):
        values, grad = objective(ids, rows)
        bad = ids == 2
        values = torch.where(bad & (rows.abs().sum(1) < 1e9), torch.full_like(values, float("nan")), values)
        return values, grad

    result = BatchedLBFGS(steps=5, slots=3).minimize(poisoned, x0)
    assert result.status[2] == DIVERGED
    assert torch.equal(result.x[2], x0[2]), "a diverged instance keeps its last finite point"
    for i in (0, 1, 3, 4, 5):
        assert result.status[i] != DIVERGED
        assert torch.allclose(result.x[i], _torch_lbfgs(f, i, x0[i], steps=5), atol=1e-8, rtol=0)


def test_a_diverged_instance_restarts_within_its_budget():
    f, objective, x0 = _problem()
    calls = []

    def flaky(ids, rows):  # instance 0 fails on its first evaluation only
        values, grad = objective(ids, rows)
        if not calls:
            values = values.clone()
            values[(ids == 0).nonzero().flatten()] = float("inf")
        calls.append(1)
        return values, grad

    fresh = torch.zeros(D, dtype=torch.float64)
    result = BatchedLBFGS(steps=5, slots=6, restarts=1).minimize(flaky, x0, reinit=lambda inst, r: fresh)
    assert result.restarts[0] == 1 and result.status[0] != DIVERGED
    assert torch.allclose(result.x[0], _torch_lbfgs(f, 0, fresh, steps=5), atol=1e-8, rtol=0)


def test_stop_loss_ends_an_instance_early_and_frees_its_work():
    _, objective, x0 = _problem()

    def positive(ids, rows):  # a gradient distance is >= 0; shift the test functions to match
        values, grad = objective(ids, rows)
        return values + 100.0, grad

    full = BatchedLBFGS(steps=30).minimize(positive, x0)
    target = float(full.loss.max()) + 1.0  # every instance passes below this on its way
    early = BatchedLBFGS(steps=30, stop_loss=target).minimize(positive, x0)
    assert all(s == "converged" for s in early.status)
    assert (early.loss < target).all() and (early.evals < full.evals).all()


def test_an_instance_that_stops_improving_stalls_and_leaves_the_others_unchanged():
    """The stall rule: a best value that did not halve over ``stall_window`` evaluations ends the
    instance (its value is a plateau at 50 here), while instances still improving run as before."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(M, D, D, generator=g, dtype=torch.float64)
    a = a @ a.transpose(1, 2) / D + 0.1 * torch.eye(D, dtype=torch.float64)
    c = torch.randn(M, D, generator=g, dtype=torch.float64)
    plateau = torch.tensor([50.0] + [0.0] * (M - 1), dtype=torch.float64)

    def objective(ids, rows):  # >= 0 like a gradient distance; instance 0 can never halve near its minimum
        diff = rows - c[ids]
        grad = torch.einsum("kij,kj->ki", a[ids], diff)
        return 0.5 * (diff * grad).sum(1) + plateau[ids], grad

    x0 = torch.randn(M, D, generator=g, dtype=torch.float64)
    window = 10
    free = BatchedLBFGS(steps=50).minimize(objective, x0)
    ruled = BatchedLBFGS(steps=50, stall_window=window).minimize(objective, x0)
    assert ruled.status[0] == "stalled" and int(ruled.evals[0]) == 2 * window < int(free.evals[0])
    assert ruled.status[1:] == free.status[1:] and "stalled" not in free.status
    torch.testing.assert_close(ruled.x[1:], free.x[1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="stall_factor"):
        BatchedLBFGS(steps=5, stall_window=10, stall_factor=0.0)


def test_a_restarted_instance_is_judged_afresh_by_the_stall_rule():
    """A restart starts far above the best value its diverged run reached; judged against that old
    best it would stall at once, judged afresh it converges."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(M, D, D, generator=g, dtype=torch.float64)
    a = a @ a.transpose(1, 2) / D + 0.1 * torch.eye(D, dtype=torch.float64)
    c = torch.randn(M, D, generator=g, dtype=torch.float64)
    calls = []

    def objective(ids, rows):  # instance 0 diverges on the 12th evaluation of the batch
        diff = rows - c[ids]
        grad = torch.einsum("kij,kj->ki", a[ids], diff)
        values = 0.5 * (diff * grad).sum(1)
        calls.append(1)
        if len(calls) == 12:
            values = values.masked_fill(ids == 0, float("nan"))
        return values, grad

    x0 = torch.randn(M, D, generator=g, dtype=torch.float64)
    far = c[0] + 30.0
    result = BatchedLBFGS(steps=60, restarts=1, stall_window=10).minimize(
        objective, x0, reinit=lambda inst, restart: far.clone())
    assert result.restarts[0] == 1
    assert result.status[0] != "stalled" and float(result.loss[0]) < 1e-6


# instance-for-instance comparisons run every step: the engine applies a stopping rule after each
# evaluation, the one-at-a-time loop after each L-BFGS step, so with the default rules on they stop at
# different points below the same threshold
EVERY_STEP = {"stop_relative": 0.0, "stall_window": 0}


def _tasks(dtype, batch_size, targets=3, size=8, one_model=False):
    data = load("digits", "test", image_size=size)
    tasks = []
    for t in range(targets):
        idx = torch.arange(t * batch_size, (t + 1) * batch_size)
        x, y = data.images[idx].to(dtype), data.labels[idx]
        model = build_model("lenet-zhu", data.shape, 10, seed=0 if one_model else t).to(dtype)
        shared = DEFENSES.build("none").share(model, x, F.one_hot(y, 10).to(dtype))
        tasks.append(AttackTask(model=model, shared=shared, input_shape=data.shape, num_classes=10,
                                batch_size=batch_size, seed=t))
    return tasks


@pytest.mark.parametrize("name,batch_size,steps", [("dlg", 1, 2), ("idlg", 1, 6), ("dlg-batched", 2, 6)])
def test_batched_dlg_family_reproduces_the_one_at_a_time_attack_in_float64(name, batch_size, steps):
    """The engine runs the attack the reference code runs: same dummies, same L-BFGS, same labels
    (dlg-batched: the same cyclic per-sample steps from a fresh state), for several targets at once.
    DLG's dummies of one target blow up to |x| ~ 60 where rounding differences grow ~100x per step, so
    it is compared over two steps (1e-9 apart there, 1e-4 after six)."""
    tasks = _tasks(torch.float64, batch_size)
    params = {"steps": steps, "batch_size": batch_size, **EVERY_STEP}
    batched = ATTACKS.build(name, {**params, "slots": 2}).run(tasks)
    reference = ATTACKS.build(name, {**params, "engine": "reference"}).run(tasks)
    for b, r in zip(batched, reference):
        assert torch.allclose(b.images, r.images, atol=1e-7, rtol=0)
        assert torch.equal(b.labels, r.labels)
        assert b.closure_evals <= r.closure_evals  # the engine reuses torch's repeated evaluation


@pytest.mark.parametrize("tolerances", [{"tolerance_grad": 1e9}, {"tolerance_change": 1e-2},
                                        {"tolerance_grad": 0.0, "tolerance_change": 0.0}])
def test_lbfgs_stopping_tolerances_reach_the_engine_and_the_reference_alike(tolerances):
    """The attack's ``tolerance_grad``/``tolerance_change`` are torch.optim.LBFGS's: both engines stop
    where torch would (a huge gradient tolerance ends every step at its first evaluation: nothing moves)."""
    tasks = _tasks(torch.float64, 1)
    params = {"steps": 4, **tolerances, **EVERY_STEP}
    batched = ATTACKS.build("idlg", {**params, "slots": 2}).run(tasks)
    reference = ATTACKS.build("idlg", {**params, "engine": "reference"}).run(tasks)
    for b, r in zip(batched, reference):
        assert torch.allclose(b.images, r.images, atol=1e-7, rtol=0)
        assert b.closure_evals <= r.closure_evals
        if tolerances.get("tolerance_grad") == 1e9:
            assert r.closure_evals == params["steps"] and b.closure_evals <= params["steps"]
        if tolerances.get("tolerance_grad") == 0.0:
            assert r.closure_evals > 2 * params["steps"]  # no step ends at its first evaluation


def test_targets_of_one_model_share_unbatched_weights_and_match_the_reference():
    from leakbench.attacks import engine

    tasks = _tasks(torch.float64, 1, one_model=True)
    assert engine._same_weights([t.model for t in tasks])
    assert not engine._same_weights([t.model for t in _tasks(torch.float64, 1)])
    batched = ATTACKS.build("idlg", {"steps": 6, **EVERY_STEP}).run(tasks)
    reference = ATTACKS.build("idlg", {"steps": 6, "engine": "reference", **EVERY_STEP}).run(tasks)
    for b, r in zip(batched, reference):
        assert torch.allclose(b.images, r.images, atol=1e-7, rtol=0)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_objective_pads_to_fixed_sizes_and_agrees_with_eager_mode():
    """The compiled objective runs at power-of-two sizes from 16 (padding copies, results dropped)
    and gives eager mode's values."""
    from leakbench.attacks import gradient_matching as gm

    tasks = _tasks(torch.float32, 1, targets=12, one_model=True)
    model = tasks[0].model.eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    targets = [torch.stack([t.shared[j] for t in tasks]) for j in range(len(params))]
    build = lambda compile: gm.BatchedGradientMatching(  # noqa: E731
        model, params, {}, targets, input_shape=tasks[0].input_shape, batch_size=1, num_classes=10,
        compile=compile, shared_weights=True)
    eager, compiled = build(False), build(True)
    sizes = []
    real = compiled._compiled
    compiled._compiled = lambda *args: sizes.append(len(args[3])) or real(*args)
    rows = torch.randn(12, eager.width, generator=torch.Generator().manual_seed(0))
    # both padded to the smallest compiled size; the third call reuses the targets gathered for the
    # second, which must come out of a compiled call (C++ wrapper included) intact
    for k in (12, 1, 1):
        ids = torch.arange(k).flip(0)
        (v0, g0), (v1, g1) = eager(ids, rows[:k]), compiled(ids, rows[:k])
        assert v1.shape == (k,) and g1.shape == (k, eager.width)
        torch.testing.assert_close(v1, v0, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g1, g0, rtol=1e-3, atol=1e-5)
    assert sizes == [16, 16, 16]


def test_thin_convolutions_are_unfolded_into_the_same_function():
    """The compiled objective's model computes first-layer convolutions as unfold + matmul: same
    parameter names, same outputs and gradients; deeper convolutions (12 channels in) stay as they are."""
    from leakbench.attacks import gradient_matching as gm

    model = build_model("lenet-zhu", (3, 16, 16), 10, seed=0).double()
    swapped = gm._unfold_thin_convolutions(model)
    kinds = [type(m).__name__ for m in swapped.body if isinstance(m, torch.nn.Conv2d)]
    assert kinds == ["_UnfoldConv2d", "Conv2d", "Conv2d"]
    assert [n for n, _ in swapped.named_parameters()] == [n for n, _ in model.named_parameters()]
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    out, out_swapped = model(x), swapped(x)
    torch.testing.assert_close(out_swapped, out, rtol=1e-12, atol=1e-12)
    weights = [p for p in model.parameters()] + [x]
    grads = torch.autograd.grad(out.square().sum(), weights)
    grads_swapped = torch.autograd.grad(out_swapped.square().sum(), [p for p in swapped.parameters()] + [x])
    for a, b in zip(grads_swapped, grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    deep = build_model("lenet-zhu", (12, 16, 16), 10, seed=0)
    assert gm._unfold_thin_convolutions(deep) is deep  # nothing thin: the model itself


def test_engine_records_are_deterministic_and_monitored():
    tasks = _tasks(torch.float32, 1, targets=2)
    seen = {0: [], 1: []}
    monitors = [lambda step, images, labels, t=t: seen[t].append((step, images.shape, labels.shape)) for t in (0, 1)]
    attack = ATTACKS.build("dlg", {"steps": 5})
    first = attack.run(tasks, monitors=monitors)
    again = attack.run(tasks)
    for a, b in zip(first, again):
        assert torch.equal(a.images, b.images)
    for t in (0, 1):
        assert [s for s, _, _ in seen[t]] == list(range(1, first[t].steps + 1))
        assert all(shape == (1, 1, 8, 8) and lab == (1,) for _, shape, lab in seen[t])


def test_the_objective_gathers_per_instance_tensors_again_when_the_batch_changes():
    """Per-instance targets are gathered once per batch composition and reused while it holds: a
    refilled or reordered batch must get its own instances' targets, never the previous batch's."""
    from leakbench.attacks import gradient_matching as gm

    tasks = _tasks(torch.float64, 1, targets=3)  # one model per target: weights are gathered too
    model = tasks[0].model.eval()
    names = [n for n, _ in model.named_parameters()]
    params = {n: torch.stack([dict(t.model.named_parameters())[n].detach() for t in tasks]) for n in names}
    targets = [torch.stack([t.shared[j] for t in tasks]) for j in range(len(names))]
    build = lambda: gm.BatchedGradientMatching(  # noqa: E731
        model, params, {}, targets, input_shape=tasks[0].input_shape, batch_size=1, num_classes=10)
    objective = build()
    rows = torch.randn(3, objective.width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for ids in ([0, 1], [0, 1], [2, 0], [1], [0, 1]):
        ids = torch.tensor(ids)
        values, grads = objective(ids, rows[:len(ids)])
        fresh_values, fresh_grads = build()(ids, rows[:len(ids)])
        assert torch.equal(values, fresh_values) and torch.equal(grads, fresh_grads)


def _objectives(classes, dtype, onehot, targets, **kw):
    """The same objective with and without the output layer's outer-product shortcut."""
    from leakbench.attacks.gradient_matching import BatchedGradientMatching

    model = build_model("lenet-zhu", (3, 8, 8), classes, seed=0).to(dtype)
    params = {n: p.detach() for n, p in model.named_parameters()}
    shared = targets(params)
    return [BatchedGradientMatching(model, params, {}, shared, input_shape=(3, 8, 8), batch_size=1,
                                    num_classes=classes, shared_weights=True, onehot=onehot, outer_product=op, **kw)
            for op in (True, False)], model


@pytest.mark.parametrize("fixed_labels", [True, False], ids=["labels-given", "labels-optimised"])
def test_the_outer_product_distance_is_the_plain_distance_in_float64(fixed_labels):
    """The output layer's weight gradient a h^T is never formed; its distance to the target, and that
    distance's gradient w.r.t. the dummies, equal the plain computation's (float64, 100 classes, random
    targets that are not outer products themselves, as a noised update's are not)."""
    g = torch.Generator().manual_seed(0)
    onehot = F.one_hot(torch.tensor([3, 97, 50]), 100).double() if fixed_labels else None
    (fast, plain), _ = _objectives(100, torch.float64, onehot, lambda params: [
        torch.randn(3, *p.shape, generator=g, dtype=torch.float64) * 0.05 for p in params.values()])
    assert fast.outer_product and not plain.outer_product
    ids, rows = torch.arange(3), torch.randn(3, fast.width, generator=g, dtype=torch.float64)
    (v1, g1), (v0, g0) = fast(ids, rows), plain(ids, rows)
    torch.testing.assert_close(v1, v0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast.scores(ids, rows), v0, rtol=1e-12, atol=1e-12)


def test_the_outer_product_distance_has_no_cancellation_error_in_float32():
    """At the true input the three terms cancel (||T||^2 about 100 here); summed in float64 they leave
    the plain computation's rounding, not float32's 6e-8 ||T||^2."""
    from leakbench.threat import parameter_gradients

    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    onehot = F.one_hot(torch.tensor([7]), 100).float()
    model = build_model("lenet-zhu", (3, 8, 8), 100, seed=0)
    shared = [t.detach()[None] for t in parameter_gradients(model, x, onehot)]
    (fast, _plain), _ = _objectives(100, torch.float32, onehot[None], lambda params: shared)
    norm2 = sum(float((t ** 2).sum()) for t in shared)
    value, _ = fast(torch.zeros(1, dtype=torch.long), x.flatten()[None])
    assert norm2 > 1 and abs(float(value)) < 1e-9 * norm2


def test_the_outer_product_is_used_only_where_it_is_exact():
    """Batches of several samples, the cosine distance, or a model not ending in a biased linear layer
    on the classes take the plain path."""
    from leakbench.attacks.gradient_matching import output_head

    assert output_head(build_model("lenet-zhu", (3, 8, 8), 10, seed=0), (3, 8, 8), 10) is not None
    (fast, _), _ = _objectives(10, torch.float32, None, lambda params: [torch.zeros(2, *p.shape) for p in params.values()],
                               distance="cosine")
    assert not fast.outer_product

    class Scaled(torch.nn.Module):  # something after the last layer: the shortcut would be wrong
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return 2 * self.fc(x.flatten(1))

    assert output_head(Scaled(), (4,), 3) is None


def test_compile_and_native_follow_the_evaluation_budget_at_auto():
    from leakbench.attacks.engine import AUTO_MIN_EVALUATIONS, fast_path
    from leakbench.errors import ConfigError

    assert not fast_path("auto", AUTO_MIN_EVALUATIONS - 1) and fast_path("auto", AUTO_MIN_EVALUATIONS)
    assert fast_path(True, 1) and not fast_path(False, 10 ** 9)
    for name in ("dlg", "idlg", "dlg-batched", "inverting-gradients"):
        attack = ATTACKS.build(name, {})
        assert attack.compile == "auto" and getattr(attack, "native", "auto") == "auto"
    assert ATTACKS.build("dlg", {"compile": True, "native": False}).compile is True
    with pytest.raises(ConfigError, match="'compile' = 'yes' is invalid; allowed: true or false or 'auto'"):
        ATTACKS.build("dlg", {"compile": "yes"})


def test_an_objective_that_cannot_compile_warns_once_and_runs_eagerly(monkeypatch):
    from leakbench.attacks import gradient_matching as gm

    def broken_compile(fn, **kw):
        def call(*args):
            raise RuntimeError("InductorError: no C++ compiler found")
        return call

    monkeypatch.setattr(gm, "_warned_compile", [])
    monkeypatch.setattr(torch, "compile", broken_compile)
    targets = lambda params: [torch.randn(2, *p.shape) * 0.01 for p in params.values()]  # noqa: E731
    (eager, _), _ = _objectives(10, torch.float32, None, targets)
    (first, _), _ = _objectives(10, torch.float32, None, lambda params: eager.targets[:len(params)], compile=True)
    (second, _), _ = _objectives(10, torch.float32, None, lambda params: eager.targets[:len(params)], compile=True)
    rows = torch.randn(2, eager.width)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [first(torch.arange(2), rows), second(torch.arange(2), rows)]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and re.match(r"torch.compile unavailable .*no C\+\+ compiler", messages[0])
    for value, _grad in results:
        torch.testing.assert_close(value, eager(torch.arange(2), rows)[0])


@pytest.mark.parametrize("engine", ["batched", "reference"])
def test_the_relative_stop_ends_each_target_at_its_own_threshold(engine):
    """stop_relative r stops a target once its distance is below r ||shared update||^2: the same rule in
    the engine and the one-at-a-time loop, each target against its own update's norm."""
    from leakbench.attacks.engine import target_norm2

    tasks = _tasks(torch.float32, 1, targets=3)
    rel = 1e-4
    recs = ATTACKS.build("idlg", {"steps": 200, "stop_relative": rel, "engine": engine}).run(tasks)
    full = ATTACKS.build("idlg", {"steps": 200, "engine": engine}).run(tasks)
    stopped = [i for i, (r, f) in enumerate(zip(recs, full)) if r.steps < f.steps]
    assert stopped, "no target reached its threshold"
    for i in stopped:
        assert recs[i].grad_distance < rel * target_norm2(tasks[i])
    thresholds = sorted(rel * target_norm2(t) for t in tasks)
    assert thresholds[-1] > 1.5 * thresholds[0]  # the targets' thresholds differ: a per-target rule


def test_auto_slots_follow_the_models_memory():
    """lenet-zhu on CIFAR-sized targets fills the 64 slots; resnet20-sigmoid, whose evaluation keeps
    about 90 MB per instance alive at batch 1 and 290 MB at batch 4, gets fewer (power-of-two) slots,
    fewer still at batch 4, and always at least one."""
    from leakbench.attacks.engine import SLOT_MEMORY_BUDGET, auto_slots

    def task(model_name, batch):
        model = build_model(model_name, (3, 32, 32), 10, seed=0)
        return AttackTask(model=model, shared=[torch.zeros_like(p) for p in model.parameters()],
                          input_shape=(3, 32, 32), num_classes=10, batch_size=batch, seed=0)

    width = 3 * 32 * 32 + 10
    lenet, resnet1, resnet4 = (auto_slots([task(m, b)], 100, b * width)
                               for m, b in (("lenet-zhu", 1), ("resnet20-sigmoid", 1), ("resnet20-sigmoid", 4)))
    assert lenet == 64 and 1 <= resnet4 < resnet1 < 64
    assert resnet1 * 90 * 2 ** 20 <= SLOT_MEMORY_BUDGET and all(k & (k - 1) == 0 for k in (resnet1, resnet4))
