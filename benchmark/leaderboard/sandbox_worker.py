"""The sandbox child of ``leakbench submit``: loads a submitted defense and answers the parent's requests.

Run as ``python -m leakbench.leaderboard.sandbox_worker --fd N --memory-mb M --cpu-seconds S`` by
``leakbench.leaderboard.sandbox``. It caps its own address space and CPU time before any submitted code is
imported, then serves one request at a time over the inherited socket. Every update, in the accuracy
run and in the attacks alike, is produced by the same ``serve_share`` call on the same defense object, with
the same kind of inputs (the victim's model, its batch, a seed), so the defense cannot tell the two apart
by its call stack, globals or process. The one exception is the GAN cells' collaborative protocol: it
computes a participant's update itself (the parameter delta of a turn) and sends a ``transform`` request,
which the same defense object answers without ``compute_update``.

Answers go back in a format the parent parses without unpickling (a JSON header, then raw tensor bytes):
the parent must not run code the child chose.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pickle
import resource
import sys
import traceback
from importlib.metadata import entry_points
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from ..catalog import load_all
from ..defenses.base import Defense
from ..registry import DEFENSES
from ..threat import LocalTraining

MAX_LIST = 10_000  # bound on anything list-like a defense reports (params, claims)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _where_in_user_code(exc: BaseException, user_file: str | None) -> str:
    """' (my_defense.py line 12)' for the deepest frame of the submitted file, else ''."""
    if not user_file:
        return ""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == user_file]
    return f" ({Path(user_file).name} line {frames[-1].lineno})" if frames else ""


class Reply:
    """Child -> parent: a JSON header, then one raw byte buffer per tensor."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def ok(self, value: Any = None, tensors: list[torch.Tensor] | None = None) -> None:
        tensors = tensors or []
        header = {"ok": True, "value": value,
                  "tensors": [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in tensors]}
        self.conn.send_bytes(json.dumps(header).encode())
        for t in tensors:
            self.conn.send_bytes(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                                 if t.numel() else b"")

    def error(self, where: str, message: str) -> None:
        self.conn.send_bytes(json.dumps({"ok": False, "where": where, "error": message}).encode())


