"""The skypilot backend's control logic on the fake pool (real bash runs, scripted failures)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.launcher.backend import RunOutcome
from services.launcher.skypilot_adapter import JobStatus, LaunchFailed
from services.launcher.skypilot_bench import format_report, skypilot_bench
from services.launcher.skypilot_fake import PUBLISHED_LATENCY_S, FakeSky
from services.launcher.skypilot_teardown import down
from services.settings import Settings
from tests.eventually import eventually
from tests.skypilot_helpers import (
    backend,
    cancel_the_caller_mid_run,
    fake_sky,
    harness,
    sky_job,
    source,
    tier,
)


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeSky]:
    async with fake_sky(tmp_path) as sky:
        yield sky


async def test_lazy_clusters_setup_once_own_run_dirs_true_exit_codes(
    fake: FakeSky, tmp_path: Path
) -> None:
    b = backend(fake, tmp_path, tier(clusters=2))
    assert fake.calls["launch"] == 0  # nothing is provisioned before a run needs it
    lines: list[str] = []
    sources = [source(LR=0.03 + i / 100) for i in range(3)] + [source(EXIT=3)]
    jobs = [
        sky_job(tmp_path, f"v{i}-screen-0", source=s, slot=i % 2) for i, s in enumerate(sources)
    ]
    first = await asyncio.gather(*(b.run(j, lines.append) for j in jobs[:2]))
    rest = await asyncio.gather(*(b.run(j, lines.append) for j in jobs[2:]))
    outcomes: list[RunOutcome] = [*first, *rest]
    assert [o.exit_code for o in outcomes] == [0, 0, 0, 3]
    assert not any(o.infra_failure for o in outcomes)
    assert "val_bpb:          1.010000" in outcomes[1].read_log()
    assert "RuntimeError: boom" in outcomes[3].read_log()  # a crash is the variant's own
    assert any(line.startswith("step 00002") for line in lines)  # streamed to on_line
    # Two clusters, each launched and prepared once, autostop passed on.
    assert sorted(fake.clusters_by_name) == ["t-screen-0", "t-screen-1"]
    for cluster in fake.clusters_by_name.values():
        assert cluster.setups == 1 and (cluster.workdir / "prepared.count").read_text() == "1"
        assert cluster.autostop_minutes == 7 and cluster.max_running == 1
    # Each run's file in its own directory on the cluster that ran it.
    placed = {
        p.parent.name: p.read_text()
        for p in (tmp_path / "clusters").glob("*/sky_workdir/runs/*/train.py")
    }
    assert placed == {j.run_id: s for j, s in zip(jobs, sources, strict=True)}
    # GPU time and dollars at the tier's price ($3.6 per GPU-hour = $0.001 per second).
    assert all(o.gpu_seconds > 0 for o in outcomes)
    assert outcomes[0].gpu_usd == pytest.approx(outcomes[0].gpu_seconds * 0.001)


async def test_setup_failure_replaces_the_cluster_and_slots_shrink_until_back(
    fake: FakeSky, tmp_path: Path
) -> None:
    b = backend(fake, tmp_path, tier(clusters=3), replace_delay_s=0.3)
    fake.fail_next("launch", LaunchFailed("CommandError: setup failed with exit 1: no space"))
    bad = await b.run(sky_job(tmp_path, "a-screen-0", slot=0), lambda _l: None)
    assert bad.infra_failure and bad.exit_code is None
    assert "t-screen-0 could not be launched or set up" in bad.infra_reason
    assert (
        "no space" in bad.infra_reason and "[nightshift] infrastructure failure" in bad.read_log()
    )
    assert b.slots == 2  # its GPU is out of the pool while it is replaced
    # Meanwhile runs go to the other clusters, even from the failed cluster's slot.
    ok = await b.run(sky_job(tmp_path, "b-screen-0", slot=0), lambda _l: None)
    assert ok.exit_code == 0
    await asyncio.sleep(0.35)
    runs = [sky_job(tmp_path, f"c{i}-screen-0", slot=i) for i in range(3)]
    outcomes = await asyncio.gather(*(b.run(j, lambda _l: None) for j in runs))
    assert [o.exit_code for o in outcomes] == [0, 0, 0]
    assert b.slots == 3 and len(fake.clusters_by_name) == 3  # replaced and back


async def test_preemption_mid_run_is_an_infra_failure_and_the_cluster_comes_back(
    fake: FakeSky, tmp_path: Path
) -> None:
    b = backend(fake, tmp_path, tier(clusters=1))
    started = asyncio.Event()
    run = asyncio.create_task(
        b.run(sky_job(tmp_path, "p-screen-0", source=source(SLEEP=30.0)), lambda _l: started.set())
    )
    await asyncio.wait_for(started.wait(), 10)
    await fake.preempt("t-screen-0")
    out = await asyncio.wait_for(run, 10)
    assert out.infra_failure and not out.cancelled and out.exit_code is None
    assert "cluster gone during the run" in out.infra_reason
    again = await b.run(sky_job(tmp_path, "p-screen-0"), lambda _l: None)
    assert again.exit_code == 0 and fake.calls["launch"] == 2  # provisioned anew


async def test_a_stopped_cluster_is_relaunched_by_the_next_run_not_failed(
    fake: FakeSky, tmp_path: Path
) -> None:
    b = backend(fake, tmp_path, tier(clusters=1))
    assert (await b.run(sky_job(tmp_path, "x-screen-0"), lambda _l: None)).exit_code == 0
    await fake.preempt("t-screen-0")  # autostopped / torn down between runs
    out = await b.run(sky_job(tmp_path, "y-screen-0"), lambda _l: None)
    assert out.exit_code == 0 and not out.infra_failure and fake.calls["launch"] == 2


async def test_api_server_down_is_an_infra_failure(fake: FakeSky, tmp_path: Path) -> None:
    b = backend(fake, tmp_path, tier(clusters=1))
    fake.api_down = True
    out = await b.run(sky_job(tmp_path, "d-screen-0"), lambda _l: None)
    assert out.infra_failure and "Could not connect to SkyPilot API server" in out.infra_reason


@pytest.mark.parametrize("status", ["FAILED_DRIVER", "FAILED_SETUP", "CANCELLED"])
async def test_infra_statuses_are_never_the_variants(
    fake: FakeSky, tmp_path: Path, status: JobStatus
) -> None:
    async def ends_as(_cluster: str, _job_id: int) -> JobStatus:
        return status

    fake.job_status = ends_as  # type: ignore[method-assign,assignment]
    b = backend(fake, tmp_path, tier(clusters=1))
    out = await b.run(sky_job(tmp_path, "s-screen-0", source=source(EXIT=1)), lambda _l: None)
    assert out.infra_failure and out.exit_code is None and f"ended {status}" in out.infra_reason


async def test_a_killed_run_script_is_infra_not_a_crash(fake: FakeSky, tmp_path: Path) -> None:
    # The machine kills the run script itself (no exit code printed): FAILED, but not train.py's.
    killer = source().replace(
        "import prepare_check", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)"
    )
    b = backend(fake, tmp_path, tier(clusters=1))
    out = await b.run(sky_job(tmp_path, "k-screen-0", source=killer), lambda _l: None)
    assert out.infra_failure and "ended FAILED" in out.infra_reason


async def test_cancel_and_timeout(fake: FakeSky, tmp_path: Path) -> None:
    b = backend(fake, tmp_path, tier(clusters=2))
    started = asyncio.Event()
    slow = sky_job(tmp_path, "c-screen-0", source=source(SLEEP=30.0), slot=0)
    run = asyncio.create_task(b.run(slow, lambda _l: started.set()))
    timed = sky_job(tmp_path, "t-screen-0", source=source(SLEEP=30.0), slot=1, timeout_s=0.5)
    timed_out = await b.run(timed, lambda _l: None)
    assert timed_out.timed_out and not timed_out.infra_failure
    await asyncio.wait_for(started.wait(), 10)
    await b.cancel("c-screen-0", "campaign stopped")
    out = await asyncio.wait_for(run, 10)
    assert out.cancelled and not out.infra_failure and "campaign stopped" in out.read_log()
    assert fake.calls["cancel"] == 2  # sky.cancel for each


async def test_down_tears_down_the_tier(fake: FakeSky, tmp_path: Path) -> None:
    b = backend(fake, tmp_path, tier(clusters=2))
    await asyncio.gather(
        *(b.run(sky_job(tmp_path, f"z{i}-screen-0", slot=i), lambda _l: None) for i in range(2))
    )
    assert sorted(await b.down()) == ["t-screen-0", "t-screen-1"]
    await eventually(lambda: fake.clusters_by_name == {})


async def test_nightshift_down_tears_down_only_the_configured_tiers(
    fake: FakeSky, tmp_path: Path
) -> None:
    screen, validate = tier("screen", clusters=2), tier("validate", clusters=1)
    for t in (screen, validate):
        await asyncio.gather(
            *(
                backend(fake, tmp_path, t).run(
                    sky_job(tmp_path, f"d{i}-{t.name}-0", slot=i), lambda _l: None
                )
                for i in range(t.clusters)
            )
        )
    other = tier("other", clusters=1)  # another deployment's cluster, not ours to touch
    await backend(fake, tmp_path, other).run(sky_job(tmp_path, "o-other-0"), lambda _l: None)
    settings = Settings(skypilot_tiers=[screen, validate], skypilot_cluster_prefix="t")
    out = io.StringIO()
    assert await down(settings, confirm=False, adapter=fake, out=out, ask=lambda _q: "n") == 0
    assert len(fake.clusters_by_name) == 4 and "nothing torn down" in out.getvalue()
    assert await down(settings, confirm=True, adapter=fake, out=out) == 0
    assert sorted(fake.clusters_by_name) == ["t-other-0"]
    assert "clusters: t-screen-0, t-screen-1, t-validate-0" in out.getvalue()
    assert "torn down: 3 of 3" in out.getvalue()


async def test_bench_counts_requests_and_the_idle_gpu_time_pre_submission_hides() -> None:
    kw: dict[str, Any] = {"tiers": (3, 1), "runs_per_cluster": 4, "run_s": 60.0}
    before = await skypilot_bench(**kw, time_scale=0.02, presubmit_s=0.0)
    after = await skypilot_bench(**kw, time_scale=0.02, presubmit_s=15.0)
    for report in (before, after):
        assert report.runs == 16 and report.launches == 4
        assert report.requests_per_run == 3.0  # exec, tail_logs, job_status
        assert report.launch_s_mean >= PUBLISHED_LATENCY_S["launch"]
        print(format_report(report))
    # Without it a GPU idles for the status read and the next exec, at least; with it the
    # next job is already queued on the cluster when the GPU frees.
    published = sum(PUBLISHED_LATENCY_S[c] for c in ("exec", "job_status"))
    assert published <= before.idle_s_mean < published + 5.0
    assert after.idle_s_mean < before.idle_s_mean / 2


async def test_a_cancelled_caller_does_not_leave_its_job_running(
    fake: FakeSky, tmp_path: Path
) -> None:
    await cancel_the_caller_mid_run(backend(fake, tmp_path, tier(clusters=1)), tmp_path)
    jobs = fake.clusters_by_name["t-screen-0"].jobs  # the setup job, then the run
    job = jobs[max(jobs)]
    await eventually(lambda: job.status == "CANCELLED", 5, "the job cancelled on the cluster")


async def test_a_failing_setup_job_replaces_the_cluster_with_its_output(
    fake: FakeSky, tmp_path: Path
) -> None:
    # SkyPilot runs setup detached, as a job: launch returns, the job ends FAILED_SETUP.
    broken = harness(tmp_path / "broken")
    (broken / "prepare.py").write_text("print('no space left on device')\nraise SystemExit(1)\n")
    b = backend(fake, tmp_path, tier(clusters=2), replace_delay_s=30.0)
    out = await b.run(sky_job(tmp_path, "s-screen-0", harness_dir=broken), lambda _l: None)
    assert out.infra_failure and out.exit_code is None
    assert "ended FAILED_SETUP: no space left on device" in out.infra_reason
    assert "t-screen-0 could not be launched or set up" in out.infra_reason
    assert b.slots == 1 and fake.calls["exec"] == 0  # no run went to the broken cluster
    await eventually(lambda: "t-screen-0" not in fake.clusters_by_name, 5, "its teardown")
