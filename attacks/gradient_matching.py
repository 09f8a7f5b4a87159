"""The gradient-matching objectives shared by the DLG family and Inverting Gradients (the squared
distance, the cosine distance, the total-variation prior), and the L-BFGS loop that minimises them."""
from __future__ import annotations

import copy
import math
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..threat import AttackerMap, LocalTraining, Monitor, soft_cross_entropy


def dummy_update(model: nn.Module, dummy_x: torch.Tensor, soft_labels: torch.Tensor,
                 local: LocalTraining | None = None, *, create_graph: bool = True) -> list[torch.Tensor]:
    """The update the dummies would make the victim share, differentiable w.r.t. them: the gradient of
    the training loss (FedSGD), or with ``local`` (federated averaging) the replayed local training's
    weight difference, one tensor per trainable parameter."""
    if local is not None:
        from torch.func import functional_call

        weights = {n: p for n, p in model.named_parameters() if p.requires_grad}
        update = local.simulated_update(
            lambda w, x, s: soft_cross_entropy(functional_call(model, w, (x,)), s), weights, dummy_x, soft_labels)
        return list(update.values())
    params = [p for p in model.parameters() if p.requires_grad]
    loss = soft_cross_entropy(model(dummy_x), soft_labels)
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


def gradient_distance(model: nn.Module, dummy_x: torch.Tensor, soft_labels: torch.Tensor,
                      target: Sequence[torch.Tensor], local: LocalTraining | None = None) -> torch.Tensor:
    """Sum over parameters of ||grad' - grad||^2 (DLG eq. 4), differentiable w.r.t. the dummies.

    Coordinates a defense zeroed stay in the sum (the non-adaptive attacker matches the update as
    shared); adaptive variants may pass a masked target and model. With ``local`` (federated averaging)
    the dummy update is the replayed local training's, not one gradient.
    """
    update = dummy_update(model, dummy_x, soft_labels, local)
    return sum(((u - t) ** 2).sum() for u, t in zip(update, target))


