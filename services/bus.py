"""NATS JetStream for the services: connect, streams, publish(event), consume(handler).

- `connect` reconnects forever with a short ping interval, so a dead broker is noticed in
  seconds and a restarted one is picked up by itself.
- `publish` sends the event's deterministic id as `Nats-Msg-Id` (JetStream drops
  duplicates) and the trace context, and retries with the same id while the broker is
  briefly away.
- `consume` is a durable pull-consumer loop: it heartbeats `in_progress()` while a handler
  runs, acks after the handler returned (the effect is durable), naks with a delay on
  errors, and dead-letters then terms a poison message (undecodable, or failing on every
  delivery) so it never blocks the ones behind it.
- `follow` reads a subject filter from the start of the stream (or from now) and keeps
  following it across broker restarts: a projection that needs no acks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

from services import contracts
from services.contracts import AnyEvent, ContractError, Event
from services.delivery import (
    Delivery,
    Handler,
    MessageRunner,
    PoisonError,
    TransientError,
    fetch_available,
    release_slot,
)
from services.object_reads import read_small_object
from services.telemetry import get_logger, inject_trace

log = get_logger(component="bus")

__all__ = ["Bus", "Delivery", "Handler", "PoisonError", "TransientError"]

_BROKER_AWAY = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.js.errors.ServiceUnavailableError,
    asyncio.TimeoutError,
    OSError,
)


def _bucket(prefix: str, name: str) -> str:
    return name if prefix == "ns" else f"{prefix}_{name}"


def _stream(prefix: str) -> str:
    return contracts.STREAM if prefix == "ns" else f"{contracts.STREAM}_{prefix.upper()}"


class Bus:
    def __init__(self, nc: Client, prefix: str = "ns") -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.prefix = prefix
        self.stream = _stream(prefix)
        self.sources_bucket = _bucket(prefix, contracts.SOURCES_BUCKET)
        self.logs_bucket = _bucket(prefix, contracts.LOGS_BUCKET)
        self.campaigns_bucket = _bucket(prefix, contracts.CAMPAIGNS_BUCKET)
        self.publish_retry_s = 120.0

    # --- connection -----------------------------------------------------------------

    @classmethod
    async def connect(
        cls, url: str, prefix: str = "ns", name: str = "nightshift", creds: str = "",
        connect_timeout_s: float = 30.0,
    ) -> Bus:
        """Connect (retrying until `connect_timeout_s`), then reconnect forever."""
        deadline = time.monotonic() + connect_timeout_s
        closing: list[Client] = []

        async def on_disconnected() -> None:
            # A drain or close of our own also disconnects: not worth a warning.
            if not any(c.is_draining or c.is_closed for c in closing):
                log.warning("nats_disconnected", url=url)

        while True:
            try:
                nc = await nats.connect(
                    url,
                    name=name,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    ping_interval=2,
                    max_outstanding_pings=3,
                    connect_timeout=2,
                    user_credentials=creds or None,
                    error_cb=_log_error,
                    disconnected_cb=on_disconnected,
                    reconnected_cb=_log_reconnected,
                )
                closing.append(nc)
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise ConnectionError(
                        f"cannot reach NATS at {url}: {exc}; is nats-server running "
                        "(NATS_URL), with JetStream enabled (-js)?"
                    ) from exc
                await asyncio.sleep(0.5)
        bus = cls(nc, prefix)
        await bus.ensure_streams()
        return bus

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.drain()

    async def ensure_streams(self) -> None:
        """Create (or update) the stream, the object stores and the campaigns KV."""
        config = api.StreamConfig(
            name=self.stream,
            subjects=contracts.stream_subjects(self.prefix),
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            duplicate_window=120.0,
        )
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await self.js.update_stream(config)
        for bucket in (self.sources_bucket, self.logs_bucket):
            try:
                await self.js.object_store(bucket)
            except nats.js.errors.BucketNotFoundError:
                await self.js.create_object_store(
                    bucket, api.ObjectStoreConfig(bucket=bucket, storage=api.StorageType.FILE)
                )
        try:
            await self.js.key_value(self.campaigns_bucket)
        except nats.js.errors.BucketNotFoundError:
            await self.js.create_key_value(
                api.KeyValueConfig(bucket=self.campaigns_bucket, storage=api.StorageType.FILE)
            )

    # --- publishing -----------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        """Publish an event: to the stream (deduplicated by id), or core NATS if lossy."""
        if not event.event_id:
            event = msgspec.structs.replace(event, event_id=uuid.uuid4().hex)
        payload = contracts.encode(event)
        subject = event.subject(self.prefix)
        headers = inject_trace({"Nats-Msg-Id": event.event_id})
        if event.lossy:
            with contextlib.suppress(*_BROKER_AWAY):
                await self.nc.publish(subject, payload, headers=headers)
            return
        await self._retry(
            lambda: self.js.publish(subject, payload, headers=headers, timeout=2.0),
            what=f"publish {subject} {event.event_id}",
        )

    async def _retry(self, op: Callable[[], Awaitable[Any]], what: str) -> Any:
        """Run `op` until it succeeds, while the broker is away for up to publish_retry_s."""
        deadline = time.monotonic() + self.publish_retry_s
        delay = 0.1
        while True:
            try:
                return await op()
            except _BROKER_AWAY as exc:
                if time.monotonic() > deadline:
                    raise TransientError(f"{what}: broker unavailable: {exc!r}") from exc
                log.warning("broker_unavailable", op=what, error=repr(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    # --- object stores and KV -------------------------------------------------------

    async def put_object(self, bucket: str, key: str, data: bytes) -> None:
        async def put() -> None:
            store = await self.js.object_store(bucket)
            await store.put(key, data)

        await self._retry(put, what=f"put {bucket}/{key}")

    async def get_object(self, bucket: str, key: str) -> bytes:
        """Bytes of an object; KeyError if it does not exist."""
        try:
            small = await read_small_object(self.js, bucket, key)
        except KeyError:
            raise
        except Exception:  # broker away, unexpected meta: the store read retries and decides
            small = None
        if small is not None:
            return small

        async def get() -> bytes:
            store = await self.js.object_store(bucket)
            try:
                result = await store.get(key)
            except nats.js.errors.ObjectNotFoundError as exc:
                raise KeyError(f"{bucket}/{key}") from exc
            return bytes(result.data or b"")

        data: bytes = await self._retry(get, what=f"get {bucket}/{key}")
        return data

    async def put_source(self, source: str) -> str:
        digest = contracts.source_digest(source)
        await self.put_object(self.sources_bucket, digest, source.encode())
        return digest

    async def get_source(self, digest: str) -> str:
        return (await self.get_object(self.sources_bucket, digest)).decode()

    async def kv_put(self, key: str, value: bytes) -> None:
        async def put() -> None:
            kv = await self.js.key_value(self.campaigns_bucket)
            await kv.put(key, value)

        await self._retry(put, what=f"kv put {key}")

    async def kv_get(self, key: str) -> bytes | None:
        async def get() -> bytes | None:
            kv = await self.js.key_value(self.campaigns_bucket)
            try:
                entry = await kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                return None
            return entry.value

        value: bytes | None = await self._retry(get, what=f"kv get {key}")
        return value

    async def kv_delete(self, key: str) -> None:
        async def delete() -> None:
            kv = await self.js.key_value(self.campaigns_bucket)
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                await kv.delete(key)

        await self._retry(delete, what=f"kv delete {key}")

    async def save_campaign(self, event: contracts.CampaignStarted) -> None:
        await self.kv_put(f"campaign.{event.campaign}", contracts.encode(event))

    async def load_campaign(self, name: str) -> contracts.CampaignStarted | None:
        raw = await self.kv_get(f"campaign.{name}")
        if raw is None:
            return None
        event = contracts.decode(raw)
        return event if isinstance(event, contracts.CampaignStarted) else None

    async def mark_campaign_stopped(self, name: str, reason: str) -> None:
        await self.kv_put(f"stopped.{name}", reason.encode())

    async def campaign_stopped(self, name: str) -> bool:
        return await self.kv_get(f"stopped.{name}") is not None

    # --- consuming ------------------------------------------------------------------

    def subjects(self, *event_types: type[Event]) -> list[str]:
        return [f"{self.prefix}.{t.subject_suffix}" for t in event_types]

    async def consume(
        self,
        durable: str,
        event_types: list[type[Event]],
        handler: Handler,
        *,
        concurrency: int | Callable[[], int] = 1,
        ack_wait_s: float = 30.0,
        max_deliver: int = 5,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Run `handler` for each event of `event_types` through a shared durable consumer.

        `concurrency` is how many messages may be in hand at once (a callable is asked
        again before each fetch, so a launcher can follow its free slots). Returns when
        `stop` is set, after the handlers in hand finish.
        """
        config = api.ConsumerConfig(
            durable_name=durable,
            filter_subjects=self.subjects(*event_types),
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=ack_wait_s,
            max_deliver=max_deliver,
            max_ack_pending=-1,
        )
        await self._retry(lambda: self.js.add_consumer(self.stream, config), what="add_consumer")
        psub = await self.js.pull_subscribe_bind(durable=durable, stream=self.stream)
        stop = stop or asyncio.Event()
        in_hand: set[asyncio.Task[None]] = set()
        freed = asyncio.Event()
        runner = MessageRunner(self.publish, durable, handler, ack_wait_s, max_deliver)
        while not stop.is_set():
            limit = concurrency() if callable(concurrency) else concurrency
            free = limit - len(in_hand)
            if free <= 0:
                freed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(freed.wait(), timeout=1.0)
                continue
            try:
                msgs = await fetch_available(psub, free, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as exc:  # broker away, consumer being recreated, ...
                log.warning("fetch_failed", consumer=durable, error=repr(exc))
                await asyncio.sleep(0.5)
                await self._ensure_consumer(config)
                continue
            for msg in msgs:
                task = asyncio.create_task(runner.handle(msg))
                in_hand.add(task)
                task.add_done_callback(lambda t: release_slot(in_hand, freed, t))
        if in_hand:
            await asyncio.gather(*in_hand, return_exceptions=True)
        with contextlib.suppress(Exception):
            await psub.unsubscribe()

    async def _ensure_consumer(self, config: api.ConsumerConfig) -> None:
        with contextlib.suppress(Exception):
            await self.js.add_consumer(self.stream, config)

    async def follow(
        self,
        event_types: list[type[Event]],
        handler: Callable[[AnyEvent, int], Awaitable[None]],
        *,
        from_start: bool = True,
        stop: asyncio.Event | None = None,
        caught_up: asyncio.Event | None = None,
    ) -> None:
        """Read events in stream order (no acks), surviving broker restarts.

        `handler(event, stream_seq)`. `caught_up` is set once the history is read.
        """
        stop = stop or asyncio.Event()
        last_seq = 0
        if not from_start:
            info = await self._retry(lambda: self.js.stream_info(self.stream), what="stream_info")
            last_seq = info.state.last_seq
        while not stop.is_set():
            name = f"follow-{uuid.uuid4().hex[:12]}"
            config = api.ConsumerConfig(
                name=name,
                filter_subjects=self.subjects(*event_types),
                ack_policy=api.AckPolicy.NONE,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=last_seq + 1,
                inactive_threshold=30.0,
                mem_storage=True,
            )
            try:
                await self.js.add_consumer(self.stream, config)
                psub = await self.js.pull_subscribe_bind(consumer=name, stream=self.stream)
            except Exception as exc:
                log.warning("follow_failed", error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            last_seq = await self._follow_loop(psub, handler, last_seq, stop, caught_up)
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def _follow_loop(
        self, psub: Any, handler: Callable[[AnyEvent, int], Awaitable[None]], last_seq: int,
        stop: asyncio.Event, caught_up: asyncio.Event | None,
    ) -> int:
        """Fetch until stopped or the consumer is lost; return the last sequence handled."""
        idle = 0
        while not stop.is_set():
            try:
                msgs = await fetch_available(psub, 256, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                if caught_up is not None:
                    caught_up.set()
                idle += 1
                if idle % 10 == 0 and not await self._consumer_alive(psub):
                    return last_seq
                continue
            except Exception as exc:
                log.warning("follow_fetch_failed", error=repr(exc))
                await asyncio.sleep(0.5)
                return last_seq
            idle = 0
            for msg in msgs:
                seq = msg.metadata.sequence.stream
                if seq <= last_seq:
                    continue
                last_seq = seq
                try:
                    event = contracts.decode(msg.data)
                except ContractError as exc:
                    log.error("follow_skipped_malformed", stream_seq=seq, error=str(exc))
                    continue
                await handler(event, seq)
                if caught_up is not None and msg.metadata.num_pending == 0:
                    caught_up.set()
        return last_seq

    async def _consumer_alive(self, psub: Any) -> bool:
        try:
            await psub.consumer_info()
            return True
        except Exception:
            return False

    async def subscribe_lossy(
        self, event_type: type[Event], handler: Callable[[AnyEvent], Awaitable[None]],
        subject: str | None = None,
    ) -> Any:
        """Subscribe to a core-NATS subject (fleet status, progress, cancel)."""

        async def on_msg(msg: Msg) -> None:
            try:
                event = contracts.decode(msg.data)
            except ContractError:
                return
            await handler(event)

        return await self.nc.subscribe(subject or f"{self.prefix}.{event_type.subject_suffix}",
                                       cb=on_msg)


async def _log_error(exc: Exception) -> None:
    log.warning("nats_error", error=repr(exc))


async def _log_reconnected() -> None:
    log.info("nats_reconnected")
