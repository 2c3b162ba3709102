"""Replicates a decision made useless are cancelled, end to end on the sim: a close call
discarded (or a best replaced) while some of the runs requested for it have not started
or are running; those never start, or stop, and each is accounted for."""

from __future__ import annotations

from pathlib import Path

from services.broker import EmbeddedNats
from services.bus import Bus
from services.campaign import start_campaign
from services.contracts import ResultEvaluated, RunRequested, RunStarted, VariantDecided
from services.supervisor import wait_until_consumed
from tests.e2e_helpers import close_call_settings, history, ledger_rows, services_running
from tests.eventually import eventually


async def test_runs_a_decision_made_useless_are_cancelled_and_counted(
    tmp_path: Path, nats_server: EmbeddedNats, bus: Bus
) -> None:
    settings = close_call_settings(tmp_path, nats_server.url, campaign="cancel")

    async def completed() -> bool:
        rows = ledger_rows(
            settings.ledger_path, "SELECT status FROM campaigns WHERE name = ?", "cancel"
        )
        return rows == [("completed",)]

    async with services_running(settings, nats_server.url):
        await start_campaign(bus, settings)
        await eventually(completed, 150, "the campaign to complete", interval=0.3)
        await wait_until_consumed(bus, "ledger")

    decided = [e for e in await history(bus, [VariantDecided]) if isinstance(e, VariantDecided)]
    requested = [e for e in await history(bus, [RunRequested]) if isinstance(e, RunRequested)]
    started = {e.run_id: e for e in await history(bus, [RunStarted]) if isinstance(e, RunStarted)}
    results = {
        e.run_id: e for e in await history(bus, [ResultEvaluated]) if isinstance(e, ResultEvaluated)
    }
    cancelling = [d for d in decided if d.cancelled_runs]
    cancelled = {run_id: d for d in cancelling for run_id in d.cancelled_runs}
    assert cancelled, "no decision cancelled a run still out (the test needs a close call)"
    assert all(d.decision in ("keep", "discard") for d in cancelling)
    asked = {r.run_id for r in requested}
    assert set(cancelled) <= asked  # only runs the ledger itself requested
    never_started: list[str] = []
    stopped: list[str] = []
    ran_anyway: list[str] = []
    for run_id, decision in cancelled.items():
        if run_id not in started:
            never_started.append(run_id)
            continue
        if results[run_id].crash_reason.startswith("cancelled"):
            stopped.append(run_id)
        else:  # it ended before the cancel reached it: a real value, decided nothing
            assert results[run_id].ts - decision.ts < 5.0, run_id  # it was about done
            ran_anyway.append(run_id)
    print(
        f"cancelled: {len(never_started)} before starting, {len(stopped)} mid-run, "
        f"{len(ran_anyway)} too late"
    )
    assert never_started or stopped, "every cancelled run ran to its end"
    # Nothing is lost: every other requested run started and has a result.
    for run_id in asked - set(cancelled):
        assert run_id in started and run_id in results, run_id
    # A cancelled run's variant is not decided again after the decision that cancelled it.
    for run_id, decision in cancelled.items():
        later = [d for d in decided if d.variant_id == run_id.split("-")[0] and d.ts > decision.ts]
        if decision.decision == "discard":
            assert later == [], run_id
    # The ledger counts them: the runs it marked and the decisions that cancelled them.
    marked = ledger_rows(
        settings.ledger_path, "SELECT COUNT(*) FROM runs WHERE cancel_requested_at IS NOT NULL"
    )
    assert marked == [(len(cancelled),)]
    total = ledger_rows(settings.ledger_path, "SELECT SUM(runs_cancelled) FROM keep_decisions")
    assert total == [(len(cancelled),)]
