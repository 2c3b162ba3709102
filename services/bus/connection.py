"""The one way a process connects: `Bus.from_settings(settings, name)`.

It reconnects forever with a short ping interval (a dead broker is noticed in seconds and a
restarted one picked up by itself), passes the NATS credentials from the settings (a
credentials file, a user and password, or a token), declares the stream, the object stores
and the campaigns KV once (with `replicas` copies in a cluster), and keeps their handles. A
cluster is named by a comma-separated URL list; the client moves to another node when one
is lost. Nothing outside this package touches
nats-py's JetStream API: what services need of it (publish, consume, follow, objects,
campaigns, consumer lag) is a method here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nats
import nats.errors
import nats.js.errors
import stamina
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from services import contracts
from services.bus.consume import (
    ConsumerOptions,
    Delivery,
    Handlers,
    MessageRunner,
    consume,
    filter_subjects,
)
from services.bus.errors import NATS_FAILURES, TransientError, while_broker_away
from services.bus.follow import Follower, FollowMark
from services.bus.publish import publish_event
from services.bus.store import CampaignRegistry, ObjectBucket, bucket_name
from services.contracts import ContractError, Event
from services.telemetry import get_logger

if TYPE_CHECKING:
    from services.settings import Settings

log = get_logger(component="bus")


@dataclass(frozen=True)
class Credentials:
    """How to authenticate to NATS; never logged (no __repr__ of the values)."""

    creds_file: str = ""
    user: str = ""
    password: str = ""
    token: str = ""

    def __repr__(self) -> str:
        kinds = [k for k in ("creds_file", "user", "token") if getattr(self, k)]
        return f"Credentials({', '.join(kinds) or 'none'})"

    def connect_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.creds_file:
            options["user_credentials"] = self.creds_file
        if self.user:
            options["user"], options["password"] = self.user, self.password
        if self.token:
            options["token"] = self.token
        return options


@dataclass(frozen=True)
class ConsumerLag:
    pending: int  # stored but not yet delivered
    ack_pending: int  # delivered, not yet acked
    delivered_seq: int  # last stream sequence delivered
    acked_seq: int  # every stream sequence up to this one is acked


def stream_name(prefix: str) -> str:
    return contracts.STREAM if prefix == "ns" else f"{contracts.STREAM}_{prefix.upper()}"


class Bus:
    def __init__(self, nc: Client, prefix: str = "ns", replicas: int = 1) -> None:
        self.nc = nc
        self._js = nc.jetstream()
        self.prefix = prefix
        self.replicas = replicas
        self.stream = stream_name(prefix)
        self.sources = ObjectBucket(
            self._js, bucket_name(prefix, contracts.SOURCES_BUCKET), replicas
        )
        self.logs = ObjectBucket(self._js, bucket_name(prefix, contracts.LOGS_BUCKET), replicas)
        self.campaigns = CampaignRegistry(
            self._js, bucket_name(prefix, contracts.CAMPAIGNS_BUCKET), replicas
        )

    # --- connection -----------------------------------------------------------------

    @classmethod
    async def from_settings(
        cls, settings: Settings, name: str, connect_timeout_s: float | None = 30.0
    ) -> Bus:
        """Connect as `nightshift-<name>` to settings.nats_url with its credentials, then
        declare the stream and buckets; both retry while the broker is away (or has no
        JetStream yet) for up to `connect_timeout_s` each (None: until it is there, as a
        service does: it ends only on a signal or a refused login)."""
        if not settings.nats_url:
            raise ConnectionError(f"{name}: set NATS_URL to the NATS server to use")
        credentials = Credentials(
            settings.nats_creds, settings.nats_user, settings.nats_password, settings.nats_token
        )
        nc = await _connect(settings.nats_url, f"nightshift-{name}", credentials, connect_timeout_s)
        bus = cls(nc, settings.subject_prefix, settings.replicas)
        try:
            await while_broker_away(
                bus.declare, what=f"{name}: declare the stream", timeout_s=connect_timeout_s
            )
        except TransientError as exc:
            await bus.close()
            raise ConnectionError(
                f"{exc}; does the NATS server at {settings.nats_url} have JetStream enabled (-js)?"
            ) from exc
        return bus

    async def declare(self) -> None:
        """Create (or update) the stream, then declare the object stores and the KV; each
        kept on `replicas` nodes of a cluster (an existing stream is updated to it, but
        never to fewer replicas than it has). `from_settings` retries it while JetStream
        does not answer (a server without JetStream, a cluster still electing its leader)."""
        config = api.StreamConfig(
            name=self.stream,
            subjects=contracts.stream_subjects(self.prefix),
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            duplicate_window=120.0,
            num_replicas=self.replicas,
        )

        async def declare_all() -> None:
            try:
                await self._js.add_stream(config)
            except nats.js.errors.BadRequestError:  # exists with another config: update it
                # ...never to fewer replicas: a client left at the default (the CLI) must
                # not undo a cluster's replication.
                info = await self._js.stream_info(self.stream)
                kept = max(self.replicas, info.config.num_replicas or 1)
                await self._js.update_stream(dataclasses.replace(config, num_replicas=kept))
            await self.sources.declare()
            await self.logs.declare()
            await self.campaigns.declare()

        try:
            await declare_all()
        except nats.js.errors.ServerError as exc:
            if self.replicas == 1:
                raise
            raise ConnectionError(
                f"NATS cannot keep {self.replicas} replicas of the stream {self.stream} and "
                f"its buckets ({exc.description or exc!r}); set NIGHTSHIFT_REPLICAS to at most "
                "the number of JetStream servers in the cluster (1 for a single server)"
            ) from exc

    async def close(self) -> None:
        """Drain: in-flight publishes go out, subscriptions end; quiet if already gone."""
        if self.nc.is_closed or self.nc.is_draining:
            return
        with contextlib.suppress(*NATS_FAILURES, asyncio.CancelledError):
            await self.nc.drain()

    # --- events ---------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        await publish_event(self.nc, self._js, self.prefix, event)

    async def consume(
        self,
        durable: str,
        handlers: Handlers,
        *,
        concurrency: int | Any = 1,
        ack_wait_s: float = 30.0,
        max_deliver: int = 5,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Run each handler for its event type through a shared durable pull consumer.

        `concurrency` is how many messages may be in hand at once (a callable is asked
        again before each fetch, so a launcher can follow its free slots). Returns when
        `stop` is set, after the handlers in hand finish.
        """
        config = api.ConsumerConfig(
            durable_name=durable,
            filter_subjects=filter_subjects(handlers, self.prefix),
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=ack_wait_s,
            max_deliver=-1,  # the runner dead-letters after max_deliver failures (not waits)
            max_ack_pending=-1,
        )
        runner = MessageRunner(self.publish, durable, handlers, ack_wait_s, max_deliver)
        options = ConsumerOptions(concurrency, ack_wait_s, max_deliver)
        await consume(self._js, self.stream, config, runner, options, stop or asyncio.Event())

    async def follow(
        self,
        handlers: Handlers,
        *,
        from_start: bool = True,
        stop: asyncio.Event | None = None,
        caught_up: asyncio.Event | None = None,
        mark: FollowMark | None = None,
    ) -> None:
        """Read these event types in stream order (no acks), surviving broker restarts.

        `caught_up` is set once the history is read, `mark` kept at the latest moment
        everything stored was read; returns when `stop` is set.
        """
        start_after = 0 if from_start else await self.last_seq()
        follower = Follower(
            self._js, self.stream, self.prefix, handlers, caught_up, start_after, mark
        )
        await follower.run(stop or asyncio.Event())

    async def subscribe_lossy(self, handlers: Handlers) -> list[Subscription]:
        """Core-NATS subscriptions (fleet status, progress, cancel, and fast paths)."""
        subs = []
        for event_type, handler in handlers.items():
            subs.append(
                await self.nc.subscribe(
                    event_type.subject_filter(self.prefix), cb=_lossy_callback(event_type, handler)
                )
            )
        return subs

    # --- the stream and its consumers --------------------------------------------------

    async def last_seq(self) -> int:
        info = await while_broker_away(
            lambda: self._js.stream_info(self.stream), what="stream info"
        )
        return int(info.state.last_seq)

    async def consumer_lag(self, durable: str) -> ConsumerLag | None:
        """How far a durable consumer is behind; None when it does not exist (yet)."""
        try:
            info = await self._js.consumer_info(self.stream, durable, timeout=1.0)
        except nats.js.errors.NotFoundError:
            return None
        delivered = info.delivered.stream_seq if info.delivered else 0
        acked = info.ack_floor.stream_seq if info.ack_floor else 0
        return ConsumerLag(
            int(info.num_pending or 0),
            int(info.num_ack_pending or 0),
            int(delivered or 0),
            int(acked or 0),
        )

    async def reset_consumer(self, durable: str) -> bool:
        """Delete a durable so it starts again from the stream's beginning; False if absent."""
        try:
            await self._js.delete_consumer(self.stream, durable)
        except nats.js.errors.NotFoundError:
            return False
        return True

    # --- sources (the object store keyed by digest) ----------------------------------

    async def put_source(self, source: str) -> str:
        digest = contracts.source_digest(source)
        await self.sources.put(digest, source.encode())
        return digest

    async def get_source(self, digest: str) -> str:
        return (await self.sources.get(digest)).decode()


