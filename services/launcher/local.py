"""The `local` backend: one subprocess per slot on this machine.

Each run is `python <edit_file>` in its own run directory (a copy of the harness plus the
variant's source), inside the sandbox (sandbox.py: bubblewrap, when it works) and its own
process group, with a hard timeout that kills the whole run, secrets scrubbed from its
environment, and stdout+stderr merged into `run.log` through output.py (capped, throttled,
secrets redacted). A slot is a GPU (CUDA_VISIBLE_DEVICES) when `gpus` lists any, else a
CPU slot.

The run's output goes through a pipe this process owns, not asyncio's: the run is over
when its leader exits, even while a stray child still holds the pipe (it is killed then).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import fnmatch
import os
import secrets
import shutil
import signal
import site
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.contracts import (
    BUDGET_OVERRIDE,
    cancelled_line,
    harness_budget,
    infra_failure_line,
    timed_out_line,
)
from services.launcher.backend import (
    FixedSlots,
    Job,
    LineCallback,
    RunOutcome,
    log_tail,
    scrubbed_env,
)
from services.launcher.output import CappedLog, OutputLimits, pump, redact_file, redact_text
from services.launcher.sandbox import Bubblewrap, RunMounts
from services.process_lifetime import RUN_TOKEN_VAR, kill_descendants, popen_kwargs
from services.telemetry import get_logger


def _log() -> Any:
    """Asked for at use time: a logger bound at import would miss the service's configuration."""
    return get_logger(component="launcher.local")


PREPARED_MARKER = ".nightshift-prepared"
PREPARE_TIMEOUT_S = 3600.0
DRAIN_TIMEOUT_S = 5.0
NOT_COPIED = (PREPARED_MARKER, ".prepare.*")  # the harness's own bookkeeping


def _copied(name: str) -> bool:
    return not any(fnmatch.fnmatch(name, pattern) for pattern in NOT_COPIED)


