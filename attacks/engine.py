"""The vectorised attack engine: many gradient-matching attacks in one program.

Tasks that share an architecture and shapes (targets, restarts, defense settings) become instances of
one ``BatchedGradientMatching`` objective, minimised by one ``BatchedLBFGS``: per-instance weights,
targets, dummies and optimiser state, one vectorised forward/backward per tick. Each instance follows
the trajectory its own ``torch.optim.LBFGS`` run would (up to floating-point rounding), so the attack
is unchanged; only the cost is.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..threat import AttackTask, Monitor, Reconstruction
from .batched_lbfgs import DIVERGED, BatchedLBFGS
from .gradient_matching import BatchedGradientMatching


# ``compile`` and ``native`` at "auto" are on for a program whose evaluation budget (instances x steps x
# evaluations per step) reaches this. Compiling costs about 20 s per batch size on one thread (a stream
# compiles 2-3 sizes: 64, then 32 and 16 as it drains) and saves about 0.15-0.3 ms per instance and
# evaluation (lenet-zhu, 32x32x3: eager 0.65-1.2 ms, compiled 0.5-0.75 ms at 64 instances), and DLG
# runs spend about half their budget, so 500,000 budgeted evaluations (64 targets x 300 steps x 20
# is 384,000; a full-grid program of 256 targets is 1.5 million) is about where compiling pays off.
# Below it (every unit test, the quick grid's programs, one-target paper runs) the engine runs eagerly
# and never builds the native kernel (about 30 s the first time on a machine).
AUTO_MIN_EVALUATIONS = 500_000


def fast_path(setting: bool | str, budget: int) -> bool:
    """Whether an ``auto``/true/false setting (``compile``, ``native``) is on for a program whose
    evaluation budget is ``budget``."""
    return budget >= AUTO_MIN_EVALUATIONS if setting == "auto" else bool(setting)


# ``slots`` at "auto": as many instances per program as fit SLOT_MEMORY_BUDGET, at most MAX_AUTO_SLOTS,
# rounded down to a power of two (the compiled sizes). The budget keeps a program within 4 GB of
# resident memory on the 2-core machine, leaving about 1 GB for torch, the data and compiled code.
# An instance costs its L-BFGS state (the (2m, D) history and a dozen D-vectors) plus what one
# evaluation keeps alive: ACTIVATION_FACTOR times the bytes its forward pass outputs (the double
# backward keeps the forward, its derivative and their derivatives), plus its own copy of the weights
# and their gradients when the targets attack different weights. The factor is the peak resident memory
# per instance of one evaluation over its forward's output, measured on one thread: 11.3 for
# resnet20-sigmoid at batch 1 (91 MB per instance: 64 slots would take 5.8 GB), 9.0 at batch 4 (290 MB);
# lenet-zhu's 50 (1.8 MB) is mostly fixed costs, and its 2.5 MB history decides its slots anyway.
SLOT_MEMORY_BUDGET = 3 * 2 ** 30
MAX_AUTO_SLOTS = 64
ACTIVATION_FACTOR = 12


def activation_elements(task: AttackTask) -> int:
    """Elements the model's modules output on one victim batch (a forward pass on zeros)."""
    model = task.model
    total = [0]

    def count(module, inputs, output):
        if isinstance(output, torch.Tensor):
            total[0] += output.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    weight = next(model.parameters())
    try:
        with torch.no_grad(), evaluating([task]):
            model(torch.zeros(task.batch_size, *task.input_shape, dtype=weight.dtype, device=weight.device))
    finally:
        for h in handles:
            h.remove()
    return total[0]