def cosine_distance(update: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """1 - the cosine similarity of two whole updates, every tensor flattened into one vector (Geiping et
    al. 2020, eq. 4): invariant to the update's scale, so a rescaled update cannot hide behind it."""
    dot = sum((g * t).sum() for g, t in zip(update, target))
    norms = torch.sqrt(sum((g ** 2).sum() for g in update)) * torch.sqrt(sum((t ** 2).sum() for t in target))
    return 1 - dot / norms.clamp_min(1e-30)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of images (..., H, W): mean |horizontal difference| + mean |vertical
    difference|, the prior of Inverting Gradients as its reference code (inversefed) defines it."""
    return ((x[..., :, 1:] - x[..., :, :-1]).abs().mean()
            + (x[..., 1:, :] - x[..., :-1, :]).abs().mean())


def matched_distance(model: torch.nn.Module, dummy_x: torch.Tensor, soft_labels: torch.Tensor,
                     target: list[torch.Tensor], space: AttackerMap, *, cosine: bool = False,
                     create_graph: bool = True, local: LocalTraining | None = None) -> torch.Tensor:
    """DLG's eq. 4 after mapping the dummy update (``dummy_update``: a gradient, or FedAvg's replayed
    local training) into the defense's output space; with ``cosine``, 1 - the cosine similarity of the
    two whole updates instead (Geiping et al. 2020's scale-invariant distance: a defense that rescales the
    update, by a known or unknown factor, cannot hide behind it)."""
    mapped = space.apply(dummy_update(model, dummy_x, soft_labels, local, create_graph=create_graph))
    value = sum(((g - t) ** 2).sum() for g, t in zip(mapped, target)) if not cosine else cosine_distance(mapped, target)
    return value if create_graph else value.detach()


class LBFGSRun:
    """Runs ``torch.optim.LBFGS`` on a set of leaf tensors and keeps the bookkeeping a result needs:
    closure evaluations, last distance, divergence. The optimiser follows the DLG reference setup
    (lr 1, max_iter 20 per step, history 100) unless told otherwise."""

    def __init__(self, variables: list[torch.Tensor], objective: Callable[[], torch.Tensor], *,
                 lr: float = 1.0, max_iter: int = 20, history_size: int = 100,
                 tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9,
                 fresh_each_step: bool = False) -> None:
        self.variables = variables
        self.objective = objective
        self.optimizer = torch.optim.LBFGS(variables, lr=lr, max_iter=max_iter, history_size=history_size,
                                           tolerance_grad=tolerance_grad, tolerance_change=tolerance_change)
        self.closure_evals = 0
        self.distance = math.inf
        self.diverged = False
        self.fresh_each_step = fresh_each_step

    def closure(self) -> torch.Tensor:
        self.optimizer.zero_grad()
        distance = self.objective()
        # grad w.r.t. the dummies only: backward() would also fill the model's parameter grads
        grads = torch.autograd.grad(distance, self.variables)
        for v, g in zip(self.variables, grads):
            v.grad = g
        self.closure_evals += 1
        self.distance = float(distance.detach())
        return distance.detach()

    def step(self) -> bool:
        """One L-BFGS step; returns False once the run has diverged (non-finite distance or variables)."""
        saved = [v.detach().clone() for v in self.variables]
        if self.fresh_each_step:
            self.optimizer.state.clear()  # start this step's L-BFGS history afresh
        self.optimizer.step(self.closure)
        finite = math.isfinite(self.distance) and all(bool(torch.isfinite(v).all()) for v in self.variables)
        if not finite:
            self.diverged = True
            with torch.no_grad():  # keep the last finite state as the reconstruction
                for v, s in zip(self.variables, saved):
                    v.copy_(s)
        return finite


def run_steps(runs: list[LBFGSRun], steps: int, schedule: Callable[[int], int],
              snapshot: Callable[[], tuple[torch.Tensor, torch.Tensor | None]],
              monitor: Monitor | None, stop_distance: float) -> int:
    """Step ``runs[schedule(i)]`` for i in range(steps); returns the number of steps taken."""
    taken = 0
    for i in range(steps):
        run = runs[schedule(i)]
        ok = run.step()
        taken = i + 1
        if monitor is not None:
            images, labels = snapshot()
            monitor(taken, images, labels)
        if not ok:
            break
        if stop_distance > 0 and run.distance < stop_distance and all(r.distance < stop_distance for r in runs):
            break
    return taken


_warned_compile: list[bool] = []


def _compile_unavailable(exc: Exception) -> None:
    """Says once per process that the engine runs eagerly because torch.compile failed here."""
    if not _warned_compile:
        _warned_compile.append(True)
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"torch.compile unavailable ({type(exc).__name__}: {first_line}); the engine runs "
                      "its objective eagerly (same results, slower)", RuntimeWarning, stacklevel=3)


# compiled sizes: powers of two from 16 instances. Every batch is padded up to one: a compiled tick's
# cost is mostly fixed at these sizes (LeNet on the speed benchmark's CPU: 6.4 ms at 16, 10.3 ms at 32,
# 18.9 ms at 64), so even a batch of one padded to 16 beats eager mode (7.7 ms), and 17 padded to 32
# beats it too (14 ms); sizes in between (24, 48) saved nothing and cost a compile each
COMPILED_MIN_SIZE = 16


class _UnfoldConv2d(nn.Conv2d):
    """A ``Conv2d`` computed as unfold + matmul: the same function, but under ``vmap`` its per-instance
    weight gradient (and that gradient's own derivatives, which the objective needs) become batched
    matmuls instead of convolutions grouped by instance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        (kh, kw), (ph, pw), (sh, sw) = self.kernel_size, self.padding, self.stride
        out_h, out_w = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)  # (n, c*kh*kw, L)
        out = self.weight.view(self.out_channels, -1) @ cols
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out.view(n, self.out_channels, out_h, out_w)


