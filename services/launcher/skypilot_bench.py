"""`nightshift bench skypilot`: what the skypilot backend adds to each run, on the fake pool.

Two tiers (13 + 3 clusters by default) run `runs_per_cluster` runs each of a train.py that
sleeps `run_s`; every SkyPilot call waits its published latency (skypilot_fake) scaled by
`time_scale`. Measured: control-plane requests per run, and the wall time a run holds its slot beyond
its own train.py: the published latencies of the calls on its path plus the time this
machine measurably spent around them (not scaled); the first run of each cluster also
waits for its launch, reported apart.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from services.launcher.backend import Job
from services.launcher.skypilot import SkyPilotBackend
from services.launcher.skypilot_fake import FakeSky
from services.settings import SkyTier

TRAIN = "import time\ntime.sleep({seconds})\nprint('---')\nprint('val_bpb:          1.0')\n"


@dataclass
class SkyBenchReport:
    runs: int
    clusters: int
    run_s: float  # real seconds one run trains (its train.py)
    requests_per_run: float  # SkyPilot calls per run, launches excluded
    launches: int
    added_s_mean: float  # real seconds a run holds its slot beyond its train.py
    added_s_p95: float
    launch_s_mean: float  # real seconds a cluster's first run waited for its launch
    utilization: float  # train.py seconds / slot seconds, steady state


async def skypilot_bench(
    tiers: tuple[int, ...] = (13, 3),
    runs_per_cluster: int = 3,
    run_s: float = 300.0,
    time_scale: float = 0.005,
) -> SkyBenchReport:
    with tempfile.TemporaryDirectory(prefix="ns-bench-sky-") as tmp:
        root = Path(tmp)
        fake = FakeSky(root / "clusters", time_scale=time_scale)
        harness = root / "harness"
        harness.mkdir()
        backends = [
            SkyPilotBackend(
                fake,
                SkyTier(name=f"t{i}", accelerator="H100:1", clusters=n, autostop_minutes=-1),
                {},
                root / "runs",
                poll_s=0.01,
            )
            for i, n in enumerate(tiers)
        ]
        source = TRAIN.format(seconds=run_s * time_scale)
        try:
            samples = await asyncio.gather(
                *(
                    _run_slot(b, slot, runs_per_cluster, source, harness)
                    for b in backends
                    for slot in range(b.slots)
                )
            )
            jobs = [j for c in fake.clusters_by_name.values() for j in c.jobs.values()]
            job_s = {j.task["name"]: j.ended_at - j.started_at for j in jobs}
        finally:
            await fake.close()
    # A run's added time: the SkyPilot latencies on its path (real seconds, as published)
    # plus what this machine measurably spent around them (unscaled: it is not simulated).
    path_s = sum(fake.latency_s[c] for c in ("exec", "tail_logs", "job_status"))
    added = [
        path_s + (wall - job_s[run_id] - path_s * time_scale)
        for slot in samples
        for run_id, wall in slot[1:]
    ]
    first_path_s = fake.latency_s["launch"] + path_s
    first = [
        first_path_s + (wall - job_s[run_id] - first_path_s * time_scale)
        for slot in samples
        for run_id, wall in slot[:1]
    ]
    launches = fake.calls["launch"]
    runs = sum(len(s) for s in samples)
    return SkyBenchReport(
        runs=runs,
        clusters=sum(tiers),
        run_s=run_s,
        requests_per_run=(sum(fake.calls.values()) - launches) / runs,
        launches=launches,
        added_s_mean=statistics.fmean(added),
        added_s_p95=sorted(added)[int(0.95 * (len(added) - 1))],
        launch_s_mean=statistics.fmean(first),
        utilization=run_s / (run_s + statistics.fmean(added)),
    )


async def _run_slot(
    backend: SkyPilotBackend, slot: int, runs: int, source: str, harness: Path
) -> list[tuple[str, float]]:
    """Runs one after another on one slot, as the launcher gives them: (run_id, wall s)."""
    out = []
    for k in range(runs):
        run_id = f"b{slot}-{backend.tier.name}-{k}"
        job = Job(run_id, "b", "bench", 0, source, harness, slot=slot)
        t = time.time()
        outcome = await backend.run(job, lambda _line: None)
        if outcome.exit_code != 0:
            raise RuntimeError(
                f"bench run {run_id} failed: {outcome.infra_reason or outcome.read_log()[-500:]}"
            )
        out.append((run_id, time.time() - t))
    return out


def format_report(r: SkyBenchReport) -> str:
    return (
        f"skypilot backend on the fake pool ({r.clusters} clusters, {r.runs} runs of "
        f"{r.run_s:.0f}s, SkyPilot's published latencies):\n"
        f"  control-plane requests per run: {r.requests_per_run:.1f} "
        f"(exec, tail_logs, job_status); {r.launches} launches, one per cluster\n"
        f"  added latency per run: mean {r.added_s_mean:.1f}s, p95 {r.added_s_p95:.1f}s "
        f"-> {r.utilization:.1%} of a slot's time is training\n"
        f"  a cluster's first run also waits for its launch: {r.launch_s_mean:.0f}s"
    )
