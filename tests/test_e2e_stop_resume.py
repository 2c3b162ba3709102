"""A campaign stopped mid-run and resumed: the runs the stop cut short, and the work it
left queued, run again, and no variant is charged a crash for the stop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from services.broker import EmbeddedNats
from services.bus import Bus
from services.campaign import resume_campaign, start_campaign, stop_campaign
from services.contracts import ResultEvaluated, RunFinished, RunRequested, RunStarted
from services.launcher.runs import SET_ASIDE_REASON
from services.ledger.resume import RESUME_REASON
from services.settings import Settings
from services.supervisor import wait_until_consumed
from tests.e2e_helpers import SINGLE_RUN, history, ledger_rows, services_running, wait_completed


async def test_a_stopped_campaign_resumes_the_runs_it_cut_short(
    e2e_settings: Callable[..., Settings], nats_server: EmbeddedNats, bus: Bus
) -> None:
    settings = e2e_settings(
        max_experiments=12,
        sim_time_scale=1.5 / 300.0,  # runs of ~1.5 s: the stop finds them running
        **SINGLE_RUN,
    )
    async with services_running(settings, nats_server.url):
        await start_campaign(bus, settings)

        async def started() -> int:
            return len(await history(bus, [RunStarted]))

        while await started() < 6:  # the first wave done, the second running
            await asyncio.sleep(0.2)
        assert await stop_campaign(bus, "e2e")

        async def set_aside() -> list[RunFinished]:
            return [
                e
                for e in await history(bus, [RunFinished])
                if isinstance(e, RunFinished) and e.infra_reason == SET_ASIDE_REASON
            ]

        while not await set_aside():
            await asyncio.sleep(0.2)
        cut_short = {f.run_id for f in await set_aside()}
        await asyncio.sleep(1.0)  # queued work reaches the launcher and is skipped
        assert await resume_campaign(bus, "e2e")
        await wait_completed(settings)
        await wait_until_consumed(bus, "ledger")

    events = await history(bus, [RunRequested, ResultEvaluated])
    again = {e.run_id for e in events if isinstance(e, RunRequested) and e.reason == RESUME_REASON}
    assert cut_short <= again, (cut_short, again)
    results = ledger_rows(
        settings.ledger_path,
        "SELECT v.variant_id, x.status, x.crash_reason, x.attempt FROM variants v "
        "LEFT JOIN results x ON x.variant_id = v.variant_id WHERE v.campaign = 'e2e'",
    )
    assert len({r[0] for r in results}) == 12
    assert all(r[1] not in (None, "infra") for r in results), results  # each one ran
    assert not [r for r in results if "cancel" in str(r[2])], results
    for run_id in cut_short:  # the new attempt, after the set-aside one
        [(attempt,)] = ledger_rows(
            settings.ledger_path, "SELECT attempt FROM results WHERE run_id = ?", run_id
        )
        assert attempt == 2, run_id
