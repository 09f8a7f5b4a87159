"""The submission sandbox is a boundary: a submitted defense cannot reach the network, write outside its
own folder, or read the project's or the user's files. A probing defense reports what it could do through
its privacy claim (the one free-form answer the protocol asks of it); the same probe run unconfined
(``--trust-code``) is the control that shows each probe can succeed."""
from __future__ import annotations

import socket
import textwrap
import threading
from pathlib import Path

import pytest

from leakbench.errors import ConfigError
from leakbench.leaderboard.bubblewrap import bwrap_problem
from leakbench.leaderboard.sandbox import DefenseSource, SandboxLimits, submitted_defense

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(bwrap_problem() is not None, reason=f"no sandbox here: {bwrap_problem()}")

PROBE = '''
import os, socket
from pathlib import Path
from leakbench import Defense

def attempt(action):
    try:
        action()
        return "allowed"
    except Exception as exc:
        return f"denied: {type(exc).__name__}"

class Probe(Defense):
    def transform(self, update, *, generator=None):
        return [u.clone() for u in update]

    def privacy(self, *, steps, sample_rate):
        own = Path(os.getcwd()) / "scratch.txt"
        return {
            "connect_host_loopback": attempt(lambda: socket.create_connection(("127.0.0.1", PORT), timeout=3).close()),
            "connect_internet": attempt(lambda: socket.create_connection(("1.1.1.1", 53), timeout=3).close()),
            "write_own_folder": attempt(lambda: own.write_text("ok")),
            "write_outside": attempt(lambda: Path(OUTSIDE).write_text("escaped")),
            "write_system_tmp": attempt(lambda: Path("/tmp/leakbench-sandbox-escape.txt").write_text("escaped")),
            "read_project": attempt(lambda: Path(PROJECT).read_text()),
            "read_user_file": attempt(lambda: Path(SECRET).read_text()),
            "read_passwd": attempt(lambda: Path("/etc/passwd").read_text()),
        }
'''


@pytest.fixture()
def listener():
    """A TCP server on the host's loopback: reachable from the host (the control), not from the sandbox."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)
    accepted = []

    def serve():
        try:
            conn, _ = server.accept()
            accepted.append(True)
            conn.close()
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    server.close()


def probe(tmp_path: Path, port: int, *, trust_code: bool) -> dict:
    secret = tmp_path / "secret.txt"
    secret.write_text("the user's file")
    path = tmp_path / "probe.py"
    path.write_text(textwrap.dedent(PROBE).replace("PORT", str(port))
                    .replace("OUTSIDE", repr(str(tmp_path / "escaped.txt")))
                    .replace("PROJECT", repr(str(REPO / "README.md"))).replace("SECRET", repr(str(secret))))
    limits = SandboxLimits(timeout_s=60, memory_mb=4096, trust_code=trust_code)
    with submitted_defense(DefenseSource.parse(f"{path}:Probe"), {}, name="probe", limits=limits) as submitted:
        return submitted.privacy_claim(steps=1, sample_rate=0.1)


def test_a_submitted_defense_reaches_no_network_and_writes_and_reads_only_its_folder(tmp_path, listener):
    port, accepted = listener
    seen = probe(tmp_path, port, trust_code=False)
    assert seen["write_own_folder"] == "allowed"
    for what in ("connect_host_loopback", "connect_internet", "write_outside", "write_system_tmp",
                 "read_project", "read_user_file", "read_passwd"):
        assert seen[what].startswith("denied"), (what, seen[what])
    assert not (tmp_path / "escaped.txt").exists() and not accepted


def test_the_same_probe_unconfined_succeeds_so_the_denials_are_real(tmp_path, listener):
    port, accepted = listener
    seen = probe(tmp_path, port, trust_code=True)
    for what in ("connect_host_loopback", "write_own_folder", "write_outside", "read_project", "read_user_file"):
        assert seen[what] == "allowed", (what, seen[what])
    assert (tmp_path / "escaped.txt").read_text() == "escaped"
    Path("/tmp/leakbench-sandbox-escape.txt").unlink(missing_ok=True)


def test_without_bubblewrap_a_submission_is_refused_unless_trusted(tmp_path, monkeypatch):
    import leakbench.leaderboard.bubblewrap as bubblewrap

    monkeypatch.setattr(bubblewrap.shutil, "which", lambda name: None)
    bubblewrap.bwrap_problem.cache_clear()
    try:
        path = tmp_path / "d.py"
        path.write_text("from leakbench import Defense\nclass D(Defense):\n    pass\n")
        with pytest.raises(ConfigError, match=r"the submission sandbox needs bubblewrap: bubblewrap "
                                                             r"\(bwrap\) is not installed; install bubblewrap .* "
                                                             r"--trust-code"):
            with submitted_defense(DefenseSource.parse(f"{path}:D"), {}, name="d", limits=SandboxLimits()):
                pass
        with submitted_defense(DefenseSource.parse(f"{path}:D"), {}, name="d",
                               limits=SandboxLimits(trust_code=True)) as submitted:
            assert submitted.registry_name == "submitted:d"
    finally:
        bubblewrap.bwrap_problem.cache_clear()
