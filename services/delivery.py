"""Handling one JetStream delivery: decode, heartbeat, run the handler, ack/nak/term.

Used by `Bus.consume`. A handler that returns has made its effect durable, so the message
is acked; one that raises is naked with a growing delay; one that raises PoisonError, or
fails on every allowed delivery, or whose payload is not an event, is recorded as a
DeadLettered event and terminated, so it never blocks the messages behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
from nats.aio.msg import Msg
from opentelemetry import trace

from services import contracts
from services.contracts import AnyEvent, ContractError, DeadLettered, Event
from services.telemetry import extract_trace, get_logger, tracer

log = get_logger(component="bus")


class TransientError(Exception):
    """The handler could not finish now (a dependency is away); redeliver after a delay."""


class PoisonError(Exception):
    """The message can never be handled; dead-letter it at once."""


@dataclass(frozen=True)
class Delivery:
    """Where a consumed event came from."""

    subject: str
    stream_seq: int
    num_delivered: int


Handler = Callable[[AnyEvent, Delivery], Awaitable[None]]


async def fetch_available(psub: Any, batch: int, timeout: float) -> list[Msg]:
    """Up to `batch` messages, returning as soon as at least one is there.

    nats-py's fetch(n) long-polls until n messages arrive or the request expires, so a
    consumer waiting for several would sit out the whole timeout while one message waits:
    wait for one, then take whatever else is already pending without waiting.
    """
    msgs: list[Msg] = await psub.fetch(1, timeout=timeout)
    if batch > 1:
        with contextlib.suppress(nats.errors.TimeoutError, asyncio.TimeoutError):
            msgs.extend(await psub.fetch(batch - 1, timeout=0.05))
    return msgs


def release_slot(in_hand: set[asyncio.Task[None]], freed: asyncio.Event, task: asyncio.Task[None]) -> None:
    in_hand.discard(task)
    freed.set()


class MessageRunner:
    """Handles one message: decode, heartbeat, call the handler, ack/nak/term."""

    def __init__(
        self, publish: Callable[[Event], Awaitable[None]], consumer: str, handler: Handler,
        ack_wait_s: float, max_deliver: int,
    ) -> None:
        self.publish = publish
        self.consumer = consumer
        self.handler = handler
        self.heartbeat_s = max(ack_wait_s / 3.0, 0.2)
        self.max_deliver = max_deliver

    async def handle(self, msg: Msg) -> None:
        meta = msg.metadata
        delivery = Delivery(msg.subject, meta.sequence.stream, meta.num_delivered)
        try:
            event = contracts.decode(msg.data)
        except ContractError as exc:
            await self.dead_letter(msg, delivery, str(exc))
            return
        beat = asyncio.create_task(self._heartbeat(msg))
        ctx = extract_trace(msg.headers)
        try:
            with tracer().start_as_current_span(
                f"handle {type(event).__name__}", context=ctx, kind=trace.SpanKind.CONSUMER,
                attributes={"campaign": event.campaign, "consumer": self.consumer},
            ):
                await self.handler(event, delivery)
        except PoisonError as exc:
            beat.cancel()
            await self.dead_letter(msg, delivery, str(exc))
            return
        except Exception as exc:
            beat.cancel()
            await self._failed(msg, delivery, exc)
            return
        beat.cancel()
        try:
            await msg.ack()
        except Exception as exc:  # the effect is durable; a redelivery is idempotent
            log.warning("ack_failed", consumer=self.consumer, stream_seq=delivery.stream_seq,
                        error=repr(exc))

    async def _failed(self, msg: Msg, delivery: Delivery, exc: Exception) -> None:
        if delivery.num_delivered >= self.max_deliver:
            await self.dead_letter(
                msg, delivery, f"failed on all {self.max_deliver} deliveries: {exc!r}"
            )
            return
        delay = min(0.5 * 2 ** (delivery.num_delivered - 1), 15.0)
        log.warning(
            "handler_failed", consumer=self.consumer, subject=delivery.subject,
            stream_seq=delivery.stream_seq, delivery=delivery.num_delivered,
            error=repr(exc), retry_in_s=delay,
        )
        with contextlib.suppress(Exception):
            await msg.nak(delay=delay)

    async def _heartbeat(self, msg: Msg) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(self.heartbeat_s)
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    async def dead_letter(self, msg: Msg, delivery: Delivery, error: str) -> None:
        """Record the message as dead, then terminate it (or nak if it cannot be recorded)."""
        campaign = "?"
        with contextlib.suppress(Exception):
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
        except Exception as exc:
            log.error("dead_letter_failed", stream_seq=delivery.stream_seq, error=repr(exc))
            with contextlib.suppress(Exception):
                await msg.nak(delay=5.0)
            return
        log.error("message_dead_lettered", consumer=self.consumer, subject=delivery.subject,
                  stream_seq=delivery.stream_seq, error=error[:500])
        with contextlib.suppress(Exception):
            await msg.term()


