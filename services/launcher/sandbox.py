"""Where a trainer runs: inside bubblewrap (`bwrap`) when it can, else as a plain process.

The code a run executes was written by a language model. With bubblewrap a run sees:
- a private PID namespace that dies with its launcher (`--unshare-pid --die-with-parent`):
  no descendant outlives the run, whatever it does with signals or sessions;
- the system (`/usr`, `/etc`, ...) and the Python installation read-only, plus the
  read-only paths it is given (the prepared data cache);
- its own `/proc` (no other process's environment), a minimal `/dev` with only the GPUs
  it was given (gpus.py), a private `/tmp`;
- its run directory as the only writable place: no user home, no campaign home, no
  ledger, no NATS store, no credential file (none of them is mounted at all);
- no network unless allowed.

Without bubblewrap (`sandbox = none`, or `auto` where it does not work) a run is a process
group of the launcher's user: services/process_lifetime.py keeps what can be kept of its
lifetime; nothing keeps it from reading or writing what that user can.
"""

from __future__ import annotations

import functools
import os
import shutil
import site
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.launcher.gpus import Gpu, driver_gpus, gpu_access
from services.settings import SandboxMode, SettingsError
from services.telemetry import get_logger

SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt")


class SandboxError(SettingsError):
    """`sandbox = bwrap` was asked for and bubblewrap does not work here."""


@dataclass(frozen=True)
class RunMounts:
    """What one run may see besides the system: its run directory (the only writable
    place) with `frozen` paths in it read-only (its copy of the harness), other read-only
    paths, `hidden` ones (secrets, the ledger) masked wherever they lie in what is
    mounted, and the GPU device ids it was given ([] with `all_gpus`)."""

    run_dir: Path
    read_only: Sequence[Path] = ()
    gpus: Sequence[str] = ()
    all_gpus: bool = False
    network: bool = False
    frozen: Sequence[Path] = ()
    hidden: Sequence[Path] = ()


@dataclass(frozen=True)
class Bubblewrap:
    """Builds the `bwrap` command line of one run."""

    binary: str
    python_dirs: Sequence[Path] = field(default_factory=lambda: python_dirs())
    gpu_table: Sequence[Gpu] = field(default_factory=lambda: driver_gpus())

    def wrap(self, argv: Sequence[str], mounts: RunMounts) -> list[str]:
        cmd = [self.binary, "--unshare-pid", "--die-with-parent", "--unshare-ipc"]
        if not mounts.network:
            cmd.append("--unshare-net")
        cmd += system_binds()
        cmd += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        readable = [p for p in [*self.python_dirs, *mounts.read_only] if p.exists()]
        for path in readable:
            cmd += ["--ro-bind", str(path), str(path)]
        hidden_dirs = [p.resolve() for p in mounts.hidden if p.is_dir()]
        cmd += mask(mounts.hidden)
        for path in readable:  # what may be read inside a hidden directory comes back
            if any(path.resolve().is_relative_to(d) for d in hidden_dirs):
                cmd += ["--ro-bind", str(path), str(path)]
        run_dir = str(mounts.run_dir.resolve())
        cmd += ["--bind", run_dir, run_dir]
        for path in mounts.frozen:  # after the run directory, which they lie in
            cmd += ["--ro-bind", str(path.resolve()), str(path.resolve())]
        gpus = gpu_access(mounts.gpus, mounts.all_gpus, self.gpu_table)
        for device in gpus.devices:
            cmd += ["--dev-bind", device, device]
        if gpus.visible is not None:
            cmd += ["--setenv", "CUDA_VISIBLE_DEVICES", gpus.visible]
        for hidden_dir in hidden_dirs:  # read-only once the mounts inside them are made
            cmd += ["--remount-ro", str(hidden_dir)]
        cmd += ["--remount-ro", "/", "--chdir", run_dir, "--", *argv]
        return cmd


def mask(paths: Sequence[Path]) -> list[str]:
    """Hide each existing path (a credentials file under /etc, a ledger under a read-only
    path): a file behind /dev/null, a directory behind an empty tmpfs (made read-only at
    the end). Paths that are not mounted anyway cost a harmless mount each."""
    out: list[str] = []
    for path in paths:
        real = path.resolve()
        if real.is_dir():
            out += ["--tmpfs", str(real)]
        elif real.exists():
            out += ["--ro-bind", "/dev/null", str(real)]
    return out


def system_binds() -> list[str]:
    """Read-only binds of the system directories (merged-/usr symlinks kept as links)."""
    out: list[str] = []
    for name in SYSTEM_DIRS:
        path = Path(name)
        if path.is_symlink():
            out += ["--symlink", os.readlink(path), name]
        elif path.is_dir():
            out += ["--ro-bind", name, name]
    return out


def python_dirs() -> list[Path]:
    """The interpreter's installation: the venv, its base, the real executable's directory
    and the user's site-packages."""
    dirs = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix)}
    dirs.add(Path(os.path.realpath(sys.executable)).parent)
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.add(Path(site.getusersitepackages()))  # `pip install --user`: only that directory
    covered = [Path(d) for d in SYSTEM_DIRS]
    out: list[Path] = []
    for d in sorted(dirs):  # a parent sorts before its children
        if not any(d.is_relative_to(c) for c in [*covered, *out]):
            out.append(d)
    return out


@functools.cache
def bubblewrap_problem(binary: str) -> str:
    """'' when `binary` can build a sandbox here; else what went wrong (cached)."""
    probe = Bubblewrap(binary).wrap(["true"], RunMounts(run_dir=Path("/tmp")))
    try:
        done = subprocess.run(probe, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{binary} could not run: {exc}"
    if done.returncode != 0:
        return f"{binary} failed (exit {done.returncode}): {done.stderr.decode().strip()[:300]}"
    return ""


def resolve_sandbox(mode: SandboxMode) -> Bubblewrap | None:
    """The sandbox runs use under `mode`; None for plain processes. `auto` says loudly,
    once per process, when it falls back; `bwrap` raises SandboxError instead."""
    if mode == "none":
        return None
    binary = shutil.which("bwrap")
    problem = bubblewrap_problem(binary) if binary else "bwrap is not installed"
    if not problem:
        assert binary is not None
        return Bubblewrap(binary)
    fix = "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap) or set sandbox = none"
    if mode == "bwrap":
        raise SandboxError(f"sandbox = bwrap, but {problem}; {fix}")
    _warn_unsandboxed(problem, fix)
    return None


@functools.cache
def _warn_unsandboxed(problem: str, fix: str) -> None:
    get_logger(component="launcher.sandbox").warning(
        "runs_not_sandboxed",
        problem=problem,
        risk="trainer code runs with this user's rights: it can read keys and write the ledger",
        fix=fix,
    )
