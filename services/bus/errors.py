"""What can go wrong on the bus, and the one retry policy for a broker that is briefly away.

A handler raises `TransientError` to be redelivered later and `PoisonError` to be
dead-lettered at once. Calls to the broker retry (stamina: exponential back-off with
jitter, bounded by a deadline) only on the typed nats-py errors that mean "not reachable
right now"; anything else is a bug or a refusal and surfaces at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors
import stamina

T = TypeVar("T")

# How long a publish, object or KV call keeps trying while the broker is away.
BROKER_RETRY_S = 120.0

BROKER_AWAY: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.js.errors.ServiceUnavailableError,
    # A publish while the stream has no leader (a cluster electing one after losing a node).
    nats.js.errors.NoStreamResponseError,
    asyncio.TimeoutError,
    OSError,
)


# Any failure of a call to the broker: away, or it refused (consumer gone, bad request).
NATS_FAILURES: tuple[type[Exception], ...] = (*BROKER_AWAY, nats.errors.Error)


class TransientError(Exception):
    """The handler could not finish now (a dependency is away); redeliver after a delay
    (`retry_in_s`, else one that grows with the deliveries)."""

    def __init__(self, *args: object, retry_in_s: float | None = None) -> None:
        super().__init__(*args)
        self.retry_in_s = retry_in_s


class PoisonError(Exception):
    """The message can never be handled; dead-letter it at once."""


async def while_broker_away(
    op: Callable[[], Awaitable[T]], what: str, timeout_s: float | None = BROKER_RETRY_S
) -> T:
    """Run `op`, retrying while the broker is away for up to `timeout_s` (None: forever,
    for a service's set-up, which has nothing better to do than wait for the broker).

    Past the deadline the failure becomes a TransientError naming the operation, so a
    handler's message is redelivered instead of lost.
    """
    try:  # the first try without the retry machinery (it costs ~0.1 ms of CPU per call)
        return await op()
    except BROKER_AWAY:
        pass
    try:
        async for attempt in stamina.retry_context(
            on=BROKER_AWAY,
            attempts=None,
            timeout=timeout_s,
            wait_initial=0.1,
            wait_max=2.0,
            wait_jitter=0.2,
        ):
            with attempt:
                return await op()
    except BROKER_AWAY as exc:
        raise TransientError(f"{what}: broker unavailable: {exc!r}") from exc
    raise AssertionError("unreachable: stamina retries until success or raises")
