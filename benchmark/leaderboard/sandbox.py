"""Submitted defenses are untrusted code: they run in a sandboxed child process, never in leakbench's own.

``DefenseSandbox`` starts ``python -m leakbench.leaderboard.sandbox_worker`` with an address-space and a CPU-time
limit (set by the child before it imports anything submitted), in its own process group, with a clean
environment and no GPU. The parent keeps a wall-clock deadline and kills the group when it passes.

Inside leakbench the submission is a ``Defense`` proxy registered under ``submitted:<name>``: its
``share`` sends (model, batch, soft labels, seed) to the child and gets the shared update back. The
accuracy run (leakbench's own ``train_with_defense``) and every gradient attack call that same ``share``,
so the one defense object in the child produces every update. The GAN cells' collaborative protocol
computes each participant's update itself (the parameter delta of a turn) and calls the proxy's
``transform``, which the same object in the child answers. The parent checks each update it receives:
one tensor per trainable parameter, the parameter's shape, its floating dtype, all finite. Any violation,
crash, timeout or memory exhaustion raises a one-line ``SubmissionError`` (a ``ConfigError``).

What the child sees is what a defense is entitled to: the victim's model and batch (``compute_update``,
the training hook) and the update (``transform``). It never sees the attacker, the test data, the
private targets of other cells, or which run a request belongs to.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..catalog import load_all
from ..defenses.base import Defense
from ..errors import ConfigError
from ..params import Param
from ..registry import DEFENSES
from ..threat import AttackerMap, LocalTraining, Replay, replayed_map
from .bubblewrap import confine, require_bwrap
from .sandbox_worker import check_update as check_by_the_rules

SUBMITTED_PREFIX = "submitted:"
DEFAULT_TIMEOUT_S = 3600.0
# The child of a smoke submission peaks at about 0.6 GiB of address space and 0.25 GiB resident
# (/proc/self/status VmPeak, VmHWM; torch 2.13 CPU build, one thread): 4 GiB leaves room for larger
# models and defenses with state, and still stops a runaway allocation.
DEFAULT_MEMORY_MB = 4096
MAX_MESSAGE_BYTES = 1 << 30
EOT_DRAWS = 8  # draws of a random submitted transform that adaptive attacks average over
_DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                                     torch.int8, torch.int16, torch.int32, torch.int64,
                                                     torch.uint8, torch.bool, torch.complex64)}


class SubmissionError(ConfigError):
    """A submitted defense failed: the message names the problem in one line (exit 2 from the CLI)."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = DEFAULT_TIMEOUT_S     # wall clock for the whole submission, startup included
    memory_mb: int = DEFAULT_MEMORY_MB       # address space of the child (RLIMIT_AS)
    # run the child without bubblewrap (no namespaces: it could read the host and use the network);
    # only for code the user trusts, and only when asked for (--trust-code)
    trust_code: bool = False

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ConfigError(f"--timeout {self.timeout_s!r} is invalid; allowed: a number of seconds > 0")
        if self.memory_mb < 256:
            raise ConfigError(f"--memory-mb {self.memory_mb!r} is invalid; allowed: an integer >= 256")


@dataclass(frozen=True)
class DefenseSource:
    """Where a defense comes from: ``builtin:NAME``, ``entry-point:NAME`` or ``path/file.py:ClassName``."""

    kind: str                 # "builtin" | "entry-point" | "file"
    name: str = ""            # builtin or entry-point name
    path: str = ""            # file
    class_name: str = ""      # file

    @classmethod
    def parse(cls, spec: str) -> "DefenseSource":
        allowed = "builtin:NAME, entry-point:NAME, or path/to/file.py:ClassName"
        if spec.startswith("builtin:") and len(spec) > 8:
            return cls("builtin", name=spec[8:])
        if spec.startswith("entry-point:") and len(spec) > 12:
            return cls("entry-point", name=spec[12:])
        body = spec[5:] if spec.startswith("file:") else spec
        path, sep, class_name = body.rpartition(":")
        if not sep or not path.endswith(".py") or not class_name.isidentifier():
            raise ConfigError(f"defense {spec!r} is invalid; allowed: {allowed}")
        if not Path(path).is_file():
            raise ConfigError(f"defense file {path!r} does not exist")
        return cls("file", path=path, class_name=class_name)

    def as_entry(self) -> str:
        """The ``defense.source`` of a board entry (file paths relative to the working folder)."""
        if self.kind == "file":
            path = Path(self.path)
            try:
                path = path.resolve().relative_to(Path.cwd().resolve())
            except ValueError:
                pass
            return f"file:{path.as_posix()}:{self.class_name}"
        return f"{self.kind}:{self.name}"

    def worker_spec(self) -> dict:
        if self.kind == "file":
            return {"kind": "file", "path": str(Path(self.path).resolve()), "class": self.class_name}
        return {"kind": self.kind, "name": self.name}


