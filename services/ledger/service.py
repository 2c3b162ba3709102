"""The ledger service: project every stored event into SQLite, publish decisions, serve HTTP.

A ledger found empty (a new file, or one on an older schema that `open_db` moved aside)
resets the durable consumer, so the whole stream is replayed into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import uvicorn
from nats.aio.subscription import Subscription

from services import contracts
from services.bus import Bus, Delivery, Handler, PoisonError, TransientError
from services.bus.errors import NATS_FAILURES, while_broker_away
from services.contracts import (
    BestUpdated,
    Event,
    FleetStatus,
    NoiseMeasured,
    ResultEvaluated,
    RunCancel,
    RunFinished,
    RunRequested,
    VariantDecided,
    VariantProposed,
)
from services.ledger import queries
from services.ledger.api import create_app
from services.ledger.batcher import MAX_BATCH, Batcher
from services.ledger.db import open_db
from services.ledger.projection import Pending, seen
from services.ledger.references import Unreferenced
from services.settings import Settings
from services.telemetry import fields_of, get_logger, tracer

DURABLE = "ledger"
# How soon an event that names what is not applied yet is delivered again.
WAIT_RETRY_S = 1.0
# Deliveries in hand at once (their objects are fetched in parallel; applied in order, up
# to a batch of them per transaction). At 64 the ledger applied ~190 events/s live: one
# batch of 64 per round of fetch, apply and acks, while 4,096 slots asked for ~320/s.
CONCURRENCY = MAX_BATCH

# Every event the stream stores (the lossy ones never reach a durable consumer).
LEDGER_EVENTS: tuple[type[Event], ...] = tuple(t for t in contracts.EVENT_TYPES if not t.lossy)

EventT = TypeVar("EventT", bound=Event)


@dataclass(frozen=True)
class Objects:
    """What an event names in the object stores, fetched before it is applied."""

    source_text: str | None = None
    log_text: str | None = None


NO_OBJECTS = Objects()


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the process's `stop` event governs shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class Projector:
    """Fetches the objects an event names, applies it, publishes what it decided.

    Several deliveries may be in hand at once so that their objects are fetched in
    parallel; each handler submits its event once the one delivered before it has, so the
    batcher applies them (and publishes their outboxes) in the order they were delivered.
    """

    def __init__(self, conn: sqlite3.Connection, bus: Bus) -> None:
        self.conn = conn
        self.bus = bus
        # Loggers are made after logging is configured (a module-level one would not be).
        self.log = get_logger(service="ledger")
        self._tail: asyncio.Future[None] | None = None
        self.batcher = Batcher(conn, bus, on_published=self._log_published)

    def handlers(self) -> dict[type[Event], Handler]:
        """The consumer's mapping: every stored event type; the two that name an object
        in the object stores have a handler that fetches it."""
        table: dict[type[Event], Handler] = dict.fromkeys(LEDGER_EVENTS, self.on_event)
        table[VariantProposed] = self.on_variant_proposed
        table[RunFinished] = self.on_run_finished
        return table

    async def on_event(self, event: Event, delivery: Delivery) -> None:
        await self._project(event, delivery, None)

    async def on_variant_proposed(self, event: VariantProposed, delivery: Delivery) -> None:
        await self._project(event, delivery, self._source)

    async def on_run_finished(self, event: RunFinished, delivery: Delivery) -> None:
        await self._project(event, delivery, self._log)

    async def _project(
        self,
        event: EventT,
        delivery: Delivery,
        fetch: Callable[[EventT], Awaitable[Objects]] | None,
    ) -> None:
        """Fetch (in parallel with the others in hand), then submit in delivery order to
        the batcher, which applies and publishes; refused: wait or dead-letter."""
        prev, queued = self._tail, asyncio.get_running_loop().create_future()
        self._tail = queued
        try:
            fetched = NO_OBJECTS
            if fetch is not None and not seen(self.conn, event):
                fetched = await fetch(event)
            if prev is not None:
                await asyncio.shield(prev)
            with tracer().start_as_current_span(
                "record and decide" if isinstance(event, ResultEvaluated) else "record"
            ) as span:
                pending = Pending(event, fetched.source_text, fetched.log_text)
                answer = self.batcher.submit(pending)
                _release_after(queued, prev)  # queued: the next one may follow it
                result = await asyncio.shield(answer)
                if not isinstance(result, Exception):
                    kept = any(isinstance(published, BestUpdated) for published in result)
                    span.set_attribute("best_updated", kept)
        finally:
            _release_after(queued, prev)
        if isinstance(result, Unreferenced):
            await self._refuse(result, delivery)
        if isinstance(result, Exception):
            raise result

    def _log_published(self, event: Event) -> None:
        if isinstance(event, BestUpdated):
            fields = fields_of(event, "campaign", "variant_id", "value", "previous_value", "margin")
            self.log.info("best_updated", **fields)
        elif isinstance(event, VariantDecided):
            fields = fields_of(
                event, "campaign", "variant_id", "decision", "n_candidate", "n_best", "margin"
            )
            self.log.info(
                "variant_decided",
                **fields,
                replicates=event.replicates_requested,
                cancelled=len(event.cancelled_runs),
            )
        elif isinstance(event, RunRequested):
            fields = fields_of(event, "campaign", "run_id", "reason")
            self.log.info("replicate_requested", **fields)
        elif isinstance(event, RunCancel):
            self.log.info("run_cancelled", **fields_of(event, "campaign", "run_id", "reason"))
        elif isinstance(event, NoiseMeasured):
            self.log.info("noise_measured", **fields_of(event, "campaign", "tier", "noise", "dof"))

    async def _refuse(self, exc: Unreferenced, delivery: Delivery) -> NoReturn:
        """Wait for what the event names while an earlier message is unhandled (it may be
        the one that names it: redeliver); once none is, the event has nothing to stand on
        (dead-letter it: never counted, never the best)."""
        if not exc.definitive:
            try:
                lag = await self.bus.consumer_lag(DURABLE)
            except NATS_FAILURES as away:
                raise TransientError(f"{exc.reason}; broker away: {away!r}") from away
            if lag is None or lag.acked_seq < delivery.stream_seq - 1:
                # Soon again: the earlier message may be one that waits too (a forged
                # RunFinished before its forged result), and they resolve one by one.
                raise TransientError(f"{exc.reason}; waiting for it", retry_in_s=WAIT_RETRY_S)
        raise PoisonError(f"{exc.reason}: not counted")

    async def _source(self, event: VariantProposed) -> Objects:
        row = self.conn.execute(
            "SELECT 1 FROM sources WHERE digest = ?", (event.source_digest,)
        ).fetchone()
        if row is not None:
            return NO_OBJECTS  # already stored
        try:
            data = await self.bus.sources.get(event.source_digest)
        except KeyError:
            self.log.warning(
                "source_missing",
                campaign=event.campaign,
                variant_id=event.variant_id,
                digest=event.source_digest,
            )
            return NO_OBJECTS
        return Objects(source_text=data.decode())

    async def _log(self, event: RunFinished) -> Objects:
        if not event.log_key:
            return NO_OBJECTS
        try:
            data = await self.bus.logs.get(event.log_key)
        except KeyError:
            self.log.warning(
                "log_missing", campaign=event.campaign, run_id=event.run_id, log_key=event.log_key
            )
            return NO_OBJECTS
        return Objects(log_text=data.decode(errors="replace"))


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
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets that say TCP,
    # and without it Nagle's algorithm and delayed ACKs add ~40 ms to every keep-alive request.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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
    lag = await while_broker_away(
        lambda: bus.consumer_lag(DURABLE), what="ledger consumer info", timeout_s=None
    )
    if lag is None or lag.delivered_seq == 0:
        return
    get_logger(service="ledger").info("ledger_rebuild", from_stream_seq=lag.delivered_seq)
    await bus.reset_consumer(DURABLE)


async def run(settings: Settings, bus: Bus, stop: asyncio.Event) -> None:
    log = get_logger(service="ledger")
    path = settings.ledger_path
    app = create_app(path, settings, bus)
    sock = bind_http(settings.http_host, settings.http_port)
    try:
        conn = open_db(path)
    except BaseException:  # LedgerError (a newer schema), sqlite3.Error: free the port first
        sock.close()
        raise
    server = _Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    http = asyncio.create_task(server.serve(sockets=[sock]))
    url, url_file = _url(sock), path.parent / "ledger.url"
    fleet_subs: list[Subscription] = []
    try:
        fleet_subs = await bus.subscribe_lossy({FleetStatus: app.state.fleet.on_status})
        url_file.write_text(url + "\n")
        log.info("http_listening", url=url, ledger=str(path))
        if queries.events_applied(conn) == 0:
            await _replay_from_start(bus)
        projector = Projector(conn, bus)
        await bus.consume(
            DURABLE,
            projector.handlers(),
            concurrency=CONCURRENCY,
            ack_wait_s=settings.ack_wait_s,
            stop=stop,
        )
    finally:
        app.state.closing.set()  # live feeds end, so the server can stop
        for sub in fleet_subs:
            with contextlib.suppress(*NATS_FAILURES):
                await sub.unsubscribe()
        server.should_exit = True
        try:
            await asyncio.wait_for(http, timeout=10.0)
        except TimeoutError:
            server.force_exit = True
        except Exception as exc:
            # Last resort: whatever the API server died of (uvicorn's own failure, not a
            # known type) is logged with its address and re-raised; the cleanup below runs.
            log.error("http_failed", url=url, error=repr(exc))
            raise
        finally:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                if url_file.read_text().strip() == url:
                    url_file.unlink()
            conn.close()