def load_defense_class(spec: dict) -> type:
    """The class a submission names: ``file`` (a .py path and class name), ``entry-point`` (installed
    plugins in the ``leakbench.defenses`` group) or ``builtin`` (a registered name)."""
    kind = spec["kind"]
    if kind == "file":
        path = Path(spec["path"])
        module_spec = importlib.util.spec_from_file_location("leakbench_submission", path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules["leakbench_submission"] = module
        module_spec.loader.exec_module(module)
        if not hasattr(module, spec["class"]):
            raise AttributeError(f"{path.name} defines no {spec['class']!r}")
        return getattr(module, spec["class"])
    if kind == "entry-point":
        found = list(entry_points(group="leakbench.defenses", name=spec["name"]))
        if not found:
            raise LookupError(f"no installed plugin registers {spec['name']!r} in the 'leakbench.defenses' "
                              f"entry-point group")
        return found[0].load()
    load_all()
    return DEFENSES.get(spec["name"])


def check_update(update: Any, params: list[torch.Tensor], method: str) -> list[torch.Tensor]:
    """The update a method returned, or ValueError naming the first problem: one tensor per entry of
    ``params``, of its shape and dtype, all finite. The parent applies the same rules again to what it
    receives (``leakbench.leaderboard.sandbox.check_update``), since it does not trust the child."""
    if not isinstance(update, (list, tuple)) or not all(isinstance(u, torch.Tensor) for u in update):
        raise ValueError(f"{method} returned {type(update).__name__}, expected a list of tensors")
    if len(update) != len(params):
        raise ValueError(f"{method} returned {len(update)} tensors, expected {len(params)} (one per parameter)")
    for i, (u, p) in enumerate(zip(update, params)):
        if tuple(u.shape) != tuple(p.shape):
            raise ValueError(f"{method} tensor {i} has shape {tuple(u.shape)}, expected {tuple(p.shape)}")
        if u.dtype != p.dtype:
            raise ValueError(f"{method} tensor {i} has dtype {str(u.dtype).replace('torch.', '')}, "
                             f"expected {str(p.dtype).replace('torch.', '')}")
        if not bool(torch.isfinite(u).all()):
            raise ValueError(f"{method} tensor {i} has non-finite values (NaN or inf)")
    return list(update)


def apply_transform(defense, update: list[torch.Tensor], generators: list[torch.Generator], *,
                    cotangent: list[torch.Tensor] | None = None) -> tuple[dict, list[torch.Tensor]]:
    """Every call of the submitted ``transform`` goes through here, whoever asks (the victim's share, the
    collaborative protocol's upload, an adaptive attacker's replay), so that the defense sees one call
    path. Returns ({"differentiable": bool}, outputs + products): the mean output over one draw per
    generator (expectation over transformation for a random transform, Athalye et al. 2018) and, given a
    ``cotangent``, its vector-Jacobian product: through autograd where the transform is differentiable
    (and its derivative is not zero everywhere, as rounding's is), else the cotangent itself
    (straight-through, BPDA)."""
    leaves = [u.detach().clone().requires_grad_(cotangent is not None) for u in update]
    differentiable = cotangent is not None
    total: list[torch.Tensor] | None = None
    for generator in generators:
        try:
            out = check_update(defense.transform(list(leaves), generator=generator), update, "transform")
            differentiable = differentiable and all(o.requires_grad for o in out)
        except RuntimeError:  # e.g. an in-place operation on a leaf that needs a gradient: no gradients
            if cotangent is None:
                raise
            differentiable = False
            out = check_update(defense.transform([u.detach().clone() for u in update], generator=generator),
                               update, "transform")
        total = list(out) if total is None else [a + b for a, b in zip(total, out)]
    mean = total if len(generators) == 1 else [t / len(generators) for t in total]
    products: list[torch.Tensor] = []
    if cotangent is not None:
        if differentiable:
            grads = torch.autograd.grad(mean, leaves, cotangent, allow_unused=True)
            products = [g if g is not None else torch.zeros_like(u) for g, u in zip(grads, update)]
            # rounding and other piecewise-constant steps have a derivative of zero almost everywhere:
            # no information for the attacker, so they count as not differentiable
            if not any(bool(p.any()) for p in products) and any(bool(c.any()) for c in cotangent):
                differentiable = False
        if not differentiable:
            products = [c.detach() for c in cotangent]
    return {"differentiable": differentiable}, [m.detach() for m in mean] + [p.detach() for p in products]


def _json_safe(value: Any, what: str) -> Any:
    text = json.dumps(value, allow_nan=False, default=lambda o: (_ for _ in ()).throw(
        TypeError(f"{what} holds a {type(o).__name__}, not JSON")))
    if len(text) > 100_000:
        raise ValueError(f"{what} is too large to record")
    return json.loads(text)


def serve(conn: Connection) -> None:
    reply = Reply(conn)
    defense = None
    user_file: str | None = None
    while True:
        try:
            request = pickle.loads(conn.recv_bytes())  # the parent is trusted; the child only answers
        except EOFError:
            return
        kind = request[0]
        if kind == "close":
            reply.ok()
            return
        where = str(kind)
        try:
            if kind == "load":
                _, spec, given = request
                user_file = str(Path(spec["path"]).resolve()) if spec["kind"] == "file" else None
                where = "import"
                cls = load_defense_class(spec)
                if not isinstance(cls, type) or not issubclass(cls, Defense):
                    raise TypeError(f"{getattr(cls, '__name__', cls)!r} is not a subclass of leakbench.Defense")
                # aggregated_clients is the deployment's (how many clients a secure aggregate hides the victim
                # among), not a transform: an entry that set it would be credited for a protocol it never ran
                overridden = [m for m in ("share", "accuracy_run", "share_after_local_training", "aggregated_clients")
                              if getattr(cls, m) is not getattr(Defense, m)]
                where = "constructor"
                defense = cls(**given)
                info = {"family": str(getattr(cls, "family", "other")), "params": defense.get_params(),
                        "overrides": overridden, "class": cls.__name__,
                        "replayable_transform": getattr(cls, "replayable_transform", False) is True}
                reply.ok(_json_safe(info, "the defense's parameters"))
            elif kind == "victim_batch_size":
                where = "victim_batch_size"
                value = defense.victim_batch_size(int(request[1]))
                reply.ok(value if isinstance(value, int) and not isinstance(value, bool) else repr(value))
            elif kind == "share":
                # ``local``: federated averaging's local training as a dict of LocalTraining's fields, or
                # None for FedSGD; either way the defense sees compute_update calls, then one transform
                _, model_bytes, x, soft_labels, seed, local = request
                model = pickle.loads(model_bytes)
                params = [p for p in model.parameters() if p.requires_grad]
                generator = torch.Generator().manual_seed(seed)
                where = "compute_update"

                def step_update(m, xb, sb):
                    return check_update(defense.compute_update(m, xb, sb, generator=generator),
                                        [p for p in m.parameters() if p.requires_grad], "compute_update")

                training = LocalTraining(**local) if local else None
                if training is None or training.fedsgd(len(x) // training.clients):
                    raw = step_update(model, x, soft_labels)
                else:
                    raw = check_update(training.victim_update(model, x, soft_labels, step_update), params,
                                       "compute_update")
                where = "transform"
                reply.ok(None, apply_transform(defense, raw, [generator])[1])
            elif kind in ("transform", "replay"):
                # an update leakbench computed (the collaborative protocol's delta), or an adaptive
                # attacker's dummy update, with its cotangent (or None) and one seed per draw
                _, update, cotangent, seeds = request
                where = "transform"
                reply.ok(*apply_transform(defense, update, [torch.Generator().manual_seed(int(s)) for s in seeds],
                                          cotangent=cotangent))
            elif kind == "privacy":
                where = "privacy"
                claim = defense.privacy(steps=int(request[1]), sample_rate=float(request[2]))
                reply.ok(_json_safe(claim if isinstance(claim, dict) else {"value": repr(claim)}, "privacy()"))
            else:
                reply.error("request", f"unknown request {kind!r}")
        except MemoryError:
            reply.error(where, "MemoryError: ran out of memory (the sandbox's memory limit)")
        except BaseException as exc:  # anything the submitted code raises fails the submission, named
            if isinstance(exc, KeyboardInterrupt):
                raise
            message = _one_line(exc)
            if "can't allocate memory" in message or "not enough memory" in message:
                message = "out of memory (the sandbox's memory limit): " + message
            reply.error(where, message + _where_in_user_code(exc, user_file))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="leakbench.leaderboard.sandbox_worker")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--memory-mb", type=int, required=True)
    ap.add_argument("--cpu-seconds", type=int, required=True)
    args = ap.parse_args(argv)
    # limits first: nothing submitted has run yet
    memory = args.memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (args.cpu_seconds, args.cpu_seconds + 5))
    torch.set_num_threads(1)
    conn = Connection(args.fd)
    try:
        serve(conn)
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
