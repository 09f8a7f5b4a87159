"""The boundary around submitted code: bubblewrap (``bwrap``, Debian's ``bubblewrap``), the
unprivileged sandbox Flatpak uses, rather than a hand-written one.

The child runs in new namespaces (user, mount, network, pid, ipc, uts, cgroup) with no capabilities,
dies with its parent, and sees a root filesystem that holds only what it needs to run Python and torch:
``/usr`` (with the ``/lib``, ``/lib64`` and ``/bin`` links), the dynamic linker's cache, the Python
installation and its site-packages, leakbench's own package folders, ``PYTHONPATH`` entries (installed
plugins), the submitted file itself, a private ``/dev`` and ``/proc``, and one writable folder of its
own. Everything is read-only but that folder. There is no network at all (only a private loopback), and
nothing of the host's home, the project, the data or other users' files exists inside.
"""
from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from .. import attacks as attack_plugins
from .. import configs as shipped_configs
from .. import defenses as defense_plugins
from ..errors import ConfigError

INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap), or pass --trust-code to run "
                "the submission unconfined (only for code you trust)")


@functools.lru_cache(maxsize=1)
def bwrap_problem() -> str | None:
    """None when bwrap is installed and can create its namespaces here, else why not (one line)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed"
    probe = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-all", "--unshare-user",
             "--die-with-parent", "--cap-drop", "ALL", "true"]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap cannot start here ({exc})"
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0]
        return f"bubblewrap cannot create its sandbox here ({first})"
    return None


def require_bwrap() -> None:
    """A one-line ConfigError when submitted code cannot be confined here."""
    problem = bwrap_problem()
    if problem is not None:
        raise ConfigError(f"the submission sandbox needs bubblewrap: {problem}; {INSTALL_HINT}")


def _readable_roots(extra: list[Path]) -> list[Path]:
    """What the child may read: the interpreter and its libraries, leakbench's own package folders (an
    editable install maps them to source folders, not site-packages), and ``extra``. Not ``sys.path`` as
    a whole: it can hold the working folder or the project's root."""
    roots = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent.parent,
             Path(__file__).resolve().parents[1]}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        roots.add(Path(sysconfig.get_paths()[key]))
    for package in (attack_plugins, defense_plugins, shipped_configs):
        roots.update(Path(p) for p in package.__path__)
    roots.update(extra)
    usr = Path("/usr")
    kept = sorted({r.resolve() for r in roots if r.exists()} - {Path("/")})
    # /usr is bound whole; drop roots inside another kept root
    out = []
    for root in kept:
        if root == usr or usr in root.parents or any(k in root.parents for k in kept if k != root):
            continue
        out.append(root)
    return out


def confine(argv: list[str], *, workdir: Path, readable_files: list[Path], env: dict[str, str]) -> list[str]:
    """``argv`` wrapped in bwrap: read-only system and Python, ``workdir`` the only writable folder (also the
    working directory and TMPDIR), no network, a private /dev and /proc, no capabilities, ``env`` only
    (its ``PYTHONPATH`` entries are readable, for installed plugins), as the user nobody."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise ConfigError(f"the submission sandbox needs bubblewrap: bubblewrap (bwrap) is not installed; "
                          f"{INSTALL_HINT}")
    command = [bwrap, "--ro-bind", "/usr", "/usr"]
    for name in ("lib", "lib64", "bin", "sbin"):
        path = Path("/") / name
        if path.is_symlink():
            command += ["--symlink", str(path.readlink()), str(path)]
        elif path.is_dir():
            command += ["--ro-bind", str(path), str(path)]
    if Path("/etc/ld.so.cache").exists():
        command += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    plugins = [Path(p) for p in env.get("PYTHONPATH", "").split(":") if p]
    for root in _readable_roots([Path(f).resolve() for f in [*readable_files, *plugins]]):
        command += ["--ro-bind", str(root), str(root)]
    command += ["--bind", str(workdir), str(workdir), "--dev", "/dev", "--proc", "/proc",
                "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534",  # nobody, in its namespaces
                "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--remount-ro", "/",
                "--chdir", str(workdir), "--clearenv"]
    for key, value in {**env, "TMPDIR": str(workdir), "HOME": str(workdir)}.items():
        command += ["--setenv", key, value]
    return command + ["--", *argv]
