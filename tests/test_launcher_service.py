"""The launcher service end to end on a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from services import contracts as c
from services.bus import Bus, Delivery
from services.launcher import service
from services.launcher.factory import make_backend
from services.launcher.runs import SET_ASIDE_REASON
from services.settings import Settings
from services.supervisor import wait_until_consumed
from tests.eventually import eventually
from tests.launcher_helpers import harness_tar, propose

SEED = """import os
DEPTH = 8
MATRIX_LR = 0.04
import helper
print("step 00000 (0.0%) | loss: 9.000000 | lrm: 1.00 | dt: 10ms | tok/sec: 1,000 | x")
print("---")
print("val_bpb:          0.997900")
print("num_steps:        " + str(helper.STEPS))
"""


async def start_campaign(
    bus: Bus, name: str = "camp", source: str = SEED, **kw: object
) -> c.CampaignStarted:
    digest = await bus.put_source(source)
    await bus.sources.put("harness-1", harness_tar({"helper.py": "STEPS = 7\n"}))
    fields: dict[str, object] = {
        "campaign": name,
        "event_id": f"campaign:{name}",
        "seed_digest": digest,
        "harness_key": "harness-1",
        "run_timeout_s": 600.0,
    }
    fields.update(kw)
    campaign = c.CampaignStarted(**fields)  # type: ignore[arg-type]
    await bus.campaigns.save(campaign)
    await bus.publish(campaign)
    return campaign


class Recorder:
    """Every RunStarted / RunFinished in the stream, as it arrives."""

    def __init__(self) -> None:
        self.events: list[c.AnyEvent] = []

    async def on_event(self, event: c.AnyEvent, _delivery: Delivery) -> None:
        self.events.append(event)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    async def wait_for(self, predicate: Callable[[], object], within_s: float = 20.0) -> None:
        await eventually(predicate, timeout=within_s, what="the recorded events")


@pytest.fixture
async def recorder(bus: Bus) -> AsyncIterator[Recorder]:
    rec = Recorder()
    stop = asyncio.Event()
    task = asyncio.create_task(
        bus.follow({c.RunStarted: rec.on_event, c.RunFinished: rec.on_event}, stop=stop)
    )
    yield rec
    stop.set()
    await asyncio.wait_for(task, 5)


def settings(tmp_path: Path, **kw: object) -> Settings:
    fields: dict[str, object] = {
        "home": str(tmp_path / "home"),
        "run_dir": str(tmp_path / "runs"),
        "launcher_id": "test-launcher",
        "slots": 2,
    }
    fields.update(kw)
    return Settings(**fields)  # type: ignore[arg-type]


class Running:
    def __init__(self, s: Settings, bus: Bus) -> None:
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(service.run(s, bus, self.stop))

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 15)


async def test_a_proposed_variant_runs_and_finishes(
    bus: Bus, recorder: Recorder, tmp_path: Path
) -> None:
    await start_campaign(bus)
    proposed = await propose(bus, "camp", SEED)
    launcher = Running(settings(tmp_path), bus)
    try:
        await recorder.wait_for(lambda: recorder.of(c.RunFinished))
    finally:
        await launcher.close()
    run_id = c.run_id_for(proposed.variant_id, "default", 0)
    [started] = recorder.of(c.RunStarted)
    [finished] = recorder.of(c.RunFinished)
    assert (started.run_id, started.backend, started.host, started.attempt) == (
        run_id,
        "local",
        started.host,
        1,
    )
    assert finished.run_id == run_id and finished.exit_code == 0 and finished.attempt == 1
    assert "val_bpb:          0.997900" in finished.log_tail
    assert "num_steps:        7" in finished.log_tail  # the harness was there
    log = (await bus.logs.get(run_id)).decode()
    assert log.endswith("num_steps:        7\n")
    assert (tmp_path / "runs" / "harness" / "harness-1" / "trainer" / "helper.py").is_file()


async def test_sim_runs_report_progress_fleet_status_and_honour_cancel(
    bus: Bus, recorder: Recorder, tmp_path: Path
) -> None:
    await start_campaign(bus)
    progress: list[c.RunProgress] = []
    fleet: list[c.FleetStatus] = []

    async def on_progress(event: c.RunProgress, _delivery: Delivery) -> None:
        progress.append(event)

    async def on_fleet(event: c.FleetStatus, _delivery: Delivery) -> None:
        fleet.append(event)

    subs = await bus.subscribe_lossy({c.RunProgress: on_progress, c.FleetStatus: on_fleet})
    # 300 simulated seconds x 0.02 = 6 s: long enough to see progress and cancel it.
    launcher = Running(settings(tmp_path, backend="sim", sim_time_scale=0.02, slots=3), bus)
    try:
        fast = await propose(bus, "camp", SEED)
        await recorder.wait_for(lambda: recorder.of(c.RunStarted))
        await asyncio.sleep(1.5)
        run_id = c.run_id_for(fast.variant_id, "default", 0)
        await bus.publish(c.RunCancel(campaign="camp", run_id=run_id, reason="early stop"))
        await recorder.wait_for(lambda: recorder.of(c.RunFinished), within_s=10)
    finally:
        await launcher.close()
        for sub in subs:
            await sub.unsubscribe()
    [finished] = recorder.of(c.RunFinished)
    assert finished.cancelled and "[nightshift] cancelled: early stop" in finished.log_tail
    assert progress and progress[0].run_id == run_id
    assert {f.launcher_id for f in fleet} == {"test-launcher"}
    assert fleet[0].slots == {"default": 3} and any(f.busy == {"default": 1} for f in fleet)
    # Stopping, it says it has no slots left (a SIGKILLed one just falls silent).
    assert (fleet[-1].slots, fleet[-1].busy) == ({"default": 0}, {"default": 0})


async def test_stopped_campaigns_and_other_tiers_are_skipped(
    bus: Bus, recorder: Recorder, tmp_path: Path
) -> None:
    await start_campaign(bus, "stopped")
    await bus.campaigns.mark_stopped("stopped", "stopped")
    await start_campaign(bus, "fast-tier", tiers=["h100", "h200"])
    await start_campaign(bus, "live")
    await propose(bus, "stopped", SEED)
    await propose(bus, "fast-tier", SEED)
    live = await propose(bus, "live", SEED)
    launcher = Running(settings(tmp_path, backend="sim", sim_time_scale=0.001), bus)
    try:
        await recorder.wait_for(lambda: recorder.of(c.RunFinished))
        await asyncio.sleep(0.5)
        lag = await bus.consumer_lag("launcher-default")
    finally:
        await launcher.close()
    assert [e.campaign for e in recorder.events] == ["live", "live"]
    assert recorder.of(c.RunFinished)[0].variant_id == live.variant_id
    assert lag is not None
    assert lag.pending == 0 and lag.ack_pending == 0  # skipped ones were acked


async def test_a_campaign_stopped_mid_run_cancels_its_runs(
    bus: Bus, recorder: Recorder, tmp_path: Path
) -> None:
    await start_campaign(bus)
    launcher = Running(settings(tmp_path, backend="sim", sim_time_scale=0.05), bus)
    try:
        await propose(bus, "camp", SEED)
        await recorder.wait_for(lambda: recorder.of(c.RunStarted))
        await bus.campaigns.mark_stopped("camp", "stopped")
        await recorder.wait_for(lambda: recorder.of(c.RunFinished), within_s=5)
        await asyncio.sleep(0.5)
        lag = await bus.consumer_lag("launcher-default")
    finally:
        await launcher.close()
    # Set aside, not a verdict: an infrastructure failure (the ledger requests the run again
    # on a resume), and acked rather than redelivered.
    [finished] = recorder.of(c.RunFinished)
    assert finished.cancelled and "campaign stopped" in finished.log_tail
    assert finished.infra_failure and finished.infra_reason == SET_ASIDE_REASON
    assert lag is not None and lag.pending == 0 and lag.ack_pending == 0


async def test_a_run_a_decision_cancelled_is_no_set_aside_when_its_campaign_completes(
    bus: Bus, recorder: Recorder, tmp_path: Path
) -> None:
    """A campaign completes as soon as its last decision cancels the replicates still out:
    such a run, also stopped by the completion, is reported cancelled (its variant is
    decided), not set aside as an infrastructure failure to run again."""
    await start_campaign(bus)
    launcher = Running(settings(tmp_path, backend="sim", sim_time_scale=0.05), bus)
    try:
        proposed = await propose(bus, "camp", SEED)
        await recorder.wait_for(lambda: recorder.of(c.RunStarted))
        run_id = c.run_id_for(proposed.variant_id, "default", 0)
        await bus.campaigns.mark_cancelled("camp", run_id, "discard of the variant")
        await bus.campaigns.mark_stopped("camp", "completed")
        await recorder.wait_for(lambda: recorder.of(c.RunFinished), within_s=5)
    finally:
        await launcher.close()
    [finished] = recorder.of(c.RunFinished)
    assert finished.cancelled and not finished.infra_failure, finished.infra_reason


async def test_a_run_requested_again_counts_its_earlier_attempts(
    bus: Bus, recorder: Recorder, tmp_path: Path
) -> None:
    await start_campaign(bus)
    proposed = await propose(bus, "camp", SEED)
    run_id = c.run_id_for(proposed.variant_id, "default", 0)
    again = c.RunRequested(
        campaign="camp",
        run_id=run_id,
        variant_id=proposed.variant_id,
        source_digest=proposed.source_digest,
        tier="default",
        replica=0,
        attempt_base=3,
    )
    await bus.campaigns.mark_stopped("camp", "stopped")  # the proposal is skipped
    launcher = Running(settings(tmp_path, backend="sim", sim_time_scale=0.001), bus)
    try:
        await asyncio.sleep(0.5)
        await bus.campaigns.clear_stopped("camp")
        await bus.publish(again)
        await recorder.wait_for(lambda: recorder.of(c.RunFinished))
    finally:
        await launcher.close()
    [started] = recorder.of(c.RunStarted)
    [finished] = recorder.of(c.RunFinished)
    assert (started.run_id, started.attempt, finished.attempt) == (run_id, 4, 4)


async def test_a_missing_harness_is_published_as_infra_then_retried(
    bus: Bus, recorder: Recorder, tmp_path: Path
) -> None:
    await start_campaign(bus, harness_key="no-such-harness")
    await propose(bus, "camp", SEED)
    launcher = Running(settings(tmp_path, backend="sim"), bus)
    try:
        await recorder.wait_for(lambda: len(recorder.of(c.RunFinished)) >= 2)
    finally:
        await launcher.close()
    first, second = recorder.of(c.RunFinished)[:2]
    assert first.infra_failure and "no-such-harness" in first.infra_reason
    assert (first.attempt, second.attempt) == (1, 2)
    assert not recorder.of(c.RunStarted)


async def test_stopping_the_launcher_mid_run_hands_the_run_back(
    bus: Bus, recorder: Recorder, tmp_path: Path
) -> None:
    await start_campaign(bus)
    launcher = Running(settings(tmp_path, backend="sim", sim_time_scale=0.05), bus)
    await propose(bus, "camp", SEED)
    await recorder.wait_for(lambda: recorder.of(c.RunStarted))
    await launcher.close()
    assert not recorder.of(c.RunFinished)  # not reported as a cancelled run
    again = Running(settings(tmp_path, backend="sim", sim_time_scale=0.001), bus)
    try:
        await recorder.wait_for(lambda: recorder.of(c.RunFinished))
    finally:
        await again.close()
    [finished] = recorder.of(c.RunFinished)
    assert finished.attempt >= 2 and finished.exit_code == 0


def test_skypilot_without_the_tier_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tier 'default', which is not in 'skypilot_tiers'"):
        make_backend(settings(tmp_path, backend="skypilot"), "x")


async def test_a_finished_run_is_not_run_again_whatever_the_message_id(
    bus: Bus, recorder: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding of issue 12: a VariantProposed published again with a new message id (as
    after the stream's 2-minute duplicate window) made the launcher run a finished variant
    again (its RunStarted and RunFinished then had the ids of the first run's: JetStream
    dropped them, so only the backend knows how often it ran)."""
    runs: list[str] = []

    def counting_backend(s: Settings, launcher_id: str) -> Any:
        backend = make_backend(s, launcher_id)
        real_run = backend.run

        async def run(job: Any, on_line: Any) -> Any:
            runs.append(job.run_id)
            return await real_run(job, on_line)

        backend.run = run  # type: ignore[method-assign]
        return backend

    monkeypatch.setattr(service, "make_backend", counting_backend)
    await start_campaign(bus)
    proposed = await propose(bus, "camp", SEED)
    launcher = Running(settings(tmp_path, backend="sim", sim_time_scale=0.001), bus)
    try:
        await recorder.wait_for(lambda: recorder.of(c.RunFinished))
        again = msgspec.structs.replace(proposed, event_id="proposed-again-after-the-window")
        await bus.publish(again)
        await wait_until_consumed(bus, "launcher-default")
    finally:
        await launcher.close()
    assert runs == [c.run_id_for(proposed.variant_id, "default", 0)]