def _describe_exit(returncode: int | None, limits: SandboxLimits, *, confined: bool = False) -> str:
    if returncode is None:
        return "stopped answering"
    if confined and returncode > 128 and returncode - 128 in signal.valid_signals():
        returncode = -(returncode - 128)  # bwrap exits with 128 + the signal that killed its child
    if returncode < 0:
        sig = signal.Signals(-returncode).name
        hint = {"SIGXCPU": f"its CPU-time limit of {limits.timeout_s:g} s",
                "SIGKILL": f"killed, e.g. for memory (limit {limits.memory_mb} MiB)",
                "SIGSEGV": "a segmentation fault"}.get(sig, sig)
        return f"died ({sig}: {hint})"
    return f"exited with status {returncode}"


class DefenseSandbox:
    """One child process holding one submitted defense object."""

    def __init__(self, source: DefenseSource, *, limits: SandboxLimits, label: str) -> None:
        self.source = source
        self.limits = limits
        self.label = label
        self.deadline = time.monotonic() + limits.timeout_s
        self.requests = 0
        parent_sock, child_sock = socket.socketpair()
        self._stderr = tempfile.TemporaryFile()
        self._cwd = tempfile.TemporaryDirectory(prefix="leakbench-sandbox-")
        # a clean environment: nothing of the parent's (tokens, data paths) and no GPU
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self._cwd.name,
               "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONDONTWRITEBYTECODE": "1", "LANG": os.environ.get("LANG", "C.UTF-8")}
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        cpu_seconds = max(1, int(limits.timeout_s) + 1)
        argv = [sys.executable, "-m", "leakbench.leaderboard.sandbox_worker", "--fd", str(child_sock.fileno()),
                "--memory-mb", str(limits.memory_mb), "--cpu-seconds", str(cpu_seconds)]
        self.confined = not limits.trust_code
        if self.confined:  # no network, no writes but its folder, no reads of the host (bubblewrap.py)
            files = [Path(source.worker_spec()["path"])] if source.kind == "file" else []
            argv = confine(argv, workdir=Path(self._cwd.name), readable_files=files, env=env)
        self.process = subprocess.Popen(
            argv, pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr,
            env=env, cwd=self._cwd.name, start_new_session=True)  # its own process group, killed as one
        child_sock.close()
        self.conn = Connection(parent_sock.detach())

    # -- lifecycle -----------------------------------------------------------------------------------
    def kill(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.conn.send_bytes(pickle.dumps(("close",)))
                if self.conn.poll(5):
                    self.conn.recv_bytes(1 << 16)
            except (OSError, EOFError):
                pass
        self.kill()
        self.conn.close()
        self._stderr.close()
        self._cwd.cleanup()

    def _fail(self, message: str) -> SubmissionError:
        self.kill()
        return SubmissionError(f"submitted defense {self.label}: {message}")

    # -- requests ------------------------------------------------------------------------------------
    def request(self, message: tuple, *, what: str) -> tuple[Any, list[torch.Tensor]]:
        """Send ``message``; return (value, tensors) of the answer, or raise SubmissionError."""
        self.requests += 1
        try:
            self.conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
            header = json.loads(self._receive(what))
            if not isinstance(header, dict):
                raise ValueError("malformed answer")
            if not header.get("ok"):
                raise self._fail(f"{header.get('where', what)} failed: {header.get('error', 'unknown error')}")
            tensors = [self._tensor(meta, self._receive(what)) for meta in header.get("tensors", [])]
            return header.get("value"), tensors
        except (EOFError, OSError):
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # it closed the socket but lives on: _fail kills it
                pass
            ended = _describe_exit(self.process.poll(), self.limits, confined=self.confined)
            raise self._fail(f"the sandbox process {ended} while answering {what}") from None
        except (ValueError, TypeError, KeyError) as exc:
            if isinstance(exc, SubmissionError):
                raise
            raise self._fail(f"sent a malformed answer to {what} ({exc})") from None

    def _receive(self, what: str) -> bytes:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0 or not self.conn.poll(remaining):
            raise self._fail(f"timed out: the submission's time limit of {self.limits.timeout_s:g} s "
                             f"(--timeout) ran out while it answered {what}")
        return self.conn.recv_bytes(MAX_MESSAGE_BYTES)

    @staticmethod
    def _tensor(meta: dict, raw: bytes) -> torch.Tensor:
        dtype = _DTYPES.get(str(meta.get("dtype")))
        shape = meta.get("shape")
        if dtype is None:
            raise ValueError(f"unsupported dtype {meta.get('dtype')!r}")
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise ValueError(f"bad shape {shape!r}")
        numel = 1
        for n in shape:
            numel *= n
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(raw) != numel * itemsize:
            raise ValueError(f"{len(raw)} bytes for shape {shape} of {meta['dtype']}")
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape).clone()


