"""A ledger that only accepts what happened (issue 12), on a real nats-server.

Findings: a RunFinished for a run that never started and a ResultEvaluated for a variant
that was never proposed were counted (62 rows for 60 experiments), one forged result became
the best (and `/best/train.py` a 404); a result applied before its proposal became a
placeholder. Now: such events are dead-lettered with a reason and the campaign they name,
a result that arrives before its proposal waits for it, and the dead letters are visible.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from fastapi.testclient import TestClient

from services.bus import Bus, TransientError
from services.contracts import ResultEvaluated, RunFinished, VariantProposed
from services.ledger import queries
from services.ledger.api import create_app
from services.ledger.db import open_read
from services.ledger.service import run
from services.ledger.tsv import results_tsv
from services.settings import Settings
from tests.eventually import eventually
from tests.synthetic import synthetic_campaign
from tests.test_ledger_service import publish_with_objects


def forged_result(campaign: str, variant_id: str, run_id: str) -> ResultEvaluated:
    return ResultEvaluated(
        campaign=campaign,
        event_id=f"forged:{run_id}",
        run_id=run_id,
        variant_id=variant_id,
        tier="default",
        status="ok",
        value=0.0001,
    )


async def test_forged_events_are_dead_lettered_never_counted(bus: Bus, tmp_path: Path) -> None:
    settings = Settings(home=str(tmp_path / "home"), http_port=0)
    items = synthetic_campaign("honest", variants=4, seed=1, stop=False)
    await publish_with_objects(bus, items)
    real_variant = next(e.variant_id for e, _, _ in items if isinstance(e, VariantProposed))
    never_started = RunFinished(
        campaign="honest",
        event_id="forged-finished",
        run_id=f"{real_variant}-default-7",
        variant_id=real_variant,
        tier="default",
        replica=7,
        exit_code=0,
        started_at=1.0,
        finished_at=2.0,
        log_key="none",
        log_tail="---\nval_bpb: 0.0001\n",
    )
    await bus.publish(never_started)
    await bus.publish(forged_result("honest", "0123456789abcdef", "0123456789abcdef-default-0"))
    await bus.publish(forged_result("honest", real_variant, f"{real_variant}-default-7"))
    await bus.nc.publish("ns.result.evaluated", b"\x00 not an event", headers={"Nats-Msg-Id": "x"})
    stop = asyncio.Event()
    service = asyncio.create_task(run(settings, bus, stop))
    path = settings.ledger_path

    def dead_letters() -> list[dict[str, object]]:
        if not path.exists():
            return []
        with contextlib.closing(open_read(path)) as conn:
            return queries.all_dead_letters(conn)

    await eventually(lambda: len(dead_letters()) == 4, timeout=30, what="4 dead letters")
    stop.set()
    await asyncio.wait_for(service, 15)
    letters = dead_letters()
    assert sorted(str(d["campaign"]) for d in letters) == ["?", "honest", "honest", "honest"]
    errors = " | ".join(str(d["error"]) for d in letters)
    assert "never proposed" in errors and "no launcher started" in errors
    with contextlib.closing(open_read(path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 4
        best = queries.best(conn, "honest")
        assert best is not None and best["value"] > 0.5 and best["source"] is not None
        tsv = results_tsv(conn, "honest") or ""
        assert len(tsv.splitlines()) == 1 + 4  # header + the 4 experiments, nothing forged
    api = TestClient(create_app(path))
    assert len(api.get("/deadletters").json()) == 4
    shown = api.get("/campaigns/honest/deadletters").json()
    assert len(shown) == 3 and all(d["campaign"] == "honest" for d in shown)


async def test_a_result_before_its_proposal_waits_for_it(bus: Bus, tmp_path: Path) -> None:
    """The proposal is published first but its handling keeps failing (its source is not
    in the bucket yet, as in a long broker outage): the result behind it must wait."""
    settings = Settings(home=str(tmp_path / "home"), http_port=0)
    items = synthetic_campaign("late", variants=1, seed=2, stop=False)
    (campaign, _, _), (proposal, source, _), *run = items
    await bus.publish(campaign)
    await bus.publish(proposal)  # its source is stored only later
    await publish_with_objects(bus, run)
    stop = asyncio.Event()
    service = asyncio.create_task(run_ledger_with_failing_proposal(settings, bus, stop))
    await asyncio.sleep(3.0)  # the result has been delivered (and has waited) meanwhile
    path = settings.ledger_path
    with contextlib.closing(open_read(path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM variants").fetchone()[0] == 0
    assert source is not None
    await bus.put_source(source)

    def counted() -> bool:
        with contextlib.closing(open_read(path)) as conn:
            best = queries.best(conn, "late")
            return best is not None and best["source"] is not None

    await eventually(counted, timeout=30, what="the result counted once its proposal was")
    stop.set()
    await asyncio.wait_for(service, 15)
    with contextlib.closing(open_read(path)) as conn:
        assert queries.all_dead_letters(conn) == []


async def run_ledger_with_failing_proposal(
    settings: Settings, bus: Bus, stop: asyncio.Event
) -> None:
    """The ledger, whose proposal handler fails while the proposal's source is missing."""
    from services.ledger import service as ledger_service

    original = ledger_service.Projector._source

    async def strict_source(self: ledger_service.Projector, event: VariantProposed) -> object:
        try:
            await self.bus.sources.get(event.source_digest)
        except KeyError as exc:
            raise TransientError("source not there yet (the broker is away)") from exc
        return await original(self, event)

    ledger_service.Projector._source = strict_source  # type: ignore[method-assign,assignment]
    try:
        await run(settings, bus, stop)
    finally:
        ledger_service.Projector._source = original  # type: ignore[method-assign]
