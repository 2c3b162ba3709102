"""Events applied in batches: one SQLite transaction for every event ready at once.

Handlers submit their event (with the objects it names, fetched already) in the order they
were delivered; whenever the applier is free it takes every event submitted so far (up to
MAX_BATCH), applies them in order in one transaction (`apply_events`: a savepoint each, so
a refused event leaves the others applied), publishes their outboxes pipelined, and only
then answers each handler, which acks its message. A crash anywhere before the answer
leaves the messages unacked: they are delivered again, found applied (their event ids are
in `events_seen`) and their stored outboxes published again under the same ids, which
JetStream drops as duplicates. One commit per batch instead of one per event is what lets
the ledger keep up with thousands of slots.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field

from opentelemetry import context as otel_context

from services.bus import Bus, gather_limited
from services.contracts import Event, RunCancel
from services.ledger.projection import Pending, apply_events
from services.ledger.verdict import Outbox

MAX_BATCH = 256


@dataclass
class _Submitted:
    pending: Pending
    answer: asyncio.Future[Outbox | Exception]
    trace: otel_context.Context = field(default_factory=otel_context.get_current)


class Batcher:
    """Applies submitted events in order, in batches; publishes what each one decided."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        bus: Bus,
        on_published: Callable[[Event], None] | None = None,
    ) -> None:
        self.conn = conn
        self.bus = bus
        self.on_published = on_published
        self._queue: list[_Submitted] = []
        self._applier: asyncio.Task[None] | None = None
        self.batches = 0
        self.applied = 0

    def submit(self, pending: Pending) -> asyncio.Future[Outbox | Exception]:
        """Queue one event (after every one submitted before it); the answer: its outbox
        once applied and published, or the exception that refused it."""
        answer: asyncio.Future[Outbox | Exception] = asyncio.get_running_loop().create_future()
        self._queue.append(_Submitted(pending, answer))
        if self._applier is None or self._applier.done():
            self._applier = asyncio.create_task(self._apply_queued())
        return answer

    async def _apply_queued(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            try:
                results = apply_events(self.conn, [s.pending for s in batch])
                published = [
                    (s.trace, event)
                    for s, result in zip(batch, results, strict=True)
                    if not isinstance(result, Exception)
                    for event in result
                ]
                await gather_limited(self._publish(trace, event) for trace, event in published)
            except Exception as exc:  # SQLite, or the broker away past publish's retries
                for s in batch:
                    if not s.answer.done():
                        s.answer.set_result(exc)
                continue
            self.batches += 1
            self.applied += len(batch)
            for s, result in zip(batch, results, strict=True):
                if not s.answer.done():
                    s.answer.set_result(result)

    async def _publish(self, trace: otel_context.Context, event: Event) -> None:
        """Publish under the trace of the message that decided it."""
        token = otel_context.attach(trace)
        try:
            if isinstance(event, RunCancel):  # durable for a run not started yet
                await self.bus.campaigns.mark_cancelled(event.campaign, event.run_id, event.reason)
            await self.bus.publish(event)
        finally:
            otel_context.detach(token)
        if self.on_published is not None:
            self.on_published(event)