def check_update(update: list[torch.Tensor], params: list[tuple[str, torch.Tensor]], label: str, *,
                 method: str = "share") -> list[torch.Tensor]:
    """The parent's own check of a shared update (the child is not trusted to have checked it), by the
    child's rules: one tensor per entry of ``params`` (name, reference tensor), of its shape and dtype,
    all finite."""
    try:
        return check_by_the_rules(update, [p for _, p in params], method)
    except ValueError as exc:
        raise SubmissionError(f"submitted defense {label}: {exc}") from None


def sandboxed_defense_class(sandbox: DefenseSandbox, info: dict) -> type[Defense]:
    """A ``Defense`` whose updates come from the sandboxed object. Its declared parameters are the
    submission's validated values, so grids and records carry them like any defense's."""
    declared = tuple(Param(name, type(value) if value is not None else object, value, nullable=value is None)
                     for name, value in info["params"].items())
    batch_sizes: dict[int, int] = {}

    class SandboxedDefense(Defense):
        __doc__ = f"Submitted defense {info['class']} (runs in a sandboxed process)."
        family = info["family"] if isinstance(info.get("family"), str) else "other"
        params = declared
        replayable_transform = info.get("replayable_transform") is True  # declared free of randomness

        def victim_batch_size(self, default: int) -> int:
            if default not in batch_sizes:
                value, _ = sandbox.request(("victim_batch_size", default), what="victim_batch_size")
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
                    raise SubmissionError(f"submitted defense {sandbox.label}: victim_batch_size returned "
                                          f"{value!r}; allowed: an integer in [1, 4096]")
                batch_sizes[default] = value
            return batch_sizes[default]

        def share(self, model: nn.Module, x: torch.Tensor, soft_labels: torch.Tensor, *,
                  generator: torch.Generator | None = None) -> list[torch.Tensor]:
            return self._share(model, x, soft_labels, None, generator)

        def share_after_local_training(self, model: nn.Module, x: torch.Tensor, soft_labels: torch.Tensor,
                                       local: LocalTraining, *, generator: torch.Generator | None = None
                                       ) -> list[torch.Tensor]:
            # the child runs the local steps with the submitted compute_update, then its transform, in the
            # same "share" request as FedSGD: the defense cannot tell an attacked FedAvg update apart
            return self._share(model, x, soft_labels, asdict(local), generator)

        def _share(self, model, x, soft_labels, local: dict | None, generator) -> list[torch.Tensor]:
            # the child's randomness is a seed drawn from the caller's generator: reproducible per cell
            seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else 0
            device = x.device
            model_bytes = pickle.dumps(model.cpu() if device.type == "cpu" else _cpu_copy(model))
            value, update = sandbox.request(("share", model_bytes, x.detach().cpu(), soft_labels.detach().cpu(), seed,
                                             local), what="share")
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            return [u.to(device) for u in check_update(update, named, sandbox.label)]

        def compute_update(self, *args, **kwargs):
            raise NotImplementedError("a submitted defense computes its update in the sandbox: call share()")

        def transform(self, update: list[torch.Tensor], *, generator: torch.Generator | None = None
                      ) -> list[torch.Tensor]:
            # an update leakbench computed itself: the collaborative protocol's parameter delta, which a
            # participant passes through the defense before the agreed upload rule (the GAN cells)
            seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else 0
            device = update[0].device if update else torch.device("cpu")
            # clone: the pieces are views of one flat delta, and pickling a view would send all of it
            pieces = [u.detach().cpu().clone() for u in update]
            _, shared = sandbox.request(("transform", pieces, None, [seed]), what="transform")
            reference = [(f"tensor {i}", u) for i, u in enumerate(update)]
            return [u.to(device) for u in check_update(shared, reference, sandbox.label, method="transform")]

        def attacker_map(self, shared: list[torch.Tensor]) -> AttackerMap:
            """Adaptive attacks know a submission's code (the threat model of a public benchmark), so they
            replay its own transform on their dummy update, in the sandbox: gradients through autograd
            where the transform is differentiable, straight-through where not (BPDA), and the mean over
            a fixed set of draws where it is random (expectation over transformation, fixed so that the
            objective L-BFGS sees is deterministic). Athalye et al. 2018."""
            reference = [(f"tensor {i}", s) for i, s in enumerate(shared)]
            device = shared[0].device if shared else torch.device("cpu")

            def replay_with(seeds: list[int]) -> Replay:
                last: list = []  # (input, output) of the latest forward replay

                def replay(update, cotangent):
                    pieces = [u.detach().cpu().clone() for u in update]
                    cot = None if cotangent is None else [c.detach().cpu().clone() for c in cotangent]
                    _, tensors = sandbox.request(("replay", pieces, cot, seeds), what="transform")
                    outputs = check_update(tensors[:len(pieces)], reference, sandbox.label, method="transform")
                    products = (check_update(tensors[len(pieces):], reference, sandbox.label, method="transform")
                                if cot is not None else [])
                    if cot is None:
                        last[:] = [(pieces, outputs)]
                    elif last and all(torch.equal(a, b) for a, b in zip(last[0][0], pieces)) and not all(
                            torch.equal(a, b) for a, b in zip(last[0][1], outputs)):
                        # the only call a defense can tell apart is the one that differentiates it
                        raise sandbox._fail("transform gives another result when it is differentiated (an "
                                            "adaptive attack's replay) than on the same update otherwise")
                    return [o.to(device) for o in outputs], [p.to(device) for p in products]
                return replay

            chosen: list[Replay] = []

            def replay(update, cotangent):
                if not chosen:  # decided on first use, by an adaptive attack: other attacks cost nothing
                    chosen.append(replay_with(self._draws(shared, replay_with)))
                return chosen[0](update, cotangent)

            return replayed_map(f"{self.label()} replayed in the sandbox", replay)

        def _draws(self, shared, replay_with) -> list[int]:
            """The seeds to replay with: one for a deterministic transform (declared, or seen when two
            draws agree), EOT_DRAWS for a random one."""
            if self.replayable_transform:
                return [0]
            first, _ = replay_with([1])(shared, None)
            second, _ = replay_with([2])(shared, None)
            same = all(torch.equal(a, b) for a, b in zip(first, second))
            return [0] if same else list(range(EOT_DRAWS))

        def privacy(self, *, steps: int, sample_rate: float) -> dict[str, Any]:
            return {}  # a submission's privacy claim is recorded under `reported`, not measured

    return SandboxedDefense


