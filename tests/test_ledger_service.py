"""The ledger service end to end on a real nats-server: events in; SQLite, BestUpdated, HTTP out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from services.bus import Bus
from services.contracts import AnyEvent, BestUpdated, RunFinished, VariantProposed
from services.ledger import queries
from services.ledger.db import open_db, open_read
from services.ledger.projection import apply_event
from services.ledger.service import bind_http, run
from services.ledger.synthetic import synthetic_campaign
from services.settings import Settings


async def _until(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)


async def test_service_projects_events_and_publishes_best(bus: Bus, tmp_path: Path) -> None:
    settings = Settings(home=str(tmp_path / "home"), http_port=0)
    stop = asyncio.Event()
    service = asyncio.create_task(run(settings, bus, stop))
    best_seen: list[BestUpdated] = []

    async def on_best(event: AnyEvent, seq: int) -> None:
        assert isinstance(event, BestUpdated)
        best_seen.append(event)

    follow_stop = asyncio.Event()
    follower = asyncio.create_task(bus.follow([BestUpdated], on_best, stop=follow_stop))
    try:
        items = synthetic_campaign("e2e", variants=6, seed=4)
        for event, source, log in items:
            if isinstance(event, VariantProposed) and source is not None:
                assert await bus.put_source(source) == event.source_digest
            if isinstance(event, RunFinished) and log is not None:
                await bus.put_object(bus.logs_bucket, event.log_key, log.encode())
            await bus.publish(event)
        for event, _, _ in items[:4]:  # a duplicate publish is dropped or applied once
            await bus.publish(event)

        path = settings.ledger_path
        await _until(path.exists)

        def campaign_done() -> bool:
            with contextlib.closing(open_read(path)) as conn:
                found = queries.campaign(conn, "e2e")
                return found is not None and found["status"] == "completed"

        await _until(campaign_done)
        with contextlib.closing(open_read(path)) as conn:
            best = queries.best(conn, "e2e")
            variants = queries.list_variants(conn, "e2e")
            assert best is not None and best["source"] is not None
            assert len(variants) == 6
            logged = queries.run_log(conn, f"{best['variant_id']}-default-0")
            assert logged is not None and "val_bpb:" in logged
            projected = (queries.list_variants(conn, "e2e"), queries.best_history(conn, "e2e"),
                         queries.results_tsv(conn, "e2e"))
        # deliveries are handled concurrently but applied in order: as if applied one by one
        with contextlib.closing(open_db(tmp_path / "serial.db")) as serial:
            for event, source, log in items:
                apply_event(serial, event, source_text=source, log_text=log)
            assert projected == (queries.list_variants(serial, "e2e"),
                                 queries.best_history(serial, "e2e"),
                                 queries.results_tsv(serial, "e2e"))
        await _until(lambda: bool(best_seen) and best_seen[-1].variant_id == best["variant_id"])

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
                return bool(queries.run_log(conn, run_id)) and bool(
                    queries.best(conn, "tail"))

        await _until(has_tail)
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


async def test_empty_ledger_rebuilds_from_the_stream(bus: Bus, tmp_path: Path) -> None:
    settings = Settings(ledger_db=str(tmp_path / "ledger.db"), http_port=0)
    items = synthetic_campaign("rebuild", variants=3)
    for event, _, _ in items:
        await bus.publish(event)

    async def project_all() -> int:
        """Run the service until it applied every message in the stream."""
        stop = asyncio.Event()
        service = asyncio.create_task(run(settings, bus, stop))
        try:
            deadline = asyncio.get_running_loop().time() + 15
            while True:
                stored = (await bus.js.stream_info(bus.stream)).state.messages
                applied = _applied(settings.ledger_path)
                if applied > len(items) and applied == stored:
                    return applied
                assert asyncio.get_running_loop().time() < deadline, (applied, stored)
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.wait_for(service, timeout=15)

    first = await project_all()
    _remove_db(settings.ledger_path)
    assert await project_all() == first  # BestUpdated republished with the same ids: deduped


def test_http_port_in_use_names_the_setting() -> None:
    taken = bind_http("127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match="NIGHTSHIFT_HTTP_PORT"):
            bind_http("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
