"""The `skypilot` backend: a tier's pool of SkyPilot clusters, one run per cluster GPU.

A cluster is provisioned lazily, by the first run that needs it (`sky.launch` of the
template: setup installs the requirements and runs prepare.py, once per cluster; SkyPilot
runs it detached, as a job, which is followed to its end before any run is submitted). A run is
a `sky.exec` of its own directory, its log followed with `sky.tail_logs` into `run.log` and
RunProgress, and its end read with `sky.job_status`:

- SUCCEEDED / FAILED: train.py's own exit code (the run script prints it), to the evaluator;
- FAILED_SETUP, FAILED_DRIVER, CANCELLED by someone else, a job or cluster that vanished
  (preempted, torn down), an unreachable API server, a failed launch: an infrastructure
  failure; the launcher re-queues the run with a delay and it is never charged to the variant.

A cluster whose launch fails is torn down and replaced after a delay (`cluster_replacing`);
until it is back, the tier's slots shrink by its GPUs. A stopped (autostopped) cluster is
relaunched by the next run that finds it down. Every run records its GPU-seconds and
dollars at the tier's price.

Pre-submission: the backend takes twice as many runs as the tier has GPUs. A run without a
free GPU waits until a running one is expected to end within `presubmit_s` (the recent runs'
durations), then `sky.exec`s behind it: SkyPilot's job queue starts it when the GPU frees,
hiding the exec's 2-3 s. Its timeout and GPU time start when the run ahead of it ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.contracts import split_lines, timed_out_line
from services.launcher import skypilot_runlog as rl
from services.launcher import skypilot_tiers as st
from services.launcher.backend import Job, LineCallback, RunOutcome
from services.launcher.skypilot_adapter import (
    TERMINAL,
    ApiUnreachable,
    ClusterGone,
    JobStatus,
    LaunchFailed,
    SkyAdapter,
    SkyError,
    TaskConfig,
)
from services.launcher.skypilot_runlog import RunFailed
from services.launcher.skypilot_teardown import down_clusters, pool_clusters
from services.settings import SkyTier
from services.telemetry import get_logger

ClusterState = Literal["absent", "launching", "up", "failed"]
INFRA_STATUSES = {
    "FAILED_SETUP": "the job's setup failed",
    "FAILED_DRIVER": "SkyPilot's job driver died",
    "CANCELLED": "the job was cancelled outside nightshift",
}


def _log() -> Any:
    return get_logger(component="launcher.skypilot")


@dataclass
class Cluster:
    name: str
    gpus: int
    state: ClusterState = "absent"
    busy: int = 0  # runs on it or queued on it: a GPU is free while busy < gpus
    harness: Path | None = None  # the workdir its setup ran with
    launched: asyncio.Event = field(default_factory=asyncio.Event)
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""


@dataclass
class ActiveRun:
    cluster: Cluster | None = None
    job_id: int | None = None
    cancel_reason: str | None = None
    gpu_from: float = 0.0  # when it got its GPU (0: not yet)
    ahead: ActiveRun | None = None  # the run it was submitted behind (pre-submission)
    follower: ActiveRun | None = None  # the run submitted behind it
    done: asyncio.Event = field(default_factory=asyncio.Event)  # its job no longer holds the GPU


class SkyPilotBackend:
    name = "skypilot"
    reports_placement = True

    def __init__(
        self,
        adapter: SkyAdapter,
        tier: SkyTier,
        template: TaskConfig,
        runs_path: Path,
        *,
        prefix: str = "ns",
        replace_delay_s: float = 60.0,
        poll_s: float = 5.0,
    ) -> None:
        self.adapter = adapter
        self.tier = tier
        self.template = template
        self.runs_path = Path(runs_path)
        self.replace_delay_s = replace_delay_s
        self.poll_s = poll_s
        _name, gpus = st.accelerator_parts(tier.accelerator)
        self.clusters = [Cluster(n, gpus) for n in st.cluster_names(prefix, tier)]
        self.prefix = prefix
        self._active: dict[str, ActiveRun] = {}
        self._changed = asyncio.Event()  # set when a GPU frees up or a run is cancelled
        self._background: set[asyncio.Task[None]] = set()
        self._durations: collections.deque[float] = collections.deque(maxlen=16)

    @property
    def slots(self) -> int:
        """GPUs of the clusters not being replaced: shrinks while one is, grows back after."""
        return sum(c.gpus for c in self.clusters if c.state != "failed")

    @property
    def intake(self) -> int:
        """A run per GPU, and one more per GPU to submit behind it when pre-submitting."""
        gpus = sum(c.gpus for c in self.clusters)
        return 2 * gpus if self.tier.presubmit_s > 0 else gpus

    def placement(self, slot: int) -> tuple[str, str]:
        return self._own_cluster(slot).name, self._accelerator()

    def _own_cluster(self, slot: int) -> Cluster:
        return self.clusters[(slot // self.clusters[0].gpus) % len(self.clusters)]

    def _accelerator(self) -> str:
        return f"{st.accelerator_parts(self.tier.accelerator)[0]}:1"

    # --- one run ----------------------------------------------------------------------

    async def run(self, job: Job, on_line: LineCallback) -> RunOutcome:
        started = time.time()
        outcome = RunOutcome(None, started, started)
        active = self._active[job.run_id] = ActiveRun()
        run_dir = self.runs_path / job.campaign / job.run_id
        try:
            outcome.log_path = rl.make_run_dir(run_dir)
            await self._run_on_cluster(job, active, run_dir, on_line, outcome)
        except ClusterGone as exc:  # preempted, torn down, stopped: the next run relaunches it
            if active.cluster is not None and active.cluster.state == "up":
                active.cluster.state, active.cluster.harness = "absent", None
            reason = f"cluster gone during the run: {exc}"
            rl.mark_infra(outcome, job.run_id, reason, active.cancel_reason)
        except (RunFailed, SkyError, OSError) as exc:
            rl.mark_infra(outcome, job.run_id, str(exc), active.cancel_reason)
        except asyncio.CancelledError:  # our caller stops: the job must not hold its GPU
            if active.cluster is not None and active.job_id is not None:
                self._spawn(self._cancel_job(active.cluster.name, active.job_id))
            raise
        finally:
            self._release(active)
        outcome.finished_at = time.time()
        return outcome

    def _release(self, active: ActiveRun) -> None:
        if active.cluster is not None:
            active.cluster.busy -= 1
        if active.ahead is not None and active.ahead.follower is active:
            active.ahead.follower = None
        active.done.set()
        self._active = {k: v for k, v in self._active.items() if v is not active}
        self._changed.set()  # a GPU is free: a waiting run may take it

    async def _run_on_cluster(
        self, job: Job, active: ActiveRun, run_dir: Path, on_line: LineCallback, out: RunOutcome
    ) -> None:
        cluster = await self._allocate(job, active)
        if cluster is None:
            return rl.mark_cancelled(out, active.cancel_reason or "")
        out.started_at = time.time()  # placed now (it may have waited for a GPU)
        if job.on_placed is not None:
            job.on_placed(cluster.name, self._accelerator())
        await self._ensure_up(cluster, job)
        st.stage_run(run_dir / "stage", job.run_id, job.edit_file, job.source)
        task = st.exec_task(
            self.template,
            self.tier,
            run_dir / "stage",
            run_id=job.run_id,
            edit_file=job.edit_file,
            profile=job.profile,
            replica=job.replica,
        )
        if active.cancel_reason is not None:
            return rl.mark_cancelled(out, active.cancel_reason)
        try:
            active.job_id = await self.adapter.exec(task, cluster.name)
        except ClusterGone:  # stopped by autostop, or gone: launch it again, once
            cluster.state, cluster.harness = "absent", None
            await self._ensure_up(cluster, job)
            active.job_id = await self.adapter.exec(task, cluster.name)
        if active.cancel_reason is not None:  # cancelled while the exec was on its way
            await self._cancel_job(cluster.name, active.job_id)
        _log().info(
            "run_submitted",
            run_id=job.run_id,
            cluster=cluster.name,
            job_id=active.job_id,
            behind=active.ahead is not None,
        )
        await self._wait_for_gpu(active)
        if active.ahead is not None:  # its run began when the one ahead ended
            out.started_at = active.gpu_from
        try:
            status = await self._follow(job, active, out, on_line)
        finally:
            out.gpu_seconds, out.gpu_usd = st.gpu_cost(self.tier, time.time() - active.gpu_from)
        self._conclude(job, active, out, status)
        if out.exit_code == 0:
            self._durations.append(time.time() - active.gpu_from)

    async def _wait_for_gpu(self, active: ActiveRun) -> None:
        """A run submitted behind another gets its GPU (and its clock) when that one ends."""
        ahead = active.ahead
        while ahead is not None and not ahead.done.is_set() and active.cancel_reason is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ahead.done.wait(), 0.1)
        active.gpu_from = time.time()

    async def _allocate(self, job: Job, active: ActiveRun) -> Cluster | None:
        """The slot's own cluster when it can take a run, else the least busy that can,
        else a cluster whose run is about to end (submitted behind it).

        While clusters are being replaced the tier has fewer GPUs than the launcher has
        slots: a run waits here for a GPU (or for a replacement's retry), not failing, so
        its message is not spent on retries. None: cancelled while waiting.
        """
        while active.cancel_reason is None:
            now = time.time()
            usable = [
                c
                for c in self.clusters
                if c.busy < c.gpus and (c.state != "failed" or now >= c.retry_at)
            ]
            if usable:
                own = self._own_cluster(job.slot)
                ranked = sorted(usable, key=lambda c: (c is not own, c.state != "up", c.busy))
                active.cluster = ranked[0]
                ranked[0].busy += 1
                return ranked[0]
            ahead, wake_at = self._ending_run(job, now)
            if ahead is not None and ahead.cluster is not None:
                ahead.follower, active.ahead, active.cluster = active, ahead, ahead.cluster
                ahead.cluster.busy += 1
                return ahead.cluster
            retry = min((c.retry_at for c in self.clusters if c.state == "failed"), default=now)
            wake_at = min(wake_at, retry) if retry > now else wake_at
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.01, wake_at - now))
        return None

    def _ending_run(self, job: Job, now: float) -> tuple[ActiveRun | None, float]:
        """A running run that ends within presubmit_s and has no run behind it yet (or
        None), and when the next one will; nothing without a duration measured yet."""
        if self.tier.presubmit_s <= 0 or not self._durations:
            return None, now + self.poll_s
        expected = statistics.median(self._durations)
        candidates = [
            (r.gpu_from + expected - self.tier.presubmit_s, r)
            for r in self._active.values()
            if r.gpu_from and r.follower is None and r.job_id is not None and r.cluster
            and r.cluster.state == "up" and r.cluster.harness == job.harness_dir
            and r.cluster.busy < 2 * r.cluster.gpus and r.cancel_reason is None
        ]  # fmt: skip
        if not candidates:
            return None, now + self.poll_s
        at, run = min(candidates, key=lambda c: c[0])
        return (run, at) if at <= now else (None, at)

    async def _ensure_up(self, cluster: Cluster, job: Job) -> None:
        """Launch the cluster unless it is up with this harness; wait for another's launch."""
        while cluster.state == "launching":
            await cluster.launched.wait()
        if cluster.state == "failed" and time.time() < cluster.retry_at:
            raise RunFailed(f"cluster {cluster.name} failed to launch: {cluster.last_error}")
        if cluster.state == "up" and cluster.harness == job.harness_dir:
            return
        cluster.state = "launching"
        cluster.launched.clear()
        task = st.launch_task(self.template, self.tier, job.harness_dir, job.profile)
        log = _log().bind(cluster=cluster.name, tier=self.tier.name)
        log.info("cluster_launching", accelerator=self.tier.accelerator, infra=self.tier.infra)
        try:
            setup_job = await self.adapter.launch(task, cluster.name, self.tier.autostop_minutes)
            if setup_job is not None:
                await self._await_setup(cluster.name, setup_job)
        except ApiUnreachable as exc:  # says nothing about the cluster: launch it next time
            cluster.state, cluster.harness = "absent", None
            raise RunFailed(f"cluster {cluster.name} was not launched: {exc}") from exc
        except SkyError as exc:
            self._replace(cluster, str(exc))
            raise RunFailed(
                f"cluster {cluster.name} could not be launched or set up ({exc}); it is being "
                f"replaced and the run will be retried"
            ) from exc
        finally:
            cluster.launched.set()
        cluster.state, cluster.harness, cluster.failures = "up", job.harness_dir, 0
        log.info("cluster_ready")

    async def _await_setup(self, cluster: str, job_id: int) -> None:
        """Wait for the detached setup job; LaunchFailed with its last lines unless it succeeds."""
        tail: collections.deque[str] = collections.deque(maxlen=10)
        async for chunk in self.adapter.tail_logs(cluster, job_id):
            tail.extend(line for line in split_lines(chunk) if line.strip())
        while (status := await self.adapter.job_status(cluster, job_id)) not in TERMINAL:
            await asyncio.sleep(self.poll_s)
        if status != "SUCCEEDED":
            lines = " | ".join(st.clean_line(line) for line in tail)
            raise LaunchFailed(f"setup job {job_id} ended {status}: {lines}")

    def _replace(self, cluster: Cluster, reason: str) -> None:
        """Take a cluster whose launch failed out of the pool; tear it down; retry later."""
        cluster.failures += 1
        delay = min(self.replace_delay_s * 2 ** (cluster.failures - 1), 16 * self.replace_delay_s)
        cluster.state, cluster.harness = "failed", None
        cluster.retry_at = time.time() + delay
        cluster.last_error = reason
        _log().warning(
            "cluster_replacing",
            cluster=cluster.name,
            tier=self.tier.name,
            reason=reason,
            retry_in_s=delay,
            slots_now=self.slots,
        )
        self._spawn(down_clusters(self.adapter, [cluster.name]))  # failures: ignored

    async def _follow(
        self, job: Job, active: ActiveRun, out: RunOutcome, on_line: LineCallback
    ) -> JobStatus:
        """Stream the log into run.log and on_line until the job ends; its final status."""
        assert active.cluster is not None and active.job_id is not None
        cluster, job_id = active.cluster.name, active.job_id
        try:
            await asyncio.wait_for(
                rl.stream_into(self.adapter.tail_logs(cluster, job_id), out, on_line), job.timeout_s
            )
        except TimeoutError:
            out.timed_out = True
            await self._cancel_job(cluster, job_id)
            return "CANCELLED"
        while True:  # the stream ended: the job did, or the connection dropped
            status = await self.adapter.job_status(cluster, job_id)
            if status is None:
                raise ClusterGone(f"job {job_id} vanished from cluster {cluster} (restarted?)")
            if status in TERMINAL:
                return status
            await asyncio.sleep(self.poll_s)

    def _conclude(self, job: Job, active: ActiveRun, out: RunOutcome, status: JobStatus) -> None:
        """The outcome from the final status: train.py's exit code, or why it is infra."""
        assert out.log_path is not None and active.cluster is not None
        if out.timed_out:
            rl.append(out, timed_out_line(job.timeout_s))
            return
        if active.cancel_reason is not None:
            return rl.mark_cancelled(out, active.cancel_reason)
        what = f"job {active.job_id} on {active.cluster.name}"
        rl.exit_code_or_fail(out, status, what, INFRA_STATUSES)

    # --- cancel and teardown ------------------------------------------------------------

    async def cancel(self, run_id: str, reason: str = "") -> None:
        active = self._active.get(run_id)
        if active is None:
            return
        active.cancel_reason = reason
        self._changed.set()
        if active.cluster is not None and active.job_id is not None:
            await self._cancel_job(active.cluster.name, active.job_id)

    async def _cancel_job(self, cluster: str, job_id: int) -> None:
        try:
            await self.adapter.cancel(cluster, job_id)
        except SkyError as exc:
            _log().warning("job_cancel_failed", cluster=cluster, job_id=job_id, error=str(exc))

    async def down(self) -> list[str]:
        """Tear down every cluster of this tier that exists; the names torn down."""
        names = await pool_clusters(self.adapter, (f"{self.prefix}-{self.tier.name}-",))
        failed = await down_clusters(self.adapter, names)
        return [n for n in names if n not in failed]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