# oneDNN runs a convolution grouped by instance slowly when each group has few input channels (the
# first layer of an image model); compiled, unfolding LeNet's first layer took the objective from 0.30
# to 0.26 ms per instance at 64 instances (0.32 -> 0.27 at 32, equal at 16), unfolding its deeper
# layers (12 channels) made it slower
UNFOLD_MAX_IN_CHANNELS = 3


def _unfold_thin_convolutions(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose plain convolutions with at most UNFOLD_MAX_IN_CHANNELS input
    channels are ``_UnfoldConv2d`` (same parameter names, so ``functional_call`` is unchanged)."""
    def thin(m: nn.Module) -> bool:
        return (type(m) is nn.Conv2d and m.in_channels <= UNFOLD_MAX_IN_CHANNELS and m.groups == 1
                and m.dilation == (1, 1) and m.padding_mode == "zeros" and isinstance(m.padding, tuple))

    if not any(thin(m) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if thin(module):
            parent_name, _, child = name.rpartition(".")
            swapped = _UnfoldConv2d(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                                    padding=module.padding, bias=module.bias is not None,
                                    device=module.weight.device, dtype=module.weight.dtype)
            swapped.load_state_dict(module.state_dict())
            setattr(model.get_submodule(parent_name) if parent_name else model, child, swapped)
    return model


def output_head(model: nn.Module, input_shape: tuple[int, ...], num_classes: int
                ) -> tuple[nn.Module, str, str] | None:
    """(the model without its output layer, the output layer's weight name, its bias name) when the model
    ends in a biased ``nn.Linear`` onto the classes that is applied to the rest's output and nothing
    after it (checked on a random input), else None. Then a sample's output-weight gradient is the outer
    product of the bias gradient and the layer's input, which ``BatchedGradientMatching`` exploits."""
    names = [n for n, _ in model.named_parameters()]
    heads = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and m.bias is not None
             and m.out_features == num_classes and names[-2:] == [f"{n}.weight", f"{n}.bias"]]
    if not heads or not heads[0][0]:
        return None
    name, head = heads[0]
    body = copy.deepcopy(model)
    parent, _, child = name.rpartition(".")
    setattr(body.get_submodule(parent) if parent else body, child, nn.Identity())
    body.eval()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(head.weight)
            features = body(x)
            same = (features.ndim == 2 and features.shape[1] == head.in_features
                    and torch.allclose(head(features), model(x), rtol=1e-4, atol=1e-5))
    except RuntimeError:  # a body whose output does not fit the head's matmul
        same = False
    finally:
        model.train(was_training)
    return (body, f"{name}.weight", f"{name}.bias") if same else None


class BatchedGradientMatching:
    """The DLG objective of many independent instances in one vectorised program.

    Instance i has its own model weights (or all share one model: ``shared_weights``, unbatched
    ``params``), its own shared update and its own dummies; the architecture is common. Each instance's variables are one flat row: its dummy inputs, then (when labels are
    optimised) its label logits, in the order ``torch.optim.LBFGS`` would flatten ``[x, logits]``.
    ``torch.func`` gives the per-instance parameter gradient (``grad``), the distance to the target,
    and its gradient w.r.t. the row (``grad_and_value``), all under one ``vmap``: one forward/backward
    over every running instance instead of one small program per instance. The same function is what
    ``torch.compile`` can compile (the double-backward of the eager autograd path cannot be).

    ``distance`` is DLG's squared distance (``"l2"``) or Inverting Gradients' cosine distance
    (``"cosine"``); ``tv`` adds that weight times the total variation of the dummy images (the
    attack's prior). ``scores`` gives the distance alone, without the prior.
    """

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                 targets: list[torch.Tensor], *, input_shape: tuple[int, ...], batch_size: int,
                 num_classes: int, onehot: torch.Tensor | None = None, compile: bool = False,
                 shared_weights: bool = False, distance: str = "l2", tv: float = 0.0,
                 local: LocalTraining | None = None, outer_product: bool = True) -> None:
        from torch.func import functional_call, grad, grad_and_value, vmap

        self._on_cpu = next(iter(params.values())).device.type == "cpu"
        if compile and self._on_cpu:
            model = _unfold_thin_convolutions(model)  # measured on CPU and compiled only: eager got slower
        self.params, self.buffers, self.targets, self.onehot = params, buffers, targets, onehot
        self.n_x = batch_size * math.prod(input_shape)
        self.x_shape = (batch_size, *input_shape)
        self.logit_shape = (batch_size, num_classes)
        names = list(params)

        if distance not in ("l2", "cosine"):
            raise ValueError(f"distance must be 'l2' or 'cosine', got {distance!r}")

        # one sample, squared distance: the output layer's weight gradient a h^T (a the bias gradient, h the
        # layer's input) is never formed, its distance to the target T being ||a||^2 ||h||^2 - 2 a.(T h)
        # + ||T||^2 (||T||^2 once per target). With 100 classes that layer is 87% of lenet-zhu's
        # parameters, and forming a h^T, its difference to T and their derivatives dominated the eager
        # tick (124 -> 70 ms at 64 instances, one thread; compiled, inductor already fuses it: equal).
        # The three terms cancel to the distance, so they are summed in float64: in float32 the
        # cancellation would leave an error of about 6e-8 ||T||^2, near 4e-5 on CIFAR, the size of the
        # distances a converging attack reaches.
        head = output_head(model, input_shape, num_classes) if (
            distance == "l2" and local is None and batch_size == 1 and outer_product) else None
        self.outer_product = head is not None
        if head is not None:
            body, w_name, b_name = head
            w_index = names.index(w_name)
            wide = torch.float64 if targets[w_index].dtype in (torch.float32, torch.float16, torch.bfloat16) \
                else targets[w_index].dtype
            if wide == torch.float64 and targets[w_index].device.type == "mps":  # no float64 there
                wide = torch.float32
            t_wide = targets[w_index].to(wide)
            self.targets = targets = [*targets, t_wide, (t_wide.flatten(1) ** 2).sum(1)]  # + T, ||T||^2 wide

        def match_outer(p, bufs, target, row, labels):
            x = row[:self.n_x].view(self.x_shape)
            soft = labels if labels is not None else torch.softmax(row[self.n_x:].view(self.logit_shape), -1)
            weight = p[w_name]
            rest = {n: v for n, v in p.items() if n != w_name}

            def training_loss(weights):
                features = functional_call(body, ({n: v for n, v in weights.items() if n != b_name}, bufs), (x,))
                logits = F.linear(features, weight, weights[b_name])
                return soft_cross_entropy(logits, soft), features[0]

            g, h = grad(training_loss, has_aux=True)(rest)
            t_w, t_norm2 = target[-2], target[-1]
            a, h = g[b_name].to(t_w.dtype), h.to(t_w.dtype)
            value = ((a @ a) * (h @ h) - 2 * (a @ (t_w @ h)) + t_norm2).to(x.dtype)
            return value + sum(((g[n] - t) ** 2).sum() for n, t in zip(names, target) if n != w_name)

        def match(p, bufs, target, row, labels):
            if head is not None:
                return match_outer(p, bufs, target, row, labels)
            x = row[:self.n_x].view(self.x_shape)
            soft = labels if labels is not None else torch.softmax(row[self.n_x:].view(self.logit_shape), -1)

            def training_loss(weights):
                return soft_cross_entropy(functional_call(model, (weights, bufs), (x,)), soft)

            if local is None:
                g = grad(training_loss)(p)
            else:  # federated averaging: the dummies' update is the replayed local training's
                g = local.simulated_update(
                    lambda w, xb, sb: soft_cross_entropy(functional_call(model, (w, bufs), (xb,)), sb), p, x, soft)
            if distance == "cosine":
                return cosine_distance([g[n] for n in names], target)
            return sum(((g[n] - t) ** 2).sum() for n, t in zip(names, target))

        def objective(p, bufs, target, row, labels):
            value = match(p, bufs, target, row, labels)
            if tv:
                value = value + tv * total_variation(row[:self.n_x].view(self.x_shape))
            return value

        # with one model for every instance (the DLG reference attacks many images of one network) the
        # weights are not batched, so convolutions run as one ordinary batched convolution instead of
        # a grouped one with a weight per instance
        self.shared_weights = shared_weights
        weight_dim = None if shared_weights else 0
        in_dims = (weight_dim, weight_dim, 0, 0, 0 if onehot is not None else None)
        self._fn = vmap(grad_and_value(objective, argnums=3), in_dims=in_dims)
        self._match = vmap(match, in_dims=in_dims)
        # torch.compile specialises on the vmapped batch size (marking it dynamic is refused), so the
        # compiled program runs at fixed sizes: powers of two, the running instances padded up to one
        # when they fill enough of it to beat eager mode, eager otherwise. Each size compiles once.
        # on CPU the compiled graph's wrapper is generated as C++ rather than Python (inductor's
        # cpp_wrapper): measured on the speed benchmark's CPU, 8% less per call at 64 instances and
        # 10% at 32, and a 128-target stream went from 89.5 to 92.1 attacks/min
        options = {"cpp_wrapper": True} if self._on_cpu else None
        self._compiled = None
        if compile:
            try:
                self._compiled = torch.compile(self._fn, dynamic=False, options=options)
            except Exception as exc:  # torch.compile unsupported here (e.g. this Python version)
                _compile_unavailable(exc)
        self._picked: tuple[torch.Tensor, tuple] | None = None  # (ids, their per-instance tensors)

    @property
    def width(self) -> int:
        return self.n_x + (0 if self.onehot is not None else math.prod(self.logit_shape))

    def __call__(self, ids: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = len(ids)
        fn = self._fn
        if self._compiled is not None:
            size = max(COMPILED_MIN_SIZE, 1 << (k - 1).bit_length())
            fn = self._compiled
            if size > k:  # pad with copies of the first instance; their results are dropped
                ids = torch.cat([ids, ids[:1].expand(size - k)])
                rows = torch.cat([rows, rows[:1].expand(size - k, -1)])
        params, buffers, targets, labels = self._per_instance(ids)
        try:
            grads, values = fn(params, buffers, targets, rows, labels)
        except Exception as exc:
            if fn is self._fn:
                raise
            # compiling failed (no C++ compiler, an unsupported operator): the same function eagerly
            _compile_unavailable(exc)
            self._compiled = None
            return self(ids[:k], rows[:k])
        return values[:k].detach(), grads[:k].detach().contiguous()

    def scores(self, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The distance alone (no prior) of the instances ``ids`` at ``rows``: what the attacker compares
        restarts by."""
        params, buffers, targets, labels = self._per_instance(ids)
        return self._match(params, buffers, targets, rows, labels).detach()

    def _per_instance(self, ids: torch.Tensor) -> tuple[dict, dict, list[torch.Tensor], torch.Tensor | None]:
        """Weights, buffers, targets and labels of the instances ``ids``, gathered once per batch
        composition: a batch keeps its instances for many ticks, and gathering every target each tick
        cost 0.6 ms of a 26 ms tick (DLG speed benchmark, 64 instances)."""
        if self._picked is not None and torch.equal(self._picked[0], ids):  # False for another size too
            return self._picked[1]
        pick = lambda t: t.index_select(0, ids)  # noqa: E731
        params, buffers = self.params, self.buffers
        if not self.shared_weights:
            params = {n: pick(p) for n, p in params.items()}
            buffers = {n: pick(b) for n, b in buffers.items()}
        picked = (params, buffers, [pick(t) for t in self.targets],
                  pick(self.onehot) if self.onehot is not None else None)
        self._picked = (ids.clone(), picked)
        return picked

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(dummy inputs (M, N, C, H, W), label logits (M, N, classes) or None) of flat rows."""
        x = rows[:, :self.n_x].reshape(-1, *self.x_shape)
        logits = None if self.onehot is not None else rows[:, self.n_x:].reshape(-1, *self.logit_shape)
        return x, logits
