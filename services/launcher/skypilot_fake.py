"""A fake SkyPilot for tests and the benchmark: the SkyAdapter calls against local folders.

Each "cluster" is a folder holding `sky_workdir/`. `launch` adds the task's workdir to it
and runs the task's setup with bash as a job (detached, as SkyPilot does), once per launch; `exec` adds the workdir and queues
the run command, which really runs (bash, in `sky_workdir`, with the task's envs) as soon as
one of the cluster's GPUs is free; `tail_logs` follows its output; `job_status`, `cancel`,
`down` and `clusters` answer as SkyPilot's would. Every call first waits its latency
(`latency_s[call] * time_scale`) and counts itself, and can be scripted to fail:
`fail_next(call, error)`, `api_down` (every call raises ApiUnreachable), `preempt(cluster)`
(its jobs die, it vanishes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.launcher.skypilot_adapter import (
    TERMINAL,
    ApiUnreachable,
    ClusterGone,
    JobStatus,
    SkyError,
    TaskConfig,
)

# SkyPilot's published per-call latencies, in seconds: unmanaged jobs are scheduled 2-3 s
# apart (skypilot issue 4295); launch is minutes (a Kubernetes pod, more for a cloud VM).
PUBLISHED_LATENCY_S: dict[str, float] = {
    "launch": 120.0,
    "exec": 2.5,
    "tail_logs": 0.5,
    "job_status": 0.3,
    "cancel": 1.0,
    "down": 20.0,
    "clusters": 0.3,
}


@dataclass
class FakeJob:
    job_id: int
    task: TaskConfig
    status: JobStatus = "PENDING"
    lines: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0  # wall time its run command started and ended (0: not yet)
    ended_at: float = 0.0
    submitted_at: float = field(default_factory=time.time)


@dataclass
class FakeCluster:
    name: str
    root: Path
    gpus: int
    jobs: dict[int, FakeJob] = field(default_factory=dict)
    setups: int = 0
    autostop_minutes: int = -1
    running: int = 0
    max_running: int = 0
    freed: asyncio.Event = field(default_factory=asyncio.Event)  # a GPU was given back

    @property
    def workdir(self) -> Path:
        return self.root / "sky_workdir"


class FakeSky:
    def __init__(
        self, root: Path, time_scale: float = 0.0, latency_s: dict[str, float] | None = None
    ) -> None:
        self.root = Path(root)
        self.time_scale = time_scale
        self.latency_s = dict(PUBLISHED_LATENCY_S if latency_s is None else latency_s)
        self.clusters_by_name: dict[str, FakeCluster] = {}
        self.calls: Counter[str] = Counter()
        self.api_down = False
        self._failures: dict[str, list[SkyError]] = {}
        self._next_job = 0
        self._tasks: set[asyncio.Task[None]] = set()

    # --- scripting ----------------------------------------------------------------------

    def fail_next(self, call: str, error: SkyError, times: int = 1) -> None:
        self._failures.setdefault(call, []).extend([error] * times)

    async def preempt(self, name: str) -> None:
        """The cluster is taken away: its jobs die with it and it no longer exists."""
        cluster = self.clusters_by_name.pop(name, None)
        if cluster is not None:  # its jobs and its disk go with it, before anything else runs
            self._kill_all(cluster)
            shutil.rmtree(cluster.root, ignore_errors=True)

    async def _enter(self, call: str) -> None:
        self.calls[call] += 1
        await asyncio.sleep(self.latency_s.get(call, 0.0) * self.time_scale)
        if self.api_down:
            raise ApiUnreachable("Could not connect to SkyPilot API server (fake: api_down)")
        queued = self._failures.get(call)
        if queued:
            raise queued.pop(0)

    def _cluster(self, name: str) -> FakeCluster:
        found = self.clusters_by_name.get(name)
        if found is None:
            raise ClusterGone(f"ClusterDoesNotExist: Cluster {name!r} does not exist.")
        return found

    # --- the SkyAdapter calls -----------------------------------------------------------

    async def launch(self, task: TaskConfig, cluster: str, autostop_minutes: int) -> int | None:
        """As SkyPilot 0.14 does by default: the setup runs detached, as a job (its id)."""
        await self._enter("launch")
        accelerators = str(task.get("resources", {}).get("accelerators", "x:1"))
        gpus = int(accelerators.partition(":")[2] or 1)
        found = self.clusters_by_name.get(cluster)
        if found is None:
            found = FakeCluster(cluster, self.root / cluster, gpus)
            self.clusters_by_name[cluster] = found
        found.autostop_minutes = autostop_minutes
        self._sync(found, task)
        if not task.get("setup"):
            return None
        found.setups += 1
        return self._submit(found, {**task, "run": task["setup"]}, setup=True)

    async def exec(self, task: TaskConfig, cluster: str) -> int:
        await self._enter("exec")
        found = self._cluster(cluster)
        self._sync(found, task)
        return self._submit(found, task, setup=False)

    def _submit(self, cluster: FakeCluster, task: TaskConfig, *, setup: bool) -> int:
        self._next_job += 1
        job = FakeJob(self._next_job, task)
        cluster.jobs[job.job_id] = job
        self._spawn(self._run_job(cluster, job, setup=setup))
        return job.job_id

    async def tail_logs(self, cluster: str, job_id: int) -> AsyncIterator[str]:
        await self._enter("tail_logs")
        found = self._cluster(cluster)
        job = found.jobs.get(job_id)
        if job is None:
            return

        def ended() -> bool:
            if job.status in TERMINAL:
                return True
            if self.clusters_by_name.get(cluster) is not found:
                raise ClusterGone(f"ClusterNotUpError: cluster {cluster!r} is not up")
            return False

        async for line in follow(job.lines, job.changed, ended):
            yield line

    async def job_status(self, cluster: str, job_id: int) -> JobStatus | None:
        await self._enter("job_status")
        job = self._cluster(cluster).jobs.get(job_id)
        return None if job is None else job.status

    async def cancel(self, cluster: str, job_id: int) -> None:
        await self._enter("cancel")
        job = self._cluster(cluster).jobs.get(job_id)
        if job is not None and job.status not in TERMINAL:
            job.status = "CANCELLED"
            _kill(job)
            job.changed.set()

    async def down(self, cluster: str) -> None:
        await self._enter("down")
        found = self._cluster(cluster)
        del self.clusters_by_name[cluster]
        self._kill_all(found)
        shutil.rmtree(found.root, ignore_errors=True)

    async def clusters(self) -> list[str]:
        await self._enter("clusters")
        return sorted(self.clusters_by_name)

    # --- the cluster's side -------------------------------------------------------------

    def _sync(self, cluster: FakeCluster, task: TaskConfig) -> None:
        """Workdir sync as SkyPilot's rsync does it: files are added, none removed."""
        cluster.workdir.mkdir(parents=True, exist_ok=True)
        if task.get("workdir"):
            shutil.copytree(task["workdir"], cluster.workdir, dirs_exist_ok=True)

    def _env(self, task: TaskConfig) -> dict[str, str]:
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(self.root)}
        env.update({k: str(v) for k, v in (task.get("envs") or {}).items()})
        return env

    async def _run_job(self, cluster: FakeCluster, job: FakeJob, *, setup: bool) -> None:
        """A setup job asks for no GPU; a run waits in the cluster's queue for one."""
        gpu = 0 if setup else 1
        while gpu and cluster.running >= cluster.gpus:  # queued in order, as SkyPilot's
            cluster.freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cluster.freed.wait(), 0.05)
            if job.status in TERMINAL or self.clusters_by_name.get(cluster.name) is not cluster:
                return
        cluster.running += gpu
        cluster.max_running = max(cluster.max_running, cluster.running)
        job.started_at = time.time()
        try:
            job.status = "SETTING_UP" if setup else "RUNNING"
            job.proc = await asyncio.create_subprocess_exec(
                "bash", "-c", str(job.task["run"]), cwd=cluster.workdir, env=self._env(job.task),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            assert job.proc.stdout is not None
            async for raw in job.proc.stdout:
                job.lines.append(raw.decode(errors="replace"))
                job.changed.set()
            code = await job.proc.wait()
            if job.status in ("RUNNING", "SETTING_UP"):
                failed: JobStatus = "FAILED_SETUP" if setup else "FAILED"
                job.status = "SUCCEEDED" if code == 0 else failed
        finally:
            job.ended_at = time.time()
            cluster.running -= gpu
            cluster.freed.set()
            job.changed.set()

    def _kill_all(self, cluster: FakeCluster) -> None:
        for job in cluster.jobs.values():
            _kill(job)
            job.changed.set()
        cluster.jobs.clear()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for cluster in list(self.clusters_by_name.values()):
            self._kill_all(cluster)
        if self._tasks:  # the killed jobs' tasks reap their processes
            await asyncio.wait(set(self._tasks), timeout=5.0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def follow(
    lines: list[str], changed: asyncio.Event, ended: Callable[[], bool]
) -> AsyncIterator[str]:
    """A job's output as it grows (`changed` set on each line), until `ended()`."""
    sent = 0
    while True:
        changed.clear()
        while sent < len(lines):
            yield lines[sent]
            sent += 1
        if ended():
            return
        await changed.wait()


def _kill(job: FakeJob) -> None:
    if job.proc is not None and job.proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(job.proc.pid, signal.SIGKILL)
