"""The ledger service: project every stored event into SQLite, publish BestUpdated, serve HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
from collections.abc import Generator

import nats.js.errors
import uvicorn

from services import contracts
from services.bus import Bus, Delivery
from services.contracts import AnyEvent, Event, RunFinished, VariantProposed
from services.ledger import queries
from services.ledger.api import create_app
from services.ledger.db import open_db
from services.ledger.projection import apply_event, seen
from services.settings import Settings
from services.telemetry import get_logger

DURABLE = "ledger"
# Deliveries in hand at once (their objects are fetched in parallel; applied in order).
CONCURRENCY = 64

# Every event the stream stores (the lossy ones never reach a durable consumer).
LEDGER_EVENTS: list[type[Event]] = [t for t in contracts.EVENT_TYPES if not t.lossy]


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the process's `stop` event governs shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class Projector:
    """Fetches the objects an event names, applies it, publishes what it decided.

    Several deliveries may be in hand at once so that their objects are fetched in
    parallel, but events are applied (and their outbox published) one at a time, in the
    order they were delivered: each handler waits for the one delivered before it.
    """

    def __init__(self, conn: sqlite3.Connection, bus: Bus) -> None:
        self.conn = conn
        self.bus = bus
        # Loggers are made after logging is configured (a module-level one would not be).
        self.log = get_logger(service="ledger")
        self._tail: asyncio.Future[None] | None = None

    async def handle(self, event: AnyEvent, delivery: Delivery | None = None) -> None:
        prev, done = self._tail, asyncio.get_running_loop().create_future()
        self._tail = done
        try:
            source_text, log_text = await self._fetch(event)
            if prev is not None:
                await asyncio.shield(prev)
            outbox = apply_event(self.conn, event, source_text=source_text, log_text=log_text)
            for out in outbox:
                await self.bus.publish(out)
                if isinstance(out, contracts.BestUpdated):
                    self.log.info("best_updated", campaign=out.campaign,
                                  variant_id=out.variant_id, value=out.value,
                                  previous_value=out.previous_value)
        finally:
            _release_after(done, prev)

    async def _fetch(self, event: AnyEvent) -> tuple[str | None, str | None]:
        if seen(self.conn, event):
            return None, None
        if isinstance(event, VariantProposed):
            return await self._source(event), None
        if isinstance(event, RunFinished) and event.log_key:
            return None, await self._log(event)
        return None, None

    async def _source(self, event: VariantProposed) -> str | None:
        row = self.conn.execute(
            "SELECT 1 FROM sources WHERE digest = ?", (event.source_digest,)
        ).fetchone()
        if row is not None:
            return None  # already stored
        try:
            data = await self.bus.get_object(self.bus.sources_bucket, event.source_digest)
            return data.decode()
        except KeyError:
            self.log.warning("source_missing", campaign=event.campaign,
                             variant_id=event.variant_id, digest=event.source_digest)
            return None

    async def _log(self, event: RunFinished) -> str | None:
        try:
            data = await self.bus.get_object(self.bus.logs_bucket, event.log_key)
        except KeyError:
            self.log.warning("log_missing", campaign=event.campaign, run_id=event.run_id,
                             log_key=event.log_key)
            return None
        return data.decode(errors="replace")


def _release_after(done: asyncio.Future[None], prev: asyncio.Future[None] | None) -> None:
    """Let the next handler go once this one and every one before it are through."""
    if done.done():
        return
    if prev is None or prev.done():
        done.set_result(None)
    else:
        prev.add_done_callback(lambda _: _release_after(done, None))


def bind_http(host: str, port: int) -> socket.socket:
    """Bind the API's socket (port 0: any free port), with an actionable error when taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(
            f"ledger HTTP API cannot listen on {host}:{port}: {exc.strerror}; another nightshift "
            "may be running, or set NIGHTSHIFT_HTTP_PORT (0 picks a free port)"
        ) from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host == "0.0.0.0" else host
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


async def _replay_from_start(bus: Bus) -> None:
    """An empty ledger rebuilds from the whole stream: drop a durable that is further along."""
    try:
        info = await bus.js.consumer_info(bus.stream, DURABLE)
    except nats.js.errors.NotFoundError:
        return
    if info.delivered is not None and (info.delivered.stream_seq or 0) > 0:
        get_logger(service="ledger").info("ledger_rebuild",
                                          from_stream_seq=info.delivered.stream_seq)
        await bus.js.delete_consumer(bus.stream, DURABLE)


async def run(settings: Settings, bus: Bus, stop: asyncio.Event) -> None:
    log = get_logger(service="ledger")
    path = settings.ledger_path
    sock = bind_http(settings.http_host, settings.http_port)
    try:
        conn = open_db(path)
    except BaseException:
        sock.close()
        raise
    server = _Server(uvicorn.Config(create_app(path), log_level="warning", lifespan="off"))
    http = asyncio.create_task(server.serve(sockets=[sock]))
    url, url_file = _url(sock), path.parent / "ledger.url"
    try:
        url_file.write_text(url + "\n")
        log.info("http_listening", url=url, ledger=str(path))
        if queries.events_applied(conn) == 0:
            await _replay_from_start(bus)
        await bus.consume(DURABLE, LEDGER_EVENTS, Projector(conn, bus).handle,
                          concurrency=CONCURRENCY, stop=stop)
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(http, timeout=10.0)
        except TimeoutError:
            server.force_exit = True
        except Exception as exc:
            log.error("http_failed", url=url, error=repr(exc))
        finally:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                if url_file.read_text().strip() == url:
                    url_file.unlink()
            conn.close()
