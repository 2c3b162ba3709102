"""Keeping a child process from outliving its parent, where no PID namespace does it.

- `die_with_parent()`: a `preexec_fn` that asks Linux to SIGKILL the child when this
  process dies (PR_SET_PDEATHSIG), even by SIGKILL; used for the private nats-server of
  `nightshift up` and for every trainer and prepare.py.
- `kill_descendants(token)`: SIGKILL every process whose environment carries a run's token,
  which its descendants inherit, also those that left its process group (setsid).
- `stop_all(procs, timeout_s)`: SIGTERM a set of service processes, then wait for them.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

RUN_TOKEN_VAR = "NIGHTSHIFT_RUN_TOKEN"  # marks a run's processes (found by kill_descendants)
_PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return fn


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A `preexec_fn` that has the child receive `sig` when this process dies (Linux;
    None elsewhere). Built here, before the fork: the child only makes the call."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the call: die now
            os._exit(1)

    return preexec


def kill_descendants(token: str) -> list[int]:
    """SIGKILL every process whose environment carries `RUN_TOKEN_VAR=token` (the run's
    processes, also those that left its process group); the pids killed. Best effort: a
    process that cleared its environment is not found."""
    needle = f"{RUN_TOKEN_VAR}={token}".encode()
    killed: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


def popen_kwargs() -> dict[str, Any]:
    """What every trainer or prepare process is started with: its own process group, and
    death with its launcher where the platform allows."""
    return {"start_new_session": True, "preexec_fn": die_with_parent()}


def stop_all(procs: Iterable[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """SIGTERM every process still running, then wait for each (SIGKILL past `timeout_s`)."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