def auto_slots(tasks: Sequence[AttackTask], history_size: int, width: int) -> int:
    """The slots of a program of ``tasks`` (one group) that fit SLOT_MEMORY_BUDGET."""
    first = tasks[0]
    weight = next(first.model.parameters())
    n_params = sum(p.numel() for p in first.model.parameters())
    own_weights = 0 if _same_weights([t.model for t in tasks]) else 3 * n_params
    per_instance = weight.element_size() * (2 * history_size * width + 2 * history_size ** 2 + 12 * width
                                            + ACTIVATION_FACTOR * activation_elements(first) + own_weights)
    fit = max(1, min(MAX_AUTO_SLOTS, SLOT_MEMORY_BUDGET // per_instance))
    return 1 << (fit.bit_length() - 1)


@dataclass(frozen=True)
class EngineSettings:
    steps: int
    lr: float = 1.0
    max_iter: int = 20
    history_size: int = 100
    stop_distance: float = 0.0
    stop_relative: float = 0.0  # stop once the distance is below this times the target's ||grad||^2
    slots: int | str = "auto"     # see auto_slots
    compile: bool | str = "auto"  # see fast_path
    native: bool | str = "auto"   # the C++ L-BFGS direction kernel on CPU (built on first use)
    restarts: int = 0
    stall_window: int = 0    # give up on a target whose distance did not halve in this many evaluations
    cyclic: bool = False     # dlg-batched: step i moves only sample i mod N, from a fresh L-BFGS state
    tolerance_grad: float = 1e-7     # torch.optim.LBFGS's stopping tests (its defaults)
    tolerance_change: float = 1e-9


# task -> fixed one-hot labels (N, classes) for attacks that do not optimise labels, else None
LabelRule = Callable[[AttackTask], torch.Tensor | None]


def group_key(task: AttackTask) -> tuple:
    """Tasks with equal keys (architecture, shapes, device) can be instances of one objective."""
    model = task.model
    shapes = tuple((n, tuple(p.shape), p.dtype) for n, p in model.named_parameters())
    device = next(model.parameters()).device
    return (type(model).__qualname__, shapes, task.input_shape, task.batch_size, task.num_classes, str(device),
            task.local_training)


def _same_weights(models: list[torch.nn.Module]) -> bool:
    """True when every task attacks the same weights (then they need not be batched)."""
    first = dict(models[0].state_dict())
    return all(m is models[0] or all(torch.equal(first[k], v) for k, v in m.state_dict().items())
               for m in models[1:])


def initial_row(task: AttackTask, seed: int, with_logits: bool) -> torch.Tensor:
    """Algorithm 1, line 2, drawn exactly as the one-at-a-time attack draws it (x, then logits)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((task.batch_size, *task.input_shape), generator=g)
    logits = torch.randn(task.batch_size, task.num_classes, generator=g)
    return torch.cat([x.flatten(), logits.flatten()]) if with_logits else x.flatten()


def restart_seed(seed: int, restart: int) -> int:
    """The seed of an instance's fresh start number ``restart`` (the same in every engine)."""
    return (seed * 1_000_003 + restart) & 0x7FFFFFFF


def solve(tasks: Sequence[AttackTask], settings: EngineSettings, *, fixed_labels: LabelRule,
          label_method: Callable[[AttackTask], str], monitors: Sequence[Monitor | None] | None = None
          ) -> list[Reconstruction]:
    """Reconstructions of ``tasks`` (in order), solved group by group in vectorised programs."""
    monitors = list(monitors) if monitors is not None else [None] * len(tasks)
    out: list[Reconstruction | None] = [None] * len(tasks)
    groups: dict[tuple, list[int]] = {}
    for i, task in enumerate(tasks):
        groups.setdefault(group_key(task), []).append(i)
    for members in groups.values():
        for i, rec in zip(members, _solve_group([tasks[i] for i in members], settings, fixed_labels,
                                                label_method, [monitors[i] for i in members])):
            out[i] = rec
    return out  # type: ignore[return-value]


def build_objective(tasks: Sequence[AttackTask], labels: Sequence[torch.Tensor | None], *, compile: bool = False,
                    distance: str = "l2", tv: float = 0.0) -> BatchedGradientMatching:
    """The objective whose instance i attacks ``tasks[i]`` (one group: same architecture and shapes), with
    fixed labels ``labels[i]`` (class indices) or, when they are None, label logits optimised too. The
    tasks' models must be in eval mode while it runs (``evaluating``)."""
    first = tasks[0]
    model = first.model
    device = next(model.parameters()).device
    names = [n for n, _ in model.named_parameters()]
    if any(len(t.shared) != len(names) for t in tasks):
        raise ValueError("the shared update must hold one tensor per model parameter")
    shared_weights = _same_weights([t.model for t in tasks])
    if shared_weights:
        params = {n: p.detach() for n, p in model.named_parameters()}
        buffers = dict(model.named_buffers())
    else:
        params = {n: torch.stack([dict(t.model.named_parameters())[n].detach() for t in tasks]) for n in names}
        buffers = {n: torch.stack([dict(t.model.named_buffers())[n] for t in tasks])
                   for n, _ in model.named_buffers()}
    targets = [torch.stack([t.shared[j].detach().to(device) for t in tasks]) for j in range(len(names))]
    onehot = None
    if labels[0] is not None:
        onehot = torch.stack([F.one_hot(lab.to(device), first.num_classes).to(params[names[0]].dtype)
                              for lab in labels])
    return BatchedGradientMatching(model, params, buffers, targets, input_shape=first.input_shape,
                                   batch_size=first.batch_size, num_classes=first.num_classes, onehot=onehot,
                                   compile=compile, shared_weights=shared_weights, distance=distance, tv=tv,
                                   local=first.local_training)


@contextmanager
def evaluating(tasks: Sequence[AttackTask]):
    """The tasks' models in eval mode meanwhile (functional_call runs the template module: the attacker
    evaluates in eval mode), their own modes restored afterwards."""
    was_training = [t.model.training for t in tasks]
    for t in tasks:
        t.model.eval()
    try:
        yield
    finally:
        for t, mode in zip(tasks, was_training):
            t.model.train(mode)


def target_norm2(task: AttackTask) -> float:
    """||shared update||^2 summed over its tensors: what a relative stopping rule is relative to (the
    attacker sees the shared update, so the rule stays attacker-visible)."""
    return float(sum((t.detach().double() ** 2).sum() for t in task.shared))


def stop_threshold(task: AttackTask, stop_distance: float, stop_relative: float) -> float:
    """The distance at or below which an attack on ``task`` stops: the larger of the absolute and the
    relative rule (0: run every step)."""
    return max(stop_distance, stop_relative * target_norm2(task) if stop_relative > 0 else 0.0)


def stop_thresholds(tasks: Sequence[AttackTask], st: EngineSettings) -> torch.Tensor:
    return torch.tensor([stop_threshold(t, st.stop_distance, st.stop_relative) for t in tasks], dtype=torch.float64)


def _solve_group(tasks: list[AttackTask], st: EngineSettings, fixed_labels: LabelRule,
                 label_method: Callable[[AttackTask], str], monitors: list[Monitor | None]) -> list[Reconstruction]:
    with evaluating(tasks):
        return _solve_group_in_eval_mode(tasks, st, fixed_labels, label_method, monitors)


def _solve_group_in_eval_mode(tasks: list[AttackTask], st: EngineSettings, fixed_labels: LabelRule,
                              label_method: Callable[[AttackTask], str], monitors: list[Monitor | None]
                              ) -> list[Reconstruction]:
    first = tasks[0]
    labels = [fixed_labels(t) for t in tasks]
    budget = len(tasks) * st.steps * st.max_iter
    objective = build_objective(tasks, labels, compile=fast_path(st.compile, budget))
    onehot = objective.onehot
    device = next(first.model.parameters()).device
    dtype = next(first.model.parameters()).dtype
    with_logits = onehot is None
    x0 = torch.stack([initial_row(t, t.seed, with_logits) for t in tasks]).to(device, dtype)

    mask_fn = None
    n = first.batch_size
    if st.cyclic and n > 1:
        # dlg-batched's eq. (5): step i moves only sample i mod N. Zeroing the gradient outside that
        # sample's coordinates, with a fresh L-BFGS state each step, is exactly an L-BFGS run on the
        # sample's own variables (directions, step lengths and stopping tests only see those).
        per_sample = torch.zeros(n, x0.shape[1], dtype=torch.bool, device=device)
        n_pix = objective.n_x // n
        n_lab = first.num_classes
        for i in range(n):
            per_sample[i, i * n_pix:(i + 1) * n_pix] = True
            if with_logits:
                per_sample[i, objective.n_x + i * n_lab: objective.n_x + (i + 1) * n_lab] = True
        mask_fn = lambda step_count: per_sample[step_count % n]  # noqa: E731

    def reinit(inst: int, restart: int) -> torch.Tensor:
        return initial_row(tasks[inst], restart_seed(tasks[inst].seed, restart), with_logits).to(device, x0.dtype)

    def on_step(inst: int, step: int, row: torch.Tensor) -> None:
        if monitors[inst] is not None:
            images, logits = objective.split(row[None])
            lab = logits[0].argmax(-1) if logits is not None else labels[inst]
            monitors[inst](step, images[0].detach(), lab)

    optimiser = BatchedLBFGS(steps=st.steps, lr=st.lr, max_iter=st.max_iter, history_size=st.history_size,
                             slots=auto_slots(tasks, st.history_size, x0.shape[1]) if st.slots == "auto" else st.slots,
                             stop_loss=stop_thresholds(tasks, st).to(device, dtype),
                             restarts=st.restarts,
                             fresh_each_step=mask_fn is not None, gradient_mask=mask_fn,
                             idle_limit=n if mask_fn is not None else 1, stall_window=st.stall_window,
                             native=fast_path(st.native, budget), tolerance_grad=st.tolerance_grad,
                             tolerance_change=st.tolerance_change)
    result = optimiser.minimize(objective, x0, reinit=reinit if st.restarts else None,
                                on_step=on_step if any(m is not None for m in monitors) else None)
    images, logits = objective.split(result.x)
    recs = []
    for i, task in enumerate(tasks):
        lab = logits[i].argmax(-1) if logits is not None else labels[i]
        recs.append(Reconstruction(images[i].detach().clone(), lab, int(result.steps[i]), int(result.evals[i]),
                                   float(result.loss[i]), result.status[i] == DIVERGED, label_method(task),
                                   extra={"engine": "batched", "stopped": result.status[i],
                                          "restarts": int(result.restarts[i])}))
    return recs
