"""A watchdog that ends what a run started once the run's process is gone, SIGKILL included.

Pool workers ask the kernel to die with their parent (``executors.die_with_parent``), but only once
they have imported leakbench, and a local Ray instance is a tree the driver does not own: Ray's GCS and
raylet are its children, Ray's agents and workers are the raylet's, and after a SIGKILL to the driver the
agents live on until their own liveness checks notice (measured: about a minute). So a run marks its
environment with a token that every process it starts inherits, and starts this watchdog in a session
of its own: it polls the run's process and, once that is gone, SIGKILLs every process whose environment
holds the token (Linux ``/proc``; elsewhere it does nothing). A run that ends normally stops the
watchdog (``Reaper.stop``).

Started as ``python .../reaper.py PID TOKEN`` (the file itself, standard library only: the watchdog does
not import leakbench or torch); not a user command.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ENV_KEY = "LEAKBENCH_RUN_TOKEN"
POLL_S = 0.2
SWEEP_S = 5.0  # after the run is gone, keep sweeping this long: a process may be starting a child


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent's wait() is left


def marked(token: str, *, skip: int | None = None) -> list[int]:
    """The processes whose environment holds ``ENV_KEY=token``."""
    needle = f"{ENV_KEY}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (os.getpid(), skip):
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or another user's
            continue
    return found


def watch(pid: int, token: str) -> None:
    while _alive(pid):
        time.sleep(POLL_S)
    deadline = time.monotonic() + SWEEP_S
    while time.monotonic() < deadline:
        for victim in marked(token):
            try:
                os.kill(victim, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(POLL_S)


class Reaper:
    """Marks this process's environment (what it starts from now on inherits the token) and starts the
    watchdog; ``stop`` ends both (the run finished and cleaned up itself)."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        self.process: subprocess.Popen | None = None
        self._previous = os.environ.get(ENV_KEY)

    def start(self) -> "Reaper":
        if not Path("/proc/self/environ").exists():
            return self
        os.environ[ENV_KEY] = self.token
        env = {k: v for k, v in os.environ.items() if k != ENV_KEY}  # the watchdog must not match itself
        # its own session: a signal to the run's process group (Ctrl-C, a job manager) does not reach it
        self.process = subprocess.Popen([sys.executable, __file__, str(os.getpid()), self.token],
                                        env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def stop(self) -> None:
        if self._previous is None:
            os.environ.pop(ENV_KEY, None)
        else:
            os.environ[ENV_KEY] = self._previous
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def __enter__(self) -> "Reaper":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
