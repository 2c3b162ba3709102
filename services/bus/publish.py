"""Publishing one event: to the stream (deduplicated by its id), or over core NATS if lossy.

The event's deterministic id travels as `Nats-Msg-Id`, so a retried or repeated publish is
stored once; the current trace context travels in the headers, so one experiment is one
trace across the services.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Iterable
from typing import TypeVar

import msgspec
from nats.aio.client import Client
from nats.js.client import JetStreamContext

from services import contracts
from services.bus.errors import BROKER_AWAY, while_broker_away
from services.contracts import Event
from services.telemetry import inject_trace

PUBLISH_ACK_TIMEOUT_S = 2.0
# Publishes (or object puts) in flight at once when many go out together: each is sent as
# soon as it starts, in order, and the acknowledgements are awaited together, so a wave of
# 1,000 costs a few round trips instead of 1,000.
PIPELINE = 256

T = TypeVar("T")


async def publish_event(nc: Client, js: JetStreamContext, prefix: str, event: Event) -> None:
    """Publish `event`; a stored one retries while the broker is away (TransientError after)."""
    if not event.event_id:
        event = msgspec.structs.replace(event, event_id=uuid.uuid4().hex)
    payload = contracts.encode(event)
    subject = event.subject(prefix)
    headers = inject_trace({"Nats-Msg-Id": event.event_id})
    if event.lossy:
        with contextlib.suppress(*BROKER_AWAY):
            await nc.publish(subject, payload, headers=headers)
        return
    await while_broker_away(
        lambda: js.publish(subject, payload, headers=headers, timeout=PUBLISH_ACK_TIMEOUT_S),
        what=f"publish {subject} {event.event_id}",
    )


async def gather_limited(calls: Iterable[Awaitable[T]], limit: int = PIPELINE) -> list[T]:
    """Await `calls` with at most `limit` in flight, started in order; their results in
    order. Every call runs to its end; then the first failure, if any, is raised."""
    gate = asyncio.Semaphore(max(1, limit))

    async def one(call: Awaitable[T]) -> T:
        async with gate:
            return await call

    results = await asyncio.gather(*(one(c) for c in calls), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]
