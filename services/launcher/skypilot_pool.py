"""The `skypilot` backend's pool mode: each run a SkyPilot managed job on a pool of workers.

A tier with `mode = "pool"` is a SkyPilot pool `<prefix>-<tier>` of `clusters` workers
(`sky.jobs.pool_apply`, applied lazily by the first run and again when the campaign's
harness changes: the template's setup installs the requirements and runs prepare.py once
per worker). A run is `sky.jobs.launch(task, pool=...)`: the variant's file travels inside
the run command (a pool job may carry no workdir) and is written to the run's own
directory on the worker. SkyPilot's jobs controller places it on an idle worker (one job per
worker), and when the worker is preempted it recovers the job on another and runs it again
from the start (RECOVERING): nightshift keeps following the same job. Its log is followed
with `sky.jobs.tail_logs`, its end read with `sky.jobs.queue`:

- SUCCEEDED / FAILED with the code the run script printed: train.py's own, to the evaluator;
- FAILED_SETUP, FAILED_PRECHECKS, FAILED_NO_RESOURCE, FAILED_CONTROLLER, CANCELLED by someone
  else, FAILED without a code, a job the controller no longer knows, an unreachable API
  server or jobs controller, a pool that cannot be applied: an infrastructure failure; the
  launcher queues the run again and it is never charged to the variant.

The run's timeout and GPU time start when the job is RUNNING (not while it waits for a
worker); a job that does not start within `start_timeout_s` is cancelled, as infra.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

from services.contracts import timed_out_line
from services.launcher import skypilot_runlog as rl
from services.launcher import skypilot_tiers as st
from services.launcher.backend import Job, LineCallback, RunOutcome
from services.launcher.skypilot_adapter import (
    MANAGED_TERMINAL,
    ClusterGone,
    ManagedJob,
    PoolAdapter,
    SkyError,
    TaskConfig,
)
from services.launcher.skypilot_runlog import RunFailed
from services.settings import SkyTier
from services.telemetry import get_logger

INFRA_STATUSES = {
    "FAILED_SETUP": "the pool worker's setup failed (or its pod died before the job began)",
    "FAILED_PRECHECKS": "SkyPilot's prechecks failed (no feasible resources, credentials)",
    "FAILED_NO_RESOURCE": "no capacity for the pool's resources",
    "FAILED_CONTROLLER": "SkyPilot's jobs controller failed",
    "CANCELLED": "the job was cancelled outside nightshift",
}
STARTED = frozenset({"RUNNING", "RECOVERING", "WINDING_DOWN"}) | MANAGED_TERMINAL


def _log() -> Any:
    return get_logger(component="launcher.skypilot")


@dataclass
class PoolRun:
    job_id: int | None = None
    cancel_reason: str | None = None
    gpu_from: float = 0.0


@dataclass
class SkyPoolBackend:
    """A tier's pool: `adapter` makes the calls, runs live under `runs_path`."""

    name = "skypilot"  # not fields (no annotation)
    reports_placement = True

    adapter: PoolAdapter
    tier: SkyTier
    template: TaskConfig
    runs_path: Path
    _: KW_ONLY
    prefix: str = "ns"
    poll_s: float = 5.0
    start_timeout_s: float = 1800.0  # a job not RUNNING by then is cancelled, as infra
    _harness: Path | None = field(default=None, init=False)  # the pool's workdir, once applied
    _applying: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    _active: dict[str, PoolRun] = field(default_factory=dict, init=False)
    _cancels: set[asyncio.Task[None]] = field(default_factory=set, init=False)

    @property
    def pool(self) -> str:
        return st.pool_name(self.prefix, self.tier)

    @property
    def gpus(self) -> int:
        return st.accelerator_parts(self.tier.accelerator)[1]

    @property
    def slots(self) -> int:
        return self.tier.clusters  # one job per worker

    @property
    def intake(self) -> int:
        return self.tier.clusters

    def placement(self, _slot: int) -> tuple[str, str]:
        return self.pool, self.tier.accelerator

    async def run(self, job: Job, on_line: LineCallback) -> RunOutcome:
        started = time.time()
        out = RunOutcome(None, started, started)
        active = self._active[job.run_id] = PoolRun()
        try:
            out.log_path = rl.make_run_dir(self.runs_path / job.campaign / job.run_id)
            if job.on_placed is not None:
                job.on_placed(*self.placement(job.slot))
            await self._run_job(job, active, out, on_line)
        except (RunFailed, SkyError, OSError) as exc:
            rl.mark_infra(out, job.run_id, str(exc), active.cancel_reason)
        except asyncio.CancelledError:  # our caller stops: the job must not hold its worker
            if active.job_id is not None:
                task = asyncio.get_running_loop().create_task(self._cancel_job(active.job_id))
                self._cancels.add(task)
                task.add_done_callback(self._cancels.discard)
            raise
        finally:
            self._active.pop(job.run_id, None)
        out.finished_at = time.time()
        return out

    async def _run_job(self, job: Job, active: PoolRun, out: RunOutcome, on_line: Any) -> None:
        await self._ensure_pool(job)
        task = st.pool_job_task(
            self.template, self.tier, run_id=job.run_id, edit_file=job.edit_file,
            source=job.source, profile=job.profile, replica=job.replica,
        )  # fmt: skip
        if active.cancel_reason is not None:
            return rl.mark_cancelled(out, active.cancel_reason)
        active.job_id = await self.adapter.jobs_launch(task, self.pool, job.run_id)
        _log().info("run_submitted", run_id=job.run_id, pool=self.pool, job_id=active.job_id)
        if active.cancel_reason is not None:  # cancelled while the launch was on its way
            await self._cancel_job(active.job_id)
        await self._await_start(active)
        active.gpu_from = time.time()
        try:
            final = await self._follow(job, active, out, on_line)
        finally:
            seconds = (time.time() - active.gpu_from) * self.gpus  # the job holds its worker
            out.gpu_seconds, out.gpu_usd = st.gpu_cost(self.tier, seconds)
        if out.timed_out:
            return rl.append(out, timed_out_line(job.timeout_s))
        if active.cancel_reason is not None:
            return rl.mark_cancelled(out, active.cancel_reason)
        why = dict(INFRA_STATUSES)
        if final.failure_reason:
            why[final.status] = f"{why.get(final.status, final.status)}: {final.failure_reason}"
        rl.exit_code_or_fail(out, final.status, f"managed job {active.job_id}", why)

    async def _ensure_pool(self, job: Job) -> None:
        """Apply the pool with this run's harness unless it already has it."""
        async with self._applying:
            if self._harness == job.harness_dir:
                return
            task = st.pool_task(self.template, self.tier, job.harness_dir, job.profile)
            _log().info("pool_applying", pool=self.pool, workers=self.tier.clusters)
            try:
                await self.adapter.pool_apply(task, self.pool)
            except SkyError as exc:
                raise RunFailed(f"pool {self.pool} could not be applied: {exc}") from exc
            self._harness = job.harness_dir

    async def _status(self, job_id: int) -> ManagedJob:
        try:
            found = await self.adapter.jobs_status(job_id)
        except ClusterGone as exc:  # SkyPilot: ClusterNotUpError, no jobs controller up
            raise RunFailed(f"the jobs controller is not up ({exc}); job {job_id} is lost") from exc
        if found is None:
            raise RunFailed(f"managed job {job_id} is unknown to the jobs controller")
        return found

    async def _await_start(self, active: PoolRun) -> None:
        """Wait (polling) until the job runs on a worker: its clock starts then."""
        assert active.job_id is not None
        deadline = time.time() + self.start_timeout_s
        while (await self._status(active.job_id)).status not in STARTED:
            if active.cancel_reason is not None:
                return
            if time.time() > deadline:
                await self._cancel_job(active.job_id)
                raise RunFailed(
                    f"managed job {active.job_id} did not start within {self.start_timeout_s:.0f}s "
                    f"(no ready worker in pool {self.pool})"
                )
            await asyncio.sleep(self.poll_s)

    async def _follow(self, job: Job, active: PoolRun, out: RunOutcome, on_line: Any) -> ManagedJob:
        """Stream the log until the job ends, again from where it was after a dropped
        stream or a recovery; its final status (CANCELLED once it timed out)."""
        assert active.job_id is not None
        job_id, seen, recoveries = active.job_id, 0, 0
        deadline = time.time() + job.timeout_s
        while True:
            try:
                stream = rl.stream_into(self.adapter.jobs_tail_logs(job_id), out, on_line, seen)
                seen = max(seen, await asyncio.wait_for(stream, deadline - time.time()))
            except TimeoutError:
                out.timed_out = True
                await self._cancel_job(job_id)
                return ManagedJob("CANCELLED")
            state = await self._status(job_id)
            if state.recovery_count > recoveries:
                recoveries = state.recovery_count
                _log().warning("run_recovering", run_id=job.run_id, job_id=job_id, times=recoveries)
            if state.status in MANAGED_TERMINAL:
                return state
            await asyncio.sleep(self.poll_s)

    async def cancel(self, run_id: str, reason: str = "") -> None:
        active = self._active.get(run_id)
        if active is None:
            return
        active.cancel_reason = reason
        if active.job_id is not None:
            await self._cancel_job(active.job_id)

    async def _cancel_job(self, job_id: int) -> None:
        try:
            await self.adapter.jobs_cancel(job_id)
        except SkyError as exc:
            _log().warning("job_cancel_failed", pool=self.pool, job_id=job_id, error=str(exc))

    async def down(self) -> list[str]:
        """Tear the pool down; its name, or nothing when it does not exist."""
        try:
            await self.adapter.pool_down(self.pool)
        except SkyError:
            return []
        self._harness = None
        return [self.pool]
