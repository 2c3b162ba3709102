"""`nightshift bench skypilot`: what the skypilot backend adds to each run, on the fake pool.

Two tiers (13 + 3 clusters by default) run `runs_per_cluster` runs per cluster of a
train.py that sleeps `run_s`; every SkyPilot call waits its published latency
(skypilot_fake) scaled by `time_scale`. The runs are handed to the backend as the launcher
hands them: `intake` workers take the next run as soon as the backend returns one. Measured:
control-plane requests per run, and the time each cluster's GPU sits idle between two runs
(from one run's train.py ending to the next one's starting), in real seconds (wall / time
scale: what this machine spends around the calls is scaled up with them, so the figure errs
high). Run with pre-submission (`presubmit_s`) and without (0) to see what it hides. The
first run of each cluster also waits for its launch, reported apart.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from services.launcher.backend import Job
from services.launcher.skypilot import SkyPilotBackend
from services.launcher.skypilot_fake import FakeJob, FakeSky
from services.launcher.skypilot_fake_pool import FakePool
from services.launcher.skypilot_pool import SkyPoolBackend
from services.settings import SkyTier

TRAIN = "import time\ntime.sleep({seconds})\nprint('---')\nprint('val_bpb:          1.0')\n"


@dataclass
class SkyBenchReport:
    runs: int
    clusters: int
    run_s: float  # real seconds one run trains (its train.py)
    presubmit_s: float  # the tiers' pre-submission lead (0: off)
    requests_per_run: float  # SkyPilot calls per run, launches excluded
    launches: int
    idle_s_mean: float  # real seconds a cluster's GPU idles between two of its runs
    idle_s_p95: float
    launch_s_mean: float  # real seconds from the start to a cluster's first run starting
    utilization: float  # train.py seconds / (train.py + idle) seconds, steady state
    mode: str = "clusters"


OUR_CALLS = {  # the requests the backend itself makes per run, in each mode
    "clusters": ("exec", "tail_logs", "job_status", "cancel"),
    "pool": ("jobs_launch", "jobs_status", "jobs_tail_logs", "jobs_cancel"),
}


async def skypilot_bench(
    tiers: tuple[int, ...] = (13, 3),
    runs_per_cluster: int = 4,
    run_s: float = 300.0,
    time_scale: float = 0.02,
    presubmit_s: float = 15.0,
    mode: Literal["clusters", "pool"] = "clusters",
) -> SkyBenchReport:
    if runs_per_cluster < 3:  # a cluster's first gap is warm-up: two more are the least
        raise ValueError(f"runs per cluster must be 3 or more, not {runs_per_cluster}")
    with tempfile.TemporaryDirectory(prefix="ns-bench-sky-") as tmp:
        root = Path(tmp)
        fake = FakeSky(root / "clusters", time_scale=time_scale)
        harness = root / "harness"
        harness.mkdir()
        lead = 0.0 if mode == "pool" else presubmit_s
        backends = [
            _backend(fake, root, mode, 5.0 * time_scale, SkyTier(
                name=f"t{i}", accelerator="H100:1", clusters=n, autostop_minutes=-1,
                presubmit_s=lead * time_scale, mode=mode,
            ))
            for i, n in enumerate(tiers)
        ]  # fmt: skip
        source = TRAIN.format(seconds=run_s * time_scale)
        t0 = time.time()
        try:
            await asyncio.gather(
                *(_feed(b, runs_per_cluster * b.tier.clusters, source, harness) for b in backends)
            )
            per_cluster = [
                sorted((j for j in c.jobs.values() if _is_run(j)), key=lambda j: j.started_at)
                for c in fake.clusters_by_name.values()
            ]
        finally:
            await fake.close()
    # Steady state: a cluster's first gap is left out (no run's duration is known before).
    idle = [g / time_scale for jobs in per_cluster for g in _gaps(jobs)[1:]]
    first = [(jobs[0].started_at - t0) / time_scale for jobs in per_cluster if jobs]
    runs = sum(len(jobs) for jobs in per_cluster)
    return SkyBenchReport(
        runs=runs,
        clusters=sum(tiers),
        run_s=run_s,
        presubmit_s=lead,
        requests_per_run=sum(fake.calls[c] for c in OUR_CALLS[mode]) / runs,
        launches=fake.calls["launch"],
        idle_s_mean=statistics.fmean(idle),
        idle_s_p95=sorted(idle)[int(0.95 * (len(idle) - 1))],
        launch_s_mean=statistics.fmean(first),
        utilization=run_s / (run_s + statistics.fmean(idle)),
        mode=mode,
    )


def _backend(
    fake: FakeSky, root: Path, mode: str, poll_s: float, tier: SkyTier
) -> SkyPilotBackend | SkyPoolBackend:
    if mode == "pool":  # it polls a job's status until the job runs: at the real default pace
        return SkyPoolBackend(FakePool(fake), tier, {}, root / "runs", poll_s=poll_s)
    return SkyPilotBackend(fake, tier, {}, root / "runs", poll_s=0.01)


def _is_run(job: FakeJob) -> bool:
    return "NIGHTSHIFT_RUN_ID" in (job.task.get("envs") or {})


def _gaps(jobs: list[FakeJob]) -> list[float]:
    """Wall seconds the GPU was free between consecutive runs on one cluster."""
    return [max(0.0, b.started_at - a.ended_at) for a, b in itertools.pairwise(jobs)]


async def _feed(
    backend: SkyPilotBackend | SkyPoolBackend, runs: int, source: str, harness: Path
) -> None:
    """`intake` workers, each taking the next run when its last one returns (a launcher)."""
    queue = [f"b{k}-{backend.tier.name}-0" for k in range(runs)]
    queue.reverse()

    async def worker(slot: int) -> None:
        while queue:
            run_id = queue.pop()
            job = Job(run_id, "b", "bench", 0, source, harness, slot=slot)
            outcome = await backend.run(job, lambda _line: None)
            if outcome.exit_code != 0:
                why = outcome.infra_reason or outcome.read_log()[-500:]
                raise RuntimeError(f"bench run {run_id} failed: {why}")

    await asyncio.gather(*(worker(slot) for slot in range(backend.intake)))


def format_report(r: SkyBenchReport) -> str:
    how = f"pre-submission {r.presubmit_s:.0f}s ahead" if r.presubmit_s else "no pre-submission"
    if r.mode == "pool":
        how = "pool mode: managed jobs, our estimated jobs-controller latencies"
    return (
        f"skypilot backend on the fake pool ({r.clusters} clusters, {r.runs} runs of "
        f"{r.run_s:.0f}s, SkyPilot's published latencies, {how}):\n"
        f"  control-plane requests per run: {r.requests_per_run:.1f} "
        f"({', '.join(OUR_CALLS[r.mode])}); {r.launches} launches\n"
        f"  GPU idle between two runs on a cluster: mean {r.idle_s_mean:.2f}s, "
        f"p95 {r.idle_s_p95:.2f}s -> {r.utilization:.2%} of a cluster's time is training\n"
        f"  a cluster's first run starts {r.launch_s_mean:.0f}s in (its launch and setup)"
    )
