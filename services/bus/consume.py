"""Durable pull consumers with typed dispatch: `{EventType: handler}`.

A consumer is declared with the event types it handles; the subjects it filters on are
derived from those types, and each handler is called with its concrete type. Several
processes sharing a durable split the messages (work-queue semantics).

A handler that returns has made its effect durable, so the message is acked; one that
raises is naked with a growing delay (TransientError: as often as it takes, the handler
waits for a dependency); one that raises PoisonError, or fails otherwise on every
allowed delivery, or whose payload is not an event, is recorded as a DeadLettered event and
terminated, so it never blocks the messages behind it. While a handler runs, the message is
kept alive with `in_progress()` heartbeats (a 5-minute run outlives any ack wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext
from opentelemetry import trace

from services import contracts
from services.bus.errors import NATS_FAILURES, PoisonError, TransientError, while_broker_away
from services.contracts import ContractError, DeadLettered, Event
from services.telemetry import event_span_attributes, extract_trace, get_logger, tracer

log = get_logger(component="bus")

Publish = Callable[[Event], Awaitable[None]]


@dataclass(frozen=True)
class Delivery:
    """Where a consumed event came from."""

    subject: str
    stream_seq: int
    num_delivered: int


# A handler receives its concrete event type (the mapping's key) and where it came from.
Handler = Callable[[Any, Delivery], Awaitable[None]]
Handlers = Mapping[type[Event], Handler]


def handlers_of(*handlers: Handler) -> dict[type[Event], Handler]:
    """The `{EventType: handler}` mapping of handlers that name their event type in their
    signature (`async def on_x(self, event: X, delivery: Delivery)`)."""
    table: dict[type[Event], Handler] = {}
    for handler in handlers:
        first = next(iter(inspect.signature(handler).parameters))
        table[typing.get_type_hints(handler)[first]] = handler
    return table


def handlers_on(obj: object) -> dict[type[Event], Handler]:
    """`handlers_of` every `on_*` method of `obj`: a recorder or view whose handlers are
    all its `on_*` methods declares them once, by defining them."""
    return handlers_of(*(getattr(obj, name) for name in dir(obj) if name.startswith("on_")))


def filter_subjects(handlers: Handlers, prefix: str) -> list[str]:
    """The subjects a consumer of these event types listens on."""
    return [event_type.subject_filter(prefix) for event_type in handlers]


STRAGGLER_WAIT_S = 0.05  # a queued message is returned at once; this bounds the rare miss


async def fetch_available(psub: Any, batch: int, timeout: float) -> list[Msg]:
    """Up to `batch` messages, returning as soon as at least one is there.

    nats-py's fetch(n) long-polls until n messages arrive or the request expires, so a
    consumer waiting for several would sit out the whole timeout while one message waits:
    wait for one, then take whatever else is already pending without waiting.
    """
    msgs: list[Msg] = await psub.fetch(1, timeout=timeout)
    if batch > 1:
        # Short: when nothing more is there, nats-py follows its no-wait probe with a
        # lingering request for the rest of this deadline. Replies that arrive after it
        # land in the subscription's queue (hand_back_stragglers).
        with contextlib.suppress(nats.errors.TimeoutError, asyncio.TimeoutError):
            msgs.extend(await psub.fetch(batch - 1, timeout=0.05))
    return msgs


async def hand_back_stragglers(psub: Any) -> int:
    """Give the server back the messages already delivered into this client's queue (a
    request's late replies) that a full consumer cannot handle now: a nak makes each
    deliverable at once, to another consumer of the durable with room, or to this one when
    it has room again. `fetch(1)` returns a queued message without a new request.

    Left in the queue they had no heartbeat: past ack_wait the server delivered them again,
    to another launcher, and this one ran them too when it had room (9 runs twice in 12,288
    at 4,096 slots, their first results not counted). Taken over the limit instead, a
    launcher held hundreds of them (346 once, during a 4,096-slot fill) that the other
    launcher had free slots for."""
    handed = 0
    for _ in range(psub.pending_msgs):
        with contextlib.suppress(nats.errors.TimeoutError, asyncio.TimeoutError):
            for msg in await psub.fetch(1, timeout=STRAGGLER_WAIT_S):
                await _settle(msg.nak(), what="nak")
                handed += 1
    return handed


@dataclass
class MessageRunner:
    """Handles one message: decode, dispatch by type, heartbeat, ack / nak / term."""

    publish: Publish
    consumer: str
    handlers: Handlers
    ack_wait_s: float
    max_deliver: int

    @property
    def heartbeat_s(self) -> float:
        """How often a long handler tells the server it is still working on a message."""
        return max(self.ack_wait_s / 3.0, 0.2)

    async def handle(self, msg: Msg) -> None:
        meta = msg.metadata
        delivery = Delivery(msg.subject, meta.sequence.stream, meta.num_delivered)
        try:
            event = contracts.decode(msg.data)
        except ContractError as exc:
            await self.dead_letter(msg, delivery, str(exc))
            return
        handler = self.handlers.get(type(event))
        if handler is None:  # a type this consumer does not handle: nothing to do
            await _settle(msg.ack())
            return
        beat = asyncio.create_task(self._heartbeat(msg))
        try:
            with tracer().start_as_current_span(
                f"handle {type(event).__name__}",
                context=extract_trace(msg.headers),
                kind=trace.SpanKind.CONSUMER,
                attributes={**event_span_attributes(event), "consumer": self.consumer},
            ):
                await handler(event, delivery)
        except PoisonError as exc:
            await self.dead_letter(msg, delivery, str(exc))
            return
        except Exception as exc:  # any handler failure: redeliver, then dead-letter
            await self._failed(msg, delivery, exc)
            return
        finally:
            beat.cancel()
        await _settle(msg.ack(), what="ack", stream_seq=delivery.stream_seq)

    async def _failed(self, msg: Msg, delivery: Delivery, exc: Exception) -> None:
        """Redeliver later; a handler that keeps failing (not a TransientError, which waits
        for its dependency however long it takes) is dead-lettered after max_deliver."""
        transient = isinstance(exc, TransientError)
        if not transient and delivery.num_delivered >= self.max_deliver:
            await self.dead_letter(
                msg, delivery, f"failed on all {self.max_deliver} deliveries: {exc!r}"
            )
            return
        delay = min(0.5 * 2 ** (delivery.num_delivered - 1), 15.0)
        if isinstance(exc, TransientError) and exc.retry_in_s is not None:
            delay = exc.retry_in_s
        level = log.info if transient else log.warning
        level(
            "handler_failed",
            consumer=self.consumer,
            subject=delivery.subject,
            stream_seq=delivery.stream_seq,
            delivery=delivery.num_delivered,
            error=repr(exc),
            retry_in_s=delay,
        )
        await _settle(msg.nak(delay=delay), what="nak", stream_seq=delivery.stream_seq)

    async def _heartbeat(self, msg: Msg) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(self.heartbeat_s)
                await _settle(msg.in_progress())

    async def dead_letter(self, msg: Msg, delivery: Delivery, error: str) -> None:
        """Record the message as dead, then terminate it (or nak if it cannot be recorded)."""
        campaign = "?"
        with contextlib.suppress(msgspec.DecodeError, AttributeError):
            campaign = str(msgspec.json.decode(msg.data).get("campaign", "?"))
        record = DeadLettered(
            campaign=campaign,
            event_id=contracts.event_id_for("dead", self.consumer, delivery.stream_seq),
            subject_name=delivery.subject,
            stream_seq=delivery.stream_seq,
            consumer=self.consumer,
            error=error[:2000],
            payload_preview=msg.data[:500].decode(errors="replace"),
        )
        try:
            await self.publish(record)
        except TransientError as exc:
            log.error("dead_letter_failed", stream_seq=delivery.stream_seq, error=repr(exc))
            await _settle(msg.nak(delay=5.0))
            return
        log.error(
            "message_dead_lettered",
            consumer=self.consumer,
            subject=delivery.subject,
            stream_seq=delivery.stream_seq,
            error=error[:500],
        )
        await _settle(msg.term(), what="term", stream_seq=delivery.stream_seq)


async def _settle(call: Awaitable[None], what: str = "", stream_seq: int = 0) -> None:
    """Ack, nak, term or heartbeat; with the broker away the server redelivers on its own."""
    try:
        await call
    except NATS_FAILURES as exc:
        if what:
            log.warning("message_settle_failed", op=what, stream_seq=stream_seq, error=repr(exc))


@dataclass(frozen=True)
class ConsumerOptions:
    concurrency: int | Callable[[], int] = 1
    ack_wait_s: float = 30.0
    max_deliver: int = 5


async def consume(
    js: JetStreamContext,
    stream: str,
    config: api.ConsumerConfig,
    runner: MessageRunner,
    options: ConsumerOptions,
    stop: asyncio.Event,
) -> None:
    """Fetch and hand messages to `runner` until `stop`; then let those in hand finish."""
    durable = config.durable_name or ""

    async def bind() -> Any:
        await js.add_consumer(stream, config)
        return await js.pull_subscribe_bind(durable=durable, stream=stream)

    # A service waits for the broker as long as it takes: it ends only when stopped.
    psub = await while_broker_away(bind, what=f"bind consumer {durable}", timeout_s=None)
    in_hand: set[asyncio.Task[None]] = set()
    freed = asyncio.Event()
    while not stop.is_set():
        limit = options.concurrency() if callable(options.concurrency) else options.concurrency
        free = limit - len(in_hand)
        if free <= 0:
            if psub.pending_msgs:
                handed = await hand_back_stragglers(psub)
                log.info("late_replies_handed_back", consumer=durable, count=handed)
            freed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(freed.wait(), timeout=1.0)
            continue
        try:
            msgs = await fetch_available(psub, free, timeout=1.0)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        except NATS_FAILURES as exc:  # broker away, consumer recreated
            log.warning("fetch_failed", consumer=durable, error=repr(exc))
            await asyncio.sleep(0.5)
            with contextlib.suppress(*NATS_FAILURES):
                await js.add_consumer(stream, config)
            continue
        for msg in msgs:
            task = asyncio.create_task(runner.handle(msg))
            in_hand.add(task)
            task.add_done_callback(in_hand.discard)
            task.add_done_callback(lambda _: freed.set())
    if in_hand:
        await asyncio.gather(*in_hand, return_exceptions=True)
    with contextlib.suppress(*NATS_FAILURES):
        await psub.unsubscribe()