def _cpu_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).cpu()


@dataclass
class Submitted:
    """A defense ready for the protocol: its registry name, validated parameters and table label."""

    registry_name: str
    params: dict
    label: str
    sandbox: DefenseSandbox | None = None
    info: dict = field(default_factory=dict)

    def privacy_claim(self, *, steps: int, sample_rate: float) -> dict:
        if self.sandbox is None:
            return {}
        value, _ = self.sandbox.request(("privacy", steps, sample_rate), what="privacy")
        return value if isinstance(value, dict) else {"value": value}


@contextmanager
def submitted_defense(source: DefenseSource, params: dict, *, name: str,
                      limits: SandboxLimits | None = None) -> Iterator[Submitted]:
    """Make ``source`` with ``params`` available to grids for the duration of the block.

    Built-ins are leakbench's own trusted code and run in-process under their registered name; files
    and entry points run in a sandbox under ``submitted:<name>``."""
    load_all()
    if source.kind == "builtin":
        defense = DEFENSES.build(source.name, params)
        yield Submitted(source.name, defense.get_params(), defense.label())
        return
    limits = limits or SandboxLimits()
    if not limits.trust_code:
        require_bwrap()  # a clear refusal, before anything runs, where submitted code cannot be confined
    label = f"{source.as_entry()!r}"
    sandbox = DefenseSandbox(source, limits=limits, label=label)
    registry_name = f"{SUBMITTED_PREFIX}{name}"
    try:
        info, _ = sandbox.request(("load", source.worker_spec(), dict(params)), what="loading the class")
        if not isinstance(info, dict) or not isinstance(info.get("params"), dict):
            raise sandbox._fail("sent a malformed description of itself")
        if info.get("overrides"):
            raise sandbox._fail(
                f"overrides {', '.join(info['overrides'])}; a submitted defense implements transform (and "
                f"optionally compute_update, victim_batch_size, privacy): leakbench's own loop trains with it, "
                f"so the accuracy run and the attacks share one path")
        cls = sandboxed_defense_class(sandbox, info)
        if registry_name in DEFENSES:
            DEFENSES.remove(registry_name)
        DEFENSES.add(registry_name, cls)
        try:
            label = cls(**info["params"]).label()
            yield Submitted(registry_name, dict(info["params"]), label, sandbox=sandbox, info=info)
        finally:
            DEFENSES.remove(registry_name)
    finally:
        sandbox.close()
