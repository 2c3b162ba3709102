"""The ledger service end to end on a real nats-server: events in; SQLite, BestUpdated, HTTP out."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import httpx
import pytest

from services.bus import Bus, Delivery
from services.contracts import BestUpdated, RunFinished, VariantProposed
from services.ledger import queries, tsv
from services.ledger.db import SCHEMA_VERSION, open_db, open_read
from services.ledger.projection import apply_event
from services.ledger.service import bind_http, run
from services.settings import Settings
from tests.eventually import eventually
from tests.synthetic import Item, synthetic_campaign


def _views(conn: sqlite3.Connection, campaign: str) -> tuple[object, ...]:
    """What a user sees of a campaign: its variants, best history and results.tsv."""
    return (
        queries.list_variants(conn, campaign),
        queries.best_history(conn, campaign),
        tsv.results_tsv(conn, campaign),
    )


async def publish_with_objects(bus: Bus, items: list[Item]) -> None:
    """Publish a campaign's events, each after the source or log it names is stored."""
    for event, source, log in items:
        if isinstance(event, VariantProposed) and source is not None:
            assert await bus.put_source(source) == event.source_digest
        if isinstance(event, RunFinished) and log is not None:
            await bus.logs.put(event.log_key, log.encode())
        await bus.publish(event)


async def test_service_projects_events_and_publishes_best(bus: Bus, tmp_path: Path) -> None:
    settings = Settings(home=str(tmp_path / "home"), http_port=0)
    stop = asyncio.Event()
    service = asyncio.create_task(run(settings, bus, stop))
    best_seen: list[BestUpdated] = []

    async def on_best(event: BestUpdated, _: Delivery) -> None:
        best_seen.append(event)

    follow_stop = asyncio.Event()
    follower = asyncio.create_task(bus.follow({BestUpdated: on_best}, stop=follow_stop))
    try:
        items = synthetic_campaign("e2e", variants=6, seed=4)
        await publish_with_objects(bus, items)
        for event, _, _ in items[:4]:  # a duplicate publish is dropped or applied once
            await bus.publish(event)

        path = settings.ledger_path
        await eventually(path.exists, timeout=15, what="the ledger file")

        def campaign_done() -> bool:
            with contextlib.closing(open_read(path)) as conn:
                found = queries.campaign(conn, "e2e")
                return found is not None and found["status"] == "completed"

        await eventually(campaign_done, timeout=15, what="campaign e2e completed")
        with contextlib.closing(open_read(path)) as conn:
            best = queries.best(conn, "e2e")
            variants = queries.list_variants(conn, "e2e")
            assert best is not None and best["source"] is not None
            assert len(variants) == 6
            logged = queries.run_log(conn, f"{best['variant_id']}-default-0")
            assert logged is not None and "val_bpb:" in logged
            projected = _views(conn, "e2e")
        # deliveries are handled concurrently but applied in order: as if applied one by one
        with contextlib.closing(open_db(tmp_path / "serial.db")) as serial:
            for event, source, log in items:
                apply_event(serial, event, source_text=source, log_text=log)
            assert projected == _views(serial, "e2e")
        await eventually(
            lambda: bool(best_seen) and best_seen[-1].variant_id == best["variant_id"],
            timeout=15,
            what="the BestUpdated of the best variant",
        )

        url = (path.parent / "ledger.url").read_text().strip()
        async with httpx.AsyncClient(base_url=url) as http:
            health = await http.get("/healthz")
            assert health.status_code == 200 and health.json()["ok"] is True
            remote = (await http.get("/campaigns/e2e/best")).json()
            assert remote["variant_id"] == best["variant_id"]
    finally:
        stop.set()
        follow_stop.set()
        await asyncio.wait_for(service, timeout=15)
        await asyncio.wait_for(follower, timeout=15)
    assert not (settings.ledger_path.parent / "ledger.url").exists()


