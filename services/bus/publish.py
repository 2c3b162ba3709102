"""Publishing one event: to the stream (deduplicated by its id), or over core NATS if lossy.

The event's deterministic id travels as `Nats-Msg-Id`, so a retried or repeated publish is
stored once; the current trace context travels in the headers, so one experiment is one
trace across the services.
"""

from __future__ import annotations

import contextlib
import uuid

import msgspec
from nats.aio.client import Client
from nats.js.client import JetStreamContext

from services import contracts
from services.bus.errors import BROKER_AWAY, while_broker_away
from services.contracts import Event
from services.telemetry import inject_trace

PUBLISH_ACK_TIMEOUT_S = 2.0


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
