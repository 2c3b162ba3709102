"""Replay-then-follow of the history: read the stream from its start (or from now) in order,
without acks, and keep following it across broker restarts.

This is how a service that keeps its state in memory (the proposer, `nightshift up`'s live
view, the bench) rebuilds it: an ephemeral ordered consumer per (re)connection, restarted
after the last sequence handled, so nothing is seen twice or skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.js import api
from nats.js.client import JetStreamContext

from services import contracts
from services.bus.consume import Delivery, Handlers, fetch_available, filter_subjects
from services.bus.errors import NATS_FAILURES
from services.contracts import ContractError
from services.telemetry import get_logger

log = get_logger(component="bus")
FETCH_BATCH = 256


@dataclass
class FollowMark:
    """How far a follow has read: `synced_at` (time.monotonic) is the start of the latest
    fetch after which nothing of the followed types was left to read, so every such event
    stored before that moment has been handed to its handler. A proposer that takes a
    campaign over waits for a `synced_at` past the moment it took it."""

    synced_at: float = float("-inf")


class Follower:
    """One follow of a subject filter; `run` returns when `stop` is set."""

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        prefix: str,
        handlers: Handlers,
        caught_up: asyncio.Event | None,
        start_after: int = 0,
        mark: FollowMark | None = None,
    ) -> None:
        self.js = js
        self.stream = stream
        self.handlers = dict(handlers)
        self.subjects = filter_subjects(handlers, prefix)
        self.caught_up = caught_up
        self.last_seq = start_after
        self.mark = mark or FollowMark()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            name = f"follow-{uuid.uuid4().hex[:12]}"
            config = api.ConsumerConfig(
                name=name,
                filter_subjects=self.subjects,
                ack_policy=api.AckPolicy.NONE,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self.last_seq + 1,
                inactive_threshold=30.0,
                mem_storage=True,
            )
            try:
                await self.js.add_consumer(self.stream, config)
                psub = await self.js.pull_subscribe_bind(consumer=name, stream=self.stream)
            except NATS_FAILURES as exc:
                log.warning("follow_failed", error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            await self._read(psub, stop)
            with contextlib.suppress(*NATS_FAILURES):
                await psub.unsubscribe()

    async def _read(self, psub: Any, stop: asyncio.Event) -> None:
        """Fetch until stopped or the consumer is lost (a broker restart drops it)."""
        idle = 0
        while not stop.is_set():
            began = time.monotonic()
            try:
                msgs = await fetch_available(psub, FETCH_BATCH, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                self.mark.synced_at = began
                if self.caught_up is not None:
                    self.caught_up.set()
                idle += 1
                if idle % 10 == 0 and not await _consumer_alive(psub):
                    return
                continue
            except NATS_FAILURES as exc:
                log.warning("follow_fetch_failed", error=repr(exc))
                await asyncio.sleep(0.5)
                return
            idle = 0
            for msg in msgs:
                await self._dispatch(msg)
            if msgs and msgs[-1].metadata.num_pending == 0:
                self.mark.synced_at = began

    async def _dispatch(self, msg: Any) -> None:
        seq = msg.metadata.sequence.stream
        if seq <= self.last_seq:
            return
        self.last_seq = seq
        try:
            event = contracts.decode(msg.data)
        except ContractError as exc:
            log.error("follow_skipped_malformed", stream_seq=seq, error=str(exc))
            return
        handler = self.handlers.get(type(event))
        if handler is not None:
            await handler(event, Delivery(msg.subject, seq, 1))
        if self.caught_up is not None and msg.metadata.num_pending == 0:
            self.caught_up.set()


async def _consumer_alive(psub: Any) -> bool:
    try:
        await psub.consumer_info()
    except NATS_FAILURES:
        return False
    return True