class LocalBackend(FixedSlots):
    name = "local"
    reports_placement = False

    def __init__(
        self,
        runs_path: Path,
        gpus: str = "",
        slots: int = 1,
        grace_s: float = 5.0,
        prepare_timeout_s: float = PREPARE_TIMEOUT_S,
        *,
        sandbox: Bubblewrap | None = None,
        read_only: Sequence[Path] = (),
        data_cache: Path | None = None,
        hidden: Sequence[Path] = (),
        network: bool = False,
        limits: OutputLimits = OutputLimits(),  # noqa: B008 (frozen)
    ) -> None:
        self.runs_path = Path(runs_path)
        self.gpus = [g.strip() for g in gpus.split(",") if g.strip()]
        self._slots = len(self.gpus) if self.gpus else max(1, slots)
        self.grace_s = grace_s
        self.prepare_timeout_s = prepare_timeout_s
        self.sandbox = sandbox
        self.read_only = [Path(p) for p in read_only]
        self.data_cache = data_cache
        self.hidden = [Path(p) for p in hidden]
        self.network = network
        self.limits = limits
        self.host = socket.gethostname()
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._active: set[str] = set()
        self._cancelled: dict[str, str] = {}
        self._prepare_locks: dict[Path, asyncio.Lock] = {}

    def placement(self, slot: int) -> tuple[str, str]:
        if self.gpus:
            return self.host, f"cuda:{self.gpus[slot % len(self.gpus)]}"
        return self.host, "cpu"

    def _env(self, job: Job) -> dict[str, str]:
        env = scrubbed_env(job.profile)
        if self.gpus:  # one GPU per slot; without a list the runs see what we see
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[job.slot % len(self.gpus)]
        # Replica 0 runs the source's own SEED; replica k > 0 another seed (train.py reads it).
        env.pop("NIGHTSHIFT_SEED", None)
        if job.replica > 0:
            env["NIGHTSHIFT_SEED"] = str(job.replica)
        if self.sandbox is not None:
            env["HOME"] = "/tmp"  # the user's home is not in the sandbox
            env["TMPDIR"] = "/tmp"
            env["PYTHONUSERBASE"] = site.getuserbase()  # the user site stays where it was
            if self.data_cache is not None:  # found where prepare.py put it, read-only
                env["NIGHTSHIFT_CACHE"] = str(self.data_cache)
        return env

    def _budget(self, job: Job) -> float:
        """The training seconds the harness gives this run (the evaluator rejects a claim
        far below it); 0 when the harness does not say."""
        try:
            source = (job.harness_dir / "prepare.py").read_text()
        except OSError:
            return 0.0
        # The run inherits the override from our environment (scrubbed_env keeps it).
        return harness_budget(source, job.profile, os.environ.get(BUDGET_OVERRIDE))

    def _argv(self, job: Job, run_dir: Path) -> list[str]:
        argv = [sys.executable, job.edit_file]
        if self.sandbox is None:
            return argv
        gpus = [self.gpus[job.slot % len(self.gpus)]] if self.gpus else []
        read_only = [*self.read_only, *([self.data_cache] if self.data_cache else [])]
        # The run's copy of the harness is read-only too: only what the run creates is its.
        harness = [run_dir / p.name for p in job.harness_dir.iterdir() if _copied(p.name)]
        frozen = [p for p in harness if p.name != job.edit_file]
        mounts = RunMounts(
            run_dir, read_only, gpus, not self.gpus, self.network, frozen, self.hidden
        )
        return self.sandbox.wrap(argv, mounts)

    async def run(self, job: Job, on_line: LineCallback) -> RunOutcome:
        self._active.add(job.run_id)
        try:
            return await self._run(job, on_line)
        finally:
            self._active.discard(job.run_id)
            self._cancelled.pop(job.run_id, None)

    async def _run(self, job: Job, on_line: LineCallback) -> RunOutcome:
        started = time.time()
        outcome = RunOutcome(None, started, started, budget_s=self._budget(job))
        run_dir = self.runs_path / job.campaign / job.run_id
        try:
            failure = await self.prepare(job.harness_dir, job.profile)
            if failure:
                return self._infra(outcome, redact_text(failure, self.limits.secrets))
            log_path = self._make_run_dir(job, run_dir)
        except OSError as exc:
            return self._infra(outcome, f"cannot set up the run directory {run_dir}: {exc}")
        outcome.log_path = log_path
        if job.run_id not in self._cancelled:  # else it was cancelled while preparing
            started_ok = await self._start_and_supervise(job, run_dir, log_path, on_line, outcome)
            if not started_ok:
                return outcome
        reason = self._cancelled.pop(job.run_id, None)
        if reason is not None:
            outcome.cancelled = True
            self._append(log_path, cancelled_line(reason))
        elif outcome.timed_out:
            self._append(log_path, timed_out_line(job.timeout_s))
        redact_file(log_path, self.limits.secrets)
        outcome.finished_at = time.time()
        return outcome

    async def _start_and_supervise(
        self, job: Job, run_dir: Path, log_path: Path, on_line: LineCallback, outcome: RunOutcome
    ) -> bool:
        """Run the trainer to its end; False (an infra outcome) when it cannot start."""
        token = secrets.token_hex(12)
        env = self._env(job) | {RUN_TOKEN_VAR: token}
        argv = self._argv(job, run_dir)
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=run_dir,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd,
                stderr=write_fd,
                **popen_kwargs(),
            )
        except OSError as exc:
            os.close(read_fd)
            self._infra(outcome, f"cannot start {argv[0]} {job.edit_file}: {exc}")
            return False
        finally:
            os.close(write_fd)
        self._procs[job.run_id] = proc
        reader, transport = await _open_reader(read_fd)
        try:
            with log_path.open("ab") as sink:
                log = CappedLog(sink, self.limits.max_bytes)
                try:
                    await self._supervise(job, proc, token, reader, log, on_line, outcome)
                finally:
                    log.close()
        finally:
            transport.close()
            self._procs.pop(job.run_id, None)
        return True

    async def _supervise(
        self,
        job: Job,
        proc: asyncio.subprocess.Process,
        token: str,
        reader: asyncio.StreamReader,
        log: CappedLog,
        on_line: LineCallback,
        outcome: RunOutcome,
    ) -> None:
        pumping = asyncio.create_task(pump(reader, log, on_line, self.limits.rate_bytes_s))
        try:
            await asyncio.wait_for(proc.wait(), timeout=job.timeout_s)
        except TimeoutError:
            outcome.timed_out = True
            await self._kill_group(proc)
        except asyncio.CancelledError:
            await self._kill_group(proc)
            raise
        finally:
            # Whatever outlived the leader (dataloader workers, a stray `sleep`, a child in
            # its own session) dies now: its output pipe closes and the run is over.
            _kill_run(proc.pid, token)
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(pumping, timeout=DRAIN_TIMEOUT_S)
            pumping.cancel()
        outcome.exit_code = proc.returncode

    async def _kill_group(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM the process group, then SIGKILL it after the grace period."""
        _signal_group(proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), timeout=self.grace_s)
        _signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()

    async def cancel(self, run_id: str, reason: str = "") -> None:
        if run_id not in self._active:
            return
        self._cancelled[run_id] = reason
        proc = self._procs.get(run_id)
        if proc is not None:  # else it is preparing: it stops before it starts
            await self._kill_group(proc)

    def _make_run_dir(self, job: Job, run_dir: Path) -> Path:
        if not job.harness_dir.is_dir():
            raise OSError(f"harness directory {job.harness_dir} does not exist")
        if run_dir.exists():  # a redelivered run starts over
            shutil.rmtree(run_dir)
        shutil.copytree(job.harness_dir, run_dir, ignore=shutil.ignore_patterns(*NOT_COPIED))
        (run_dir / job.edit_file).write_text(job.source)
        log_path = run_dir / "run.log"
        log_path.write_bytes(b"")
        return log_path

    def _infra(self, outcome: RunOutcome, reason: str) -> RunOutcome:
        _log().warning("run_infra_failure", reason=reason)
        outcome.infra_failure = True
        outcome.infra_reason = reason
        outcome.finished_at = time.time()
        if outcome.log_path is None:
            outcome.log_text = infra_failure_line(reason) + "\n"
        return outcome

    @staticmethod
    def _append(path: Path, line: str) -> None:
        with path.open("a") as fh:
            fh.write(f"\n{line}\n")

    # --- prepare ------------------------------------------------------------------------

    async def prepare(self, harness_dir: Path, profile: str) -> str:
        """Run the harness's prepare.py once per harness directory; '' or why it failed."""
        script = harness_dir / "prepare.py"
        marker = harness_dir / PREPARED_MARKER
        if not script.is_file() or marker.exists():
            return ""
        lock = self._prepare_locks.setdefault(harness_dir, asyncio.Lock())
        async with lock:
            lock_file = (harness_dir / ".prepare.lock").open("a")
            try:
                # Another launcher process on this machine may be preparing the same harness.
                await asyncio.to_thread(fcntl.flock, lock_file, fcntl.LOCK_EX)
                if marker.exists():
                    return ""
                return await self._run_prepare(harness_dir, profile, marker)
            finally:
                lock_file.close()  # releases the flock

    async def _run_prepare(self, harness_dir: Path, profile: str, marker: Path) -> str:
        log_path = harness_dir / ".prepare.log"
        _log().info("prepare_started", harness=str(harness_dir))
        with log_path.open("wb") as sink:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "prepare.py",
                cwd=harness_dir,
                env=scrubbed_env(profile),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=sink,
                stderr=asyncio.subprocess.STDOUT,
                **popen_kwargs(),
            )
            try:
                await asyncio.wait_for(proc.wait(), timeout=self.prepare_timeout_s)
            except TimeoutError:
                await self._kill_group(proc)
                return f"prepare.py timed out after {self.prepare_timeout_s:.0f}s in {harness_dir}"
            except asyncio.CancelledError:
                await self._kill_group(proc)
                raise
        if proc.returncode != 0:
            tail = log_tail(log_path.read_text(errors="replace"), 20)
            return f"prepare.py failed (exit {proc.returncode}) in {harness_dir}:\n{tail}"
        _write_marker(marker)
        _log().info("prepare_finished", harness=str(harness_dir))
        return ""


def _write_marker(marker: Path) -> None:
    marker.write_text(f"{time.time()}\n")


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _kill_run(pgid: int, token: str) -> None:
    """SIGKILL the run's process group and every process that carries its token."""
    _signal_group(pgid, signal.SIGKILL)
    killed = kill_descendants(token)
    if killed:
        _log().info("run_descendants_killed", pids=killed)


async def _open_reader(read_fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    """A StreamReader on our end of the run's output pipe; closing the transport closes it."""
    reader = asyncio.StreamReader(limit=65536)
    pipe = os.fdopen(read_fd, "rb", buffering=0)
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), pipe
    )
    return reader, transport
