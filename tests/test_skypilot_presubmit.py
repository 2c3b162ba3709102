"""Pre-submission on the fake pool: the next run's exec goes out while the run ahead of it
ends, never two runs on one GPU, nothing lost when either must stop; and RunStarted's host
is the cluster that really runs the run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.launcher.backend import RunOutcome
from services.launcher.skypilot import SkyPilotBackend
from services.launcher.skypilot_adapter import LaunchFailed
from services.launcher.skypilot_fake import FakeJob, FakeSky
from tests.skypilot_helpers import backend, fake_sky, sky_job, source, tier


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeSky]:
    async with fake_sky(tmp_path) as sky:
        yield sky


def _runs(fake: FakeSky, cluster: str = "t-screen-0") -> list[FakeJob]:
    jobs = fake.clusters_by_name[cluster].jobs.values()
    return sorted(
        (j for j in jobs if "NIGHTSHIFT_RUN_ID" in j.task["envs"]), key=lambda j: j.job_id
    )


async def _measured(b: SkyPilotBackend, tmp_path: Path) -> None:
    """One run of 0.4 s, so the backend knows how long a run takes."""
    first = await b.run(sky_job(tmp_path, "m-screen-0", source=source(SLEEP=0.4)), lambda _l: None)
    assert first.exit_code == 0


async def test_the_next_run_is_submitted_behind_the_ending_one_and_starts_at_once(
    fake: FakeSky, tmp_path: Path
) -> None:
    b = backend(fake, tmp_path, tier(clusters=1, presubmit_s=0.3))
    assert (b.slots, b.intake) == (1, 2)
    await _measured(b, tmp_path)
    ahead = asyncio.create_task(
        b.run(sky_job(tmp_path, "a-screen-0", source=source(SLEEP=0.4)), lambda _l: None)
    )
    await asyncio.sleep(0.05)
    behind = await b.run(sky_job(tmp_path, "b-screen-0", slot=1), lambda _l: None)
    outcomes: list[RunOutcome] = [await ahead, behind]
    assert [o.exit_code for o in outcomes] == [0, 0]
    _, a, c = _runs(fake)
    assert c.submitted_at < a.ended_at  # its exec went out while the one ahead still ran
    assert c.started_at >= a.ended_at  # and it started only when that one ended
    assert fake.clusters_by_name["t-screen-0"].max_running == 1
    # Its start, GPU time (and timeout) count from the run ahead's end, not its submission.
    assert c.submitted_at < behind.started_at and abs(behind.started_at - a.ended_at) < 0.3
    assert behind.gpu_seconds == pytest.approx(behind.finished_at - behind.started_at, abs=0.05)


async def test_without_a_known_duration_or_with_presubmit_off_runs_wait_for_a_free_gpu(
    fake: FakeSky, tmp_path: Path
) -> None:
    b = backend(fake, tmp_path, tier(clusters=1, presubmit_s=0.0))
    assert b.intake == 1
    await _measured(b, tmp_path)
    ahead = asyncio.create_task(
        b.run(sky_job(tmp_path, "a-screen-0", source=source(SLEEP=0.4)), lambda _l: None)
    )
    await asyncio.sleep(0.05)
    await b.run(sky_job(tmp_path, "b-screen-0", slot=1), lambda _l: None)
    await ahead
    _, a, c = _runs(fake)
    assert c.submitted_at >= a.ended_at


@pytest.mark.parametrize("stop", ["cancel_behind", "cancel_ahead", "preempt"])
async def test_a_presubmitted_run_that_must_stop_is_never_lost_nor_charged(
    fake: FakeSky, tmp_path: Path, stop: str
) -> None:
    b = backend(fake, tmp_path, tier(clusters=1, presubmit_s=5.0))
    await _measured(b, tmp_path)
    ahead = asyncio.create_task(
        b.run(sky_job(tmp_path, "a-screen-0", source=source(SLEEP=2.0)), lambda _l: None)
    )
    await asyncio.sleep(0.1)
    behind = asyncio.create_task(b.run(sky_job(tmp_path, "b-screen-0", slot=1), lambda _l: None))
    while len(_runs(fake)) < 3:  # the one behind is submitted (queued on the cluster)
        await asyncio.sleep(0.01)
    if stop == "cancel_behind":
        await b.cancel("b-screen-0", "campaign stopped")
    elif stop == "cancel_ahead":
        await b.cancel("a-screen-0", "early stop")
    else:
        await fake.preempt("t-screen-0")
    a, c = await asyncio.wait_for(ahead, 10), await asyncio.wait_for(behind, 10)
    if stop == "cancel_behind":  # the one ahead runs on; the one behind never held the GPU
        assert a.exit_code == 0 and c.cancelled and not c.infra_failure
        assert _runs(fake)[2].status == "CANCELLED" and _runs(fake)[2].started_at == 0
    elif stop == "cancel_ahead":  # the one behind takes the GPU and runs to its end
        assert a.cancelled and c.exit_code == 0
    else:  # both infrastructure failures: run again by the launcher, charged to no variant
        assert a.infra_failure and c.infra_failure and "cluster gone" in c.infra_reason
        again = await b.run(sky_job(tmp_path, "b-screen-0"), lambda _l: None)
        assert again.exit_code == 0


async def test_run_started_names_the_cluster_that_really_runs_it(
    fake: FakeSky, tmp_path: Path
) -> None:
    b = backend(fake, tmp_path, tier(clusters=2), replace_delay_s=30.0)
    fake.fail_next("launch", LaunchFailed("CommandError: setup failed (injected)"))
    placed: list[tuple[str, str]] = []
    bad = await b.run(
        sky_job(tmp_path, "x-screen-0", slot=0, on_placed=lambda *p: placed.append(p)),
        lambda _l: None,
    )
    assert bad.infra_failure and placed == [("t-screen-0", "H100:1")]
    # Slot 0's own cluster is being replaced: the run goes to the other one, and says so.
    ok = await b.run(
        sky_job(tmp_path, "y-screen-0", slot=0, on_placed=lambda *p: placed.append(p)),
        lambda _l: None,
    )
    assert ok.exit_code == 0 and placed[1] == ("t-screen-1", "H100:1")
    assert b.placement(0)[0] == "t-screen-0"  # what the slot alone would have said
    assert (tmp_path / "clusters" / "t-screen-1" / "sky_workdir" / "runs" / "y-screen-0").is_dir()
