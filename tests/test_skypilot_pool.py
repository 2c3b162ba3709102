"""The skypilot backend's pool mode (SkyPilot managed jobs on a pool) on the fake pool:
real bash runs on fake workers, SkyPilot's recovery of a preempted worker, scripted
failures and statuses."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.launcher.backend import RunOutcome
from services.launcher.skypilot_adapter import ApiUnreachable, LaunchFailed, ManagedJob
from services.launcher.skypilot_fake_pool import FakePool
from services.launcher.skypilot_pool import SkyPoolBackend
from services.launcher.skypilot_teardown import down
from services.settings import Settings
from tests import skypilot_helpers as sh
from tests.eventually import eventually
from tests.skypilot_helpers import sky_job, source, tier


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[FakePool]:
    async with sh.fake_sky(tmp_path) as sky:
        yield FakePool(sky)


def _backend(pool: FakePool, tmp: Path, workers: int = 2, **kw: Any) -> SkyPoolBackend:
    t = tier(clusters=workers, mode="pool")
    return SkyPoolBackend(pool, t, sh.TEMPLATE, tmp / "runs", prefix="t", poll_s=0.01, **kw)


async def test_runs_as_managed_jobs_one_per_worker_with_true_exit_codes(
    pool: FakePool, tmp_path: Path
) -> None:
    b = _backend(pool, tmp_path)
    assert (b.slots, b.intake) == (2, 2) and pool.sky.calls["pool_apply"] == 0  # lazily
    placed: list[tuple[str, str]] = []
    sources = [source(LR=0.04, SLEEP=0.2), source(SLEEP=0.2), source(EXIT=3)]
    jobs = [
        sky_job(tmp_path, f"v{i}-screen-0", source=s, on_placed=lambda *p: placed.append(p))
        for i, s in enumerate(sources)
    ]
    outcomes: list[RunOutcome] = await asyncio.gather(*(b.run(j, lambda _l: None) for j in jobs))
    assert [o.exit_code for o in outcomes] == [0, 0, 3]
    assert not any(o.infra_failure for o in outcomes)
    assert "val_bpb:          1.010000" in outcomes[0].read_log()
    assert "RuntimeError: boom" in outcomes[2].read_log()
    assert placed == [("t-screen", "H100:1")] * 3  # RunStarted's host: the pool
    assert pool.sky.calls["pool_apply"] == 1 and pool.sky.calls["jobs_launch"] == 3
    workers = pool.sky.clusters_by_name
    assert sorted(workers) == ["t-screen-0", "t-screen-1"]
    for worker in workers.values():  # set up once each, never two jobs at once
        assert worker.setups == 1 and (worker.workdir / "prepared.count").read_text() == "1"
        assert worker.max_running == 1
    placed_files = {
        p.parent.name: p.read_text()
        for p in (tmp_path / "clusters").glob("*/sky_workdir/runs/*/train.py")
    }
    assert placed_files == {j.run_id: s for j, s in zip(jobs, sources, strict=True)}
    assert outcomes[0].gpu_usd == pytest.approx(outcomes[0].gpu_seconds * 0.001)


async def test_a_preempted_worker_is_recovered_by_skypilot_and_the_run_is_not_lost(
    pool: FakePool, tmp_path: Path
) -> None:
    b = _backend(pool, tmp_path, workers=1)
    started = asyncio.Event()
    run = asyncio.create_task(
        b.run(sky_job(tmp_path, "p-screen-0", source=source(SLEEP=1.0)), lambda _l: started.set())
    )
    await asyncio.wait_for(started.wait(), 10)
    await pool.sky.preempt("t-screen-0")  # the jobs controller recovers it on a new worker
    out = await asyncio.wait_for(run, 20)
    assert out.exit_code == 0 and not out.infra_failure
    assert pool.jobs[1].recovery_count == 1 and pool.sky.calls["launch"] == 2
    assert out.read_log().count("step 00001") == 2  # it ran again from the start


@pytest.mark.parametrize(
    "status",
    ["FAILED_SETUP", "FAILED_PRECHECKS", "FAILED_NO_RESOURCE", "FAILED_CONTROLLER", "CANCELLED"],
)
async def test_infra_statuses_are_never_the_variants(
    pool: FakePool, tmp_path: Path, status: Any
) -> None:
    async def ends_as(_job_id: int) -> ManagedJob | None:
        return ManagedJob(status, 0, "injected")

    pool.jobs_status = ends_as  # type: ignore[method-assign,assignment]
    b = _backend(pool, tmp_path)
    out = await b.run(sky_job(tmp_path, "s-screen-0", source=source(EXIT=1)), lambda _l: None)
    assert out.infra_failure and out.exit_code is None
    assert f"ended {status}" in out.infra_reason and "injected" in out.infra_reason


async def test_failures_of_skypilot_itself_are_infra_and_the_pool_is_applied_again(
    pool: FakePool, tmp_path: Path
) -> None:
    b = _backend(pool, tmp_path)
    pool.sky.fail_next("pool_apply", LaunchFailed("CloudError: catalog unreachable"))
    out = await b.run(sky_job(tmp_path, "a-screen-0"), lambda _l: None)
    assert out.infra_failure and "could not be applied: CloudError" in out.infra_reason
    pool.sky.fail_next("jobs_status", ApiUnreachable("Could not connect to SkyPilot API server"))
    out = await b.run(sky_job(tmp_path, "b-screen-0"), lambda _l: None)
    assert out.infra_failure and "Could not connect" in out.infra_reason
    assert pool.sky.calls["pool_apply"] == 2

    async def unknown(_job_id: int) -> None:
        return None

    pool.jobs_status = unknown  # type: ignore[method-assign,assignment]
    out = await b.run(sky_job(tmp_path, "c-screen-0"), lambda _l: None)
    assert out.infra_failure and "unknown to the jobs controller" in out.infra_reason


async def test_cancel_timeout_and_a_job_that_never_starts(pool: FakePool, tmp_path: Path) -> None:
    b = _backend(pool, tmp_path, workers=1, start_timeout_s=0.3)
    started = asyncio.Event()
    slow = sky_job(tmp_path, "c-screen-0", source=source(SLEEP=30.0))
    run = asyncio.create_task(b.run(slow, lambda _l: started.set()))
    await asyncio.wait_for(started.wait(), 10)
    # The only worker is busy: a second job waits for it, past its start timeout.
    waiting = await b.run(sky_job(tmp_path, "w-screen-0"), lambda _l: None)
    assert waiting.infra_failure and "did not start within 0s" in waiting.infra_reason
    assert pool.jobs[2].status == "CANCELLED"
    await b.cancel("c-screen-0", "campaign stopped")
    out = await asyncio.wait_for(run, 10)
    assert out.cancelled and not out.infra_failure and "campaign stopped" in out.read_log()
    timed = sky_job(tmp_path, "t-screen-0", source=source(SLEEP=30.0), timeout_s=0.5)
    timed_out = await b.run(timed, lambda _l: None)
    assert timed_out.timed_out and not timed_out.infra_failure
    await eventually(lambda: pool.jobs[3].status == "CANCELLED", 5, "the job cancelled")
    assert await b.down() == ["t-screen"] and pool.sky.clusters_by_name == {}


async def test_nightshift_down_tears_down_pools_and_clusters(
    pool: FakePool, tmp_path: Path
) -> None:
    b = _backend(pool, tmp_path)
    assert (await b.run(sky_job(tmp_path, "a-screen-0"), lambda _l: None)).exit_code == 0
    clusters = tier("validate", clusters=1)
    ran = await sh.backend(pool.sky, tmp_path, clusters).run(
        sky_job(tmp_path, "b-validate-0"), lambda _l: None
    )
    assert ran.exit_code == 0 and len(pool.sky.clusters_by_name) == 3
    settings = Settings(
        skypilot_tiers=[tier(clusters=2, mode="pool"), clusters], skypilot_cluster_prefix="t"
    )
    out = io.StringIO()
    assert await down(settings, confirm=True, adapter=pool.sky, pools=pool, out=out) == 0
    assert "pools torn down: 1 of 1" in out.getvalue() and "torn down: 1 of 1" in out.getvalue()
    assert pool.sky.clusters_by_name == {} and pool.workers == {}


async def test_a_cancelled_caller_does_not_leave_its_job_on_a_worker(
    pool: FakePool, tmp_path: Path
) -> None:
    await sh.cancel_the_caller_mid_run(_backend(pool, tmp_path, workers=1), tmp_path)
    await eventually(lambda: pool.jobs[1].status == "CANCELLED", 5, "the managed job cancelled")
