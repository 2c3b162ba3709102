"""The ledger's OpenAPI document is true: schemathesis against the real app over the real
ledger of a short sim campaign (real nats-server, the four services, SQLite, HTTP).

Two views of one contract:
- `st run <url>/openapi.json --checks all` (the command the README gives users), over real
  HTTP with a fixed seed and bounded examples: generated and mutated requests in every
  phase (examples, coverage, fuzzing, stateful through the document's links) must find
  zero failures;
- every operation asked with ids that exist (the campaign, its best, a variant with a
  parent, a run) must answer 200 and pass every check, response schema included, so each
  declared model is checked against real rows, not only against 404s.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import uvicorn

from services.broker import EmbeddedNats
from services.bus import Bus
from services.campaign import start_campaign
from services.ledger import queries
from services.ledger.api import create_app
from services.ledger.db import open_read
from services.ledger.service import bind_http
from services.settings import Settings
from services.supervisor import wait_until_consumed
from tests.e2e_helpers import services_running, sim_settings
from tests.eventually import eventually

CAMPAIGN = "contract"
SEED = 20240607
MAX_EXAMPLES = 10  # per operation and phase; the whole run stays well under a minute
ST = Path(sys.executable).with_name("st")
LIVE_FEED = r"^/campaigns/\{name\}/events$"


async def _run_campaign(home: Path) -> Path:
    nats = EmbeddedNats(home / "nats").start()
    try:
        settings = sim_settings(home, nats.url, campaign=CAMPAIGN, max_experiments=12, slots=4)
        bus = await Bus.from_settings(Settings(nats_url=nats.url), "test")
        try:
            async with services_running(settings, nats.url):
                await start_campaign(bus, settings)

                def completed() -> bool:
                    conn = open_read(settings.ledger_path)
                    try:
                        found = queries.campaign(conn, CAMPAIGN)
                    finally:
                        conn.close()
                    return found is not None and found["status"] == "completed"

                await eventually(completed, 90, "the sim campaign to complete")
                await wait_until_consumed(bus, "ledger")
        finally:
            await bus.close()
    finally:
        nats.stop()
    return settings.ledger_path


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ledger file of a finished 12-experiment sim campaign."""
    return asyncio.run(_run_campaign(tmp_path_factory.mktemp("contract")))


@contextmanager
def serving(db: Path) -> Iterator[str]:
    """The ledger's API over `db`, served as the service serves it (its socket, uvicorn),
    in a thread; yields its base URL."""
    sock = bind_http("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(db), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_api_socket_says_tcp() -> None:
    """asyncio sets TCP_NODELAY only on sockets created with IPPROTO_TCP: with the default
    proto 0, Nagle and delayed ACKs cost ~40 ms per keep-alive request (46.6 against 5.3 ms
    measured), which made this very check four times slower."""
    sock = bind_http("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_schemathesis_finds_no_failures(ledger: Path, tmp_path: Path) -> None:
    # Every operation of the document is exercised but the live feed: it streams without
    # end, so each request would wait out the client's timeout (its events' schema and its
    # Last-Event-ID replay are tested in test_dashboard_api.py and the browser tests).
    report = tmp_path / "report.json"
    with serving(ledger) as base:
        done = subprocess.run(
            [
                str(ST),
                "run",
                f"{base}/openapi.json",
                "--checks",
                "all",
                "--exclude-path-regex",
                LIVE_FEED,
                "--seed",
                str(SEED),
                "--max-examples",
                str(MAX_EXAMPLES),
                "--wait-for-schema",
                "10",
                "--report",
                "json",
                "--report-json-path",
                str(report),
            ],
            cwd=tmp_path,  # its .hypothesis and .schemathesis caches stay out of the repo
            capture_output=True,
            text=True,
            timeout=240,
        )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    found: dict[str, Any] = json.loads(report.read_text())
    assert found["complete"] and found["failures"] == [] and found["errors"] == []
    operations = found["operations"]
    assert operations["tested"] == operations["total"] - 1 >= 17  # all but the live feed
    assert {p: v["status"] for p, v in found["phases"].items()} == dict.fromkeys(
        ("examples", "coverage", "fuzzing", "stateful"), "success"
    )
    assert found["test_cases"]["generated"] > 200


def _real_ids(db: Path) -> dict[str, str]:
    conn = open_read(db)
    try:
        best = queries.best(conn, CAMPAIGN, with_source=False)
        assert best is not None, "the sim campaign found no best variant"
        rows = queries.list_variants(conn, CAMPAIGN, sort="time", limit=1000)
        child = next(v for v in rows if v["parent_id"] is not None)
        detail = queries.variant(conn, child["variant_id"])
        assert detail is not None and detail["runs"], child
    finally:
        conn.close()
    return {
        "name": CAMPAIGN,
        "variant_id": child["variant_id"],
        "run_id": detail["runs"][0]["run_id"],
    }


def test_every_operation_answers_real_ids_as_documented(ledger: Path) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(ledger))
    ids = _real_ids(ledger)
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()
        served = operation.definition.raw["responses"].get("200", {}).get("content", {})
        if operation.method != "get" or "text/event-stream" in served:
            continue  # reads only; a stream that never ends is tested on its own
        params = {p.name: ids[p.name] for p in operation.path_parameters}
        case = operation.Case(path_parameters=params)
        response = case.call_and_validate()
        assert response.status_code == 200, (operation.label, response.text)
        checked.append(operation.label)
    assert len(checked) >= 17 and "GET /runs/{run_id}" in checked
