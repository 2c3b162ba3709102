"""A fake of SkyPilot's managed jobs on a pool (the PoolAdapter calls), over FakeSky.

`pool_apply` launches `workers` worker clusters `<pool>-<k>` through FakeSky (each runs
the task's setup, as a pool worker does) and relaunches them when the task changes. A
managed job waits PENDING for an idle ready worker (one job per worker), goes STARTING,
then `exec`s its run command there (FakeSky's exec: real bash) and is RUNNING. If its worker
vanishes (`FakeSky.preempt`), the job is RECOVERING: the pool launches the worker again and
the job runs from its beginning on the next idle worker, its `recovery_count` one higher, as
SkyPilot's jobs controller does. A worker whose setup fails is launched again. Every call
waits its latency (ESTIMATED_LATENCY_S, not published: managed jobs go through a controller)
and counts itself in `FakeSky.calls`; `fail_next` and `api_down` script failures as there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from services.launcher.skypilot_adapter import (
    MANAGED_TERMINAL,
    TERMINAL,
    ClusterGone,
    ManagedJob,
    ManagedStatus,
    SkyError,
    TaskConfig,
)
from services.launcher.skypilot_fake import FakeJob, FakeSky, follow

# Our estimates (SkyPilot publishes none per call): a request through the API server to the
# jobs controller; managed jobs were >20 s apart when 1,000 were submitted (issue 4294).
ESTIMATED_LATENCY_S: dict[str, float] = {
    "pool_apply": 10.0,
    "jobs_launch": 5.0,
    "jobs_status": 0.5,
    "jobs_tail_logs": 1.0,
    "jobs_cancel": 1.0,
    "pool_down": 10.0,
}


@dataclass
class ManagedRecord:
    job_id: int
    task: TaskConfig
    pool: str
    status: ManagedStatus = "PENDING"
    recovery_count: int = 0
    worker: str = ""
    cluster_job: FakeJob | None = None
    lines: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Worker:
    name: str
    ready: bool = False
    job: int | None = None  # the managed job it runs


class FakePool:
    def __init__(self, sky: FakeSky) -> None:
        self.sky = sky
        self.sky.latency_s = {**ESTIMATED_LATENCY_S, **sky.latency_s}
        self.workers: dict[str, list[Worker]] = {}  # pool -> its workers
        self.tasks: dict[str, TaskConfig] = {}  # pool -> its task
        self.jobs: dict[int, ManagedRecord] = {}
        self._next_id = 0
        self._freed = asyncio.Event()

    # --- the PoolAdapter calls -----------------------------------------------------------

    async def pool_apply(self, task: TaskConfig, pool: str) -> None:
        await self.sky._enter("pool_apply")
        if self.tasks.get(pool) == task:
            return
        self.tasks[pool] = task
        for worker in self.workers.pop(pool, []):  # a new task: new workers
            with contextlib.suppress(SkyError):
                await self.sky.down(worker.name)
        count = int(task["pool"]["workers"])
        self.workers[pool] = [Worker(f"{pool}-{k}") for k in range(count)]
        for worker in self.workers[pool]:
            self.sky._spawn(self._provision(pool, worker))

    async def jobs_launch(self, task: TaskConfig, pool: str, name: str) -> int:
        await self.sky._enter("jobs_launch")
        if pool not in self.workers:
            raise SkyError(f"PoolDoesNotExistError: pool {pool!r} does not exist")
        self._next_id += 1
        record = ManagedRecord(self._next_id, {**task, "name": name}, pool)
        self.jobs[record.job_id] = record
        self.sky._spawn(self._manage(record))
        return record.job_id

    async def jobs_status(self, job_id: int) -> ManagedJob | None:
        await self.sky._enter("jobs_status")
        record = self.jobs.get(job_id)
        return None if record is None else ManagedJob(record.status, record.recovery_count)

    async def jobs_tail_logs(self, job_id: int) -> AsyncIterator[str]:
        await self.sky._enter("jobs_tail_logs")
        record = self.jobs.get(job_id)
        if record is None:
            return
        async for line in follow(
            record.lines, record.changed, lambda: record.status in MANAGED_TERMINAL
        ):
            yield line

    async def jobs_cancel(self, job_id: int) -> None:
        await self.sky._enter("jobs_cancel")
        record = self.jobs.get(job_id)
        if record is None or record.status in MANAGED_TERMINAL:
            return
        self._end(record, "CANCELLED")
        cluster = self.sky.clusters_by_name.get(record.worker)
        if record.cluster_job is not None and cluster is not None:
            await self.sky.cancel(record.worker, record.cluster_job.job_id)

    async def pool_down(self, pool: str) -> None:
        await self.sky._enter("pool_down")
        if pool not in self.workers:
            raise ClusterGone(f"ClusterNotUpError: pool {pool!r} does not exist")
        for record in self.jobs.values():
            if record.pool == pool and record.status not in MANAGED_TERMINAL:
                self._end(record, "CANCELLED")
        for worker in self.workers.pop(pool):
            with contextlib.suppress(SkyError):
                await self.sky.down(worker.name)
        self.tasks.pop(pool, None)

    # --- the controller's side -----------------------------------------------------------

    async def _provision(self, pool: str, worker: Worker) -> None:
        """Launch the worker and run its setup; again until it succeeds (as a pool does)."""
        task = {k: v for k, v in self.tasks[pool].items() if k != "pool"}
        while worker in self.workers.get(pool, []):
            try:
                setup_job = await self.sky.launch(task, worker.name, -1)
            except SkyError:  # scripted launch failures: the pool tries again
                await asyncio.sleep(0.05)
                continue
            cluster = self.sky.clusters_by_name[worker.name]
            job = cluster.jobs.get(setup_job) if setup_job is not None else None
            while job is not None and job.status not in TERMINAL:
                await job.changed.wait()
                job.changed.clear()
            if job is None or job.status == "SUCCEEDED":
                worker.ready = True
                self._freed.set()
                return
            with contextlib.suppress(SkyError):
                await self.sky.down(worker.name)

    async def _manage(self, record: ManagedRecord) -> None:
        """Place the job on an idle worker, run it, recover it when its worker vanishes."""
        while record.status not in MANAGED_TERMINAL:
            worker = await self._idle_worker(record)
            if worker is None:
                return
            worker.job, record.worker, record.status = record.job_id, worker.name, "STARTING"
            try:
                cluster_job = await self._run_on(record, worker)
            finally:
                worker.job = None
                self._freed.set()
            if cluster_job is None:  # the worker vanished: recover on another (or this one, anew)
                if record.status in MANAGED_TERMINAL:
                    return
                record.status, record.recovery_count = "RECOVERING", record.recovery_count + 1
                worker.ready = False
                if worker in self.workers.get(record.pool, []):
                    self.sky._spawn(self._provision(record.pool, worker))
                continue
            if record.status not in MANAGED_TERMINAL:
                self._end(record, _managed(cluster_job.status))

    async def _idle_worker(self, record: ManagedRecord) -> Worker | None:
        while record.status not in MANAGED_TERMINAL:
            for worker in self.workers.get(record.pool, []):
                alive = worker.name in self.sky.clusters_by_name
                if worker.ready and worker.job is None and alive:
                    return worker
            self._freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), 0.05)
        return None

    async def _run_on(self, record: ManagedRecord, worker: Worker) -> FakeJob | None:
        """The job's run on one worker, its lines copied as they come; None: worker gone."""
        try:
            job_id = await self.sky.exec(record.task, worker.name)
        except ClusterGone:
            return None
        cluster = self.sky.clusters_by_name.get(worker.name)
        if cluster is None:
            return None
        job = record.cluster_job = cluster.jobs[job_id]
        record.status = "RUNNING"
        sent = 0
        while True:
            while sent < len(job.lines):
                record.lines.append(job.lines[sent])
                sent += 1
            record.changed.set()
            if self.sky.clusters_by_name.get(worker.name) is not cluster:
                return None
            if job.status in TERMINAL:
                return job
            await asyncio.sleep(0.01)

    @staticmethod
    def _end(record: ManagedRecord, status: ManagedStatus) -> None:
        record.status = status
        record.changed.set()


def _managed(status: str) -> ManagedStatus:
    """A cluster job's final status as the managed job's."""
    if status in ("SUCCEEDED", "FAILED", "FAILED_SETUP", "CANCELLED"):
        return status  # type: ignore[return-value]
    return "FAILED_CONTROLLER"