def _lossy_callback(event_type: type[Event], handler: Any) -> Any:
    async def on_msg(msg: Msg) -> None:
        try:
            event = contracts.decode(msg.data)
        except ContractError:
            return
        if type(event) is event_type:
            await handler(event, Delivery(msg.subject, 0, 1))

    return on_msg


class AuthenticationError(ConnectionError):
    """NATS refused the credentials: retrying will not help."""


# A server not (yet) reachable: the first connect retries these until its timeout.
_UNREACHABLE = (OSError, TimeoutError, nats.errors.NoServersError, nats.errors.TimeoutError)


async def _connect(
    url: str, name: str, credentials: Credentials, timeout_s: float | None
) -> Client:
    """Connect, retrying while the server is unreachable for up to `timeout_s`; then
    reconnect forever. A refused login fails at once: retrying would not help."""
    clients: list[Client] = []
    # A cluster is named as a comma-separated list of its nodes (any one of them answers).
    servers = [u.strip() for u in url.split(",") if u.strip()]

    async def on_disconnected() -> None:
        # A drain or close of our own also disconnects: not worth a warning.
        if not any(c.is_draining or c.is_closed for c in clients):
            log.warning("nats_disconnected", url=url)

    async def on_error(exc: Exception) -> None:
        if clients and clients[0].is_connected:  # the first connect reports by raising
            log.warning("nats_error", error=repr(exc))

    try:
        async for attempt in stamina.retry_context(
            on=_UNREACHABLE, attempts=None, timeout=timeout_s, wait_initial=0.2, wait_max=1.0
        ):
            with attempt:
                # No reconnect loop inside the first connect, so a failure reaches us.
                nc = await nats.connect(
                    servers,
                    name=name,
                    allow_reconnect=False,
                    max_reconnect_attempts=0,
                    reconnect_time_wait=0.5,
                    ping_interval=2,
                    max_outstanding_pings=3,
                    connect_timeout=2,
                    error_cb=on_error,
                    disconnected_cb=on_disconnected,
                    reconnected_cb=_log_reconnected,
                    **credentials.connect_options(),
                )
    except _UNREACHABLE as exc:
        raise ConnectionError(
            f"cannot reach NATS at {url} within {timeout_s or 0:.0f}s: {exc!r}; is nats-server "
            "running (NATS_URL), with JetStream enabled (-js)?"
        ) from exc
    except nats.errors.Error as exc:
        raise AuthenticationError(
            f"NATS at {url} refused {name}: {exc}; set NIGHTSHIFT_NATS_USER and "
            "NIGHTSHIFT_NATS_PASSWORD, NIGHTSHIFT_NATS_TOKEN or NIGHTSHIFT_NATS_CREDS "
            f"(now: {credentials!r})"
        ) from exc
    nc.options["allow_reconnect"] = True
    nc.options["max_reconnect_attempts"] = -1
    clients.append(nc)
    return nc


async def _log_reconnected() -> None:
    log.info("nats_reconnected")