async def test_service_keeps_tail_when_log_object_missing(bus: Bus, tmp_path: Path) -> None:
    settings = Settings(ledger_db=str(tmp_path / "l" / "ledger.db"), http_port=0)
    stop = asyncio.Event()
    service = asyncio.create_task(run(settings, bus, stop))
    try:
        items = synthetic_campaign("tail", variants=1, stop=False)
        for event, _, _ in items:  # neither the source nor the log is in the object stores
            await bus.publish(event)
        run_id = next(e.run_id for e, _, _ in items if isinstance(e, RunFinished))

        def has_tail() -> bool:
            if not settings.ledger_path.exists():
                return False
            with contextlib.closing(open_read(settings.ledger_path)) as conn:
                return bool(queries.run_log(conn, run_id)) and bool(queries.best(conn, "tail"))

        await eventually(has_tail, timeout=15, what="the run's log tail and best")
        with contextlib.closing(open_read(settings.ledger_path)) as conn:
            assert "val_bpb" in (queries.run_log(conn, run_id) or "")
            best = queries.best(conn, "tail")
            assert best is not None and best["source"] is None
    finally:
        stop.set()
        await asyncio.wait_for(service, timeout=15)


def _remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)


def _applied(path: Path) -> int:
    if not path.exists():
        return 0
    with contextlib.closing(open_read(path)) as conn:
        return queries.events_applied(conn)


def stream_length(items: list[Item], tmp_path: Path) -> int:
    """Messages in the stream once the ledger projected `items`: they and its BestUpdated."""
    with contextlib.closing(open_db(tmp_path / "serial.db")) as serial:
        published = [apply_event(serial, e, source_text=s, log_text=t) for e, s, t in items]
    return len(items) + sum(len(outbox) for outbox in published)


async def project_all(settings: Settings, bus: Bus, expected: int) -> None:
    """Run the service until it applied `expected` events."""
    stop = asyncio.Event()
    service = asyncio.create_task(run(settings, bus, stop))
    started = settings.ledger_path.parent / "ledger.url"  # written once the ledger is open
    try:
        await eventually(started.exists, timeout=15, what="the ledger service started")
        await eventually(
            lambda: _applied(settings.ledger_path) == expected,
            timeout=15,
            what=f"{expected} events applied",
        )
    finally:
        stop.set()
        await asyncio.wait_for(service, timeout=15)


def _projected(path: Path, campaign: str) -> tuple[object, ...]:
    with contextlib.closing(open_read(path)) as conn:
        return (*_views(conn, campaign), queries.best(conn, campaign))


async def test_empty_ledger_rebuilds_from_the_stream(bus: Bus, tmp_path: Path) -> None:
    settings = Settings(ledger_db=str(tmp_path / "ledger.db"), http_port=0)
    items = synthetic_campaign("rebuild", variants=3)
    for event, _, _ in items:
        await bus.publish(event)
    expected = stream_length(items, tmp_path)

    await project_all(settings, bus, expected)
    assert await bus.last_seq() == expected
    _remove_db(settings.ledger_path)
    await project_all(settings, bus, expected)
    assert await bus.last_seq() == expected  # BestUpdated republished with the same ids: deduped


async def test_ledger_on_an_older_schema_rebuilds_from_the_stream(bus: Bus, tmp_path: Path) -> None:
    settings = Settings(ledger_db=str(tmp_path / "ledger.db"), http_port=0)
    items = synthetic_campaign("older", variants=4)
    await publish_with_objects(bus, items)
    expected = stream_length(items, tmp_path)
    await project_all(settings, bus, expected)  # its durable consumer is at the stream's end
    before = _projected(settings.ledger_path, "older")

    # the same rows, on the schema of an older build: a column missing, version 0
    with contextlib.closing(sqlite3.connect(settings.ledger_path)) as old:
        old.execute("ALTER TABLE runs DROP COLUMN infra_reason")
        old.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
        old.commit()

    await project_all(settings, bus, expected)  # every row again, from the stream
    assert await bus.last_seq() == expected
    assert len(list(tmp_path.glob("ledger.db.v0-*.bak"))) == 1  # the old file, kept aside
    assert _projected(settings.ledger_path, "older") == before
    with contextlib.closing(open_read(settings.ledger_path)) as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert "infra_reason" in columns and version[0] == str(SCHEMA_VERSION)


def test_http_port_in_use_names_the_setting() -> None:
    taken = bind_http("127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match="NIGHTSHIFT_HTTP_PORT"):
            bind_http("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
