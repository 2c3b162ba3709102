"""The bus against a real nats-server: redelivery, dedup, dead letters, heartbeats."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import stamina

from services.broker import EmbeddedNats
from services.bus import (
    AuthenticationError,
    Bus,
    Delivery,
    PoisonError,
    TransientError,
    gather_limited,
    handlers_of,
    handlers_on,
)
from services.bus import consume as consume_mod
from services.contracts import BestUpdated, CampaignStopped, DeadLettered, ProposerHalted
from services.settings import Settings
from tests.eventually import eventually


def stopped(i: int, campaign: str = "c") -> CampaignStopped:
    return CampaignStopped(campaign=campaign, event_id=f"stop-{i}", reason=f"r{i}")


class _Watcher:
    async def on_stopped(self, event: CampaignStopped, _: Delivery) -> None:
        pass

    async def on_halted(self, halt: ProposerHalted, delivery: Delivery) -> None:
        pass


def test_handlers_of_keys_each_handler_by_the_event_type_in_its_signature() -> None:
    watcher = _Watcher()
    table = handlers_of(watcher.on_stopped, watcher.on_halted)
    assert table == {CampaignStopped: watcher.on_stopped, ProposerHalted: watcher.on_halted}
    assert handlers_on(watcher) == table  # every on_* method


async def consume_in_background(
    bus: Bus, handler: Callable[[CampaignStopped, Delivery], Awaitable[None]], **kwargs: Any
) -> tuple[asyncio.Task[None], asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(bus.consume("test", {CampaignStopped: handler}, stop=stop, **kwargs))
    return task, stop


async def dead_letters(bus: Bus) -> list[DeadLettered]:
    found: list[DeadLettered] = []
    caught_up = asyncio.Event()
    stop = asyncio.Event()

    async def collect(event: DeadLettered, _: Delivery) -> None:
        found.append(event)

    task = asyncio.create_task(bus.follow({DeadLettered: collect}, stop=stop, caught_up=caught_up))
    await asyncio.wait_for(caught_up.wait(), 10)
    stop.set()
    await task
    return found


async def test_failed_handler_is_redelivered(bus: Bus) -> None:
    attempts: list[int] = []

    async def flaky(event: CampaignStopped, delivery: Delivery) -> None:
        attempts.append(delivery.num_delivered)
        if delivery.num_delivered < 3:
            raise RuntimeError("transient")

    await bus.publish(stopped(1))
    task, stop = await consume_in_background(bus, flaky, max_deliver=5)
    await eventually(lambda: attempts == [1, 2, 3])
    await asyncio.sleep(1.0)  # acked on the third delivery: no fourth
    stop.set()
    await task
    assert attempts == [1, 2, 3]


async def test_duplicate_msg_id_is_dropped(bus: Bus) -> None:
    seen: list[str] = []

    async def record(event: CampaignStopped, _: Delivery) -> None:
        seen.append(event.event_id)

    for _ in range(3):
        await bus.publish(stopped(7))
    await bus.publish(stopped(8))
    task, stop = await consume_in_background(bus, record)
    await eventually(lambda: len(seen) == 2)
    await asyncio.sleep(0.5)
    stop.set()
    await task
    assert seen == ["stop-7", "stop-8"]


async def test_poison_message_is_dead_lettered_and_does_not_block(bus: Bus) -> None:
    handled: list[str] = []

    async def handler(event: CampaignStopped, _: Delivery) -> None:
        if event.reason == "r1":
            raise PoisonError("can never succeed")
        if event.reason == "r2":
            raise ValueError("fails every time")
        handled.append(event.reason)

    # An undecodable payload on a stream subject, then two bad events, then good ones.
    await bus.nc.publish("ns.campaign.stopped", b"{not json", headers={"Nats-Msg-Id": "junk"})
    for i in range(1, 6):
        await bus.publish(stopped(i))
    task, stop = await consume_in_background(bus, handler, concurrency=1, max_deliver=2)
    await eventually(lambda: handled == ["r3", "r4", "r5"] or len(handled) >= 3, timeout=20)
    await asyncio.sleep(2.0)
    stop.set()
    await task
    assert sorted(handled) == ["r3", "r4", "r5"]
    letters = await dead_letters(bus)
    assert len(letters) == 3
    by_seq = {d.stream_seq: d for d in letters}
    assert sorted(by_seq) == [1, 2, 3]
    assert "malformed" in by_seq[1].error
    assert by_seq[1].subject_name == "ns.campaign.stopped"
    assert "can never succeed" in by_seq[2].error
    assert "failed on all 2 deliveries" in by_seq[3].error


async def test_in_progress_keeps_a_long_handler_from_redelivery(bus: Bus) -> None:
    deliveries: list[int] = []

    async def slow(event: CampaignStopped, delivery: Delivery) -> None:
        deliveries.append(delivery.num_delivered)
        await asyncio.sleep(4.0)  # four times ack_wait

    await bus.publish(stopped(1))
    task, stop = await consume_in_background(bus, slow, ack_wait_s=1.0, concurrency=2)
    await eventually(lambda: len(deliveries) >= 1)
    await asyncio.sleep(5.0)
    stop.set()
    await task
    assert deliveries == [1]


async def test_late_replies_of_a_full_consumer_are_taken_not_left_to_expire(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loaded client may give up on a request whose replies then land in its queue. A full
    consumer (every handler busy for longer than ack_wait) hands them back at once, to
    another consumer of the durable with room: each message is handled once. Left in the
    queue, they expired there, went to the other consumer, and were handled again when
    this one had room (at 4,096 slots a second launcher ran such runs twice)."""
    deliveries: list[tuple[str, int]] = []

    async def slow(event: CampaignStopped, delivery: Delivery) -> None:
        deliveries.append((event.event_id, delivery.num_delivered))
        await asyncio.sleep(3.0)  # past ack_wait: only heartbeats keep it

    real = consume_mod.fetch_available
    late = [True]

    async def fetch_then_late_replies(psub: Any, batch: int, timeout: float) -> list[Any]:
        msgs = await real(psub, batch, timeout)
        if late and len(msgs) == batch == 2:
            late.clear()  # once: two replies to a request the client no longer waits on
            request = json.dumps({"batch": 2, "no_wait": True}).encode()
            await psub._nc.publish(psub._nms, request, psub._deliver)
        return msgs

    monkeypatch.setattr(consume_mod, "fetch_available", fetch_then_late_replies)
    for i in range(4):
        await bus.publish(stopped(i))
    full, stop_full = await consume_in_background(bus, slow, ack_wait_s=2.0, concurrency=2)
    await eventually(lambda: len(deliveries) >= 2 and not late, timeout=10)
    # Another consumer of the durable, with room: what expires is delivered to it.
    spare, stop_spare = await consume_in_background(bus, slow, ack_wait_s=2.0, concurrency=4)
    await asyncio.sleep(4.0)  # past the full one's first handlers: it has room again
    for stop in (stop_full, stop_spare):
        stop.set()
    await asyncio.gather(full, spare)
    assert sorted(event_id for event_id, _ in deliveries) == [f"stop-{i}" for i in range(4)]


async def test_publish_waits_for_a_restarted_broker(nats_server, bus: Bus) -> None:  # type: ignore[no-untyped-def]
    nats_server.stop()
    publish = asyncio.create_task(bus.publish(stopped(42)))
    await asyncio.sleep(1.0)
    assert not publish.done()
    nats_server.start()
    await asyncio.wait_for(publish, 30)
    seen: list[str] = []

    async def record(event: CampaignStopped, _: Delivery) -> None:
        seen.append(event.event_id)

    task, stop = await consume_in_background(bus, record)
    await eventually(lambda: seen == ["stop-42"], timeout=15)
    stop.set()
    await task


async def test_small_objects_are_read_directly_and_agree_with_the_store(bus: Bus) -> None:
    big = bytes(range(256)) * 2000  # 512 KB: several chunks, the object store's own read
    store = await bus.logs.declare()
    for key, data in (("small", b"print('hi')\n"), ("empty", b""), ("big", big)):
        await bus.logs.put(key, data)
        fast = await bus.logs._read_small(key)
        assert fast == (None if key == "big" else data)
        assert await bus.logs.get(key) == data
        assert bytes((await store.get(key)).data or b"") == data
    await bus.logs.put("small", b"replaced")
    assert await bus.logs.get("small") == b"replaced"
    assert bytes((await store.get("small")).data or b"") == b"replaced"
    info = await bus.logs.js.stream_info("OBJ_logs", subjects_filter="$O.logs.C.>")
    chunks = info.state.subjects or {}
    assert len(chunks) == 2  # "small" (its first chunk purged when replaced) and "big"'s
    with pytest.raises(KeyError):
        await bus.logs.get("absent")


async def test_bucket_handles_are_declared_once(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every get and put reuses the handle: no bucket lookup (a stream_info) per call."""
    lookups: list[str] = []
    js = bus.logs.js
    real_object_store, real_key_value = js.object_store, js.key_value

    async def object_store(name: str) -> Any:
        lookups.append(name)
        return await real_object_store(name)

    async def key_value(name: str) -> Any:
        lookups.append(name)
        return await real_key_value(name)

    monkeypatch.setattr(js, "object_store", object_store)
    monkeypatch.setattr(js, "key_value", key_value)
    for i in range(5):
        await bus.logs.put(f"k{i}", b"x" * i)
        assert await bus.logs.get(f"k{i}") == b"x" * i
        digest = await bus.put_source(f"X = {i}\n")
        assert await bus.get_source(digest) == f"X = {i}\n"
        await bus.campaigns.mark_stopped(f"c{i}", "test")
        assert await bus.campaigns.is_stopped(f"c{i}")
    assert lookups == []


async def test_handlers_receive_their_own_type(bus: Bus) -> None:
    """A consumer declared as {Type: handler}: filter subjects from the types, dispatch by type."""
    stops: list[CampaignStopped] = []
    halts: list[ProposerHalted] = []

    async def on_stop(event: CampaignStopped, _: Delivery) -> None:
        stops.append(event)

    async def on_halt(event: ProposerHalted, _: Delivery) -> None:
        halts.append(event)

    await bus.publish(stopped(1))
    await bus.publish(ProposerHalted(campaign="c", event_id="halt-1", reason="budget"))
    not_for_us = BestUpdated(
        campaign="c", event_id="b", variant_id="v", source_digest="d", value=1.0, runs=1
    )
    await bus.publish(not_for_us)
    stop = asyncio.Event()
    task = asyncio.create_task(
        bus.consume("typed", {CampaignStopped: on_stop, ProposerHalted: on_halt}, stop=stop)
    )
    await eventually(lambda: len(stops) == 1 and len(halts) == 1, what="both handlers")
    stop.set()
    await task
    assert [type(e) for e in stops + halts] == [CampaignStopped, ProposerHalted]
    lag = await bus.consumer_lag("typed")
    assert lag is not None and lag.pending == 0  # the BestUpdated never matched the filter


async def test_publish_to_a_dead_broker_with_retries_off_fails_fast(
    nats_server: EmbeddedNats, bus: Bus
) -> None:
    """With retries switched off (as a test may), the failure is a TransientError naming
    what could not be published, not a hang."""
    nats_server.stop()
    started = time.monotonic()
    with (
        stamina.set_testing(True),
        pytest.raises(TransientError, match=r"ns\.campaign\.stopped stop-9"),
    ):
        await bus.publish(stopped(9))
    assert time.monotonic() - started < 10
    nats_server.start()


async def test_credentials_from_settings(tmp_path: Any) -> None:
    """A server that requires a user and password: the settings' credentials get in, wrong
    ones fail at once with a message that names the settings to fix (and no password)."""
    server = EmbeddedNats(tmp_path / "nats", user="alice", password="s3cret-pw").start()
    try:
        good = Settings(nats_url=server.url, nats_user="alice", nats_password="s3cret-pw")
        bus = await Bus.from_settings(good, "test")
        await bus.publish(stopped(1))
        assert await bus.last_seq() == 1
        await bus.close()
        started = time.monotonic()
        for bad in (
            Settings(nats_url=server.url),
            Settings(nats_url=server.url, nats_user="alice", nats_password="wrong"),
        ):
            with pytest.raises(AuthenticationError) as refused:
                await Bus.from_settings(bad, "test", connect_timeout_s=20)
            assert "NIGHTSHIFT_NATS_PASSWORD" in str(refused.value)
            assert "wrong" not in str(refused.value) and "s3cret" not in str(refused.value)
        assert time.monotonic() - started < 5
    finally:
        server.stop()


async def test_gather_limited_keeps_order_and_the_limit_and_raises_after_all() -> None:
    running, peak, finished = [0], [0], []

    async def call(i: int) -> int:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await asyncio.sleep(0.001 * (i % 3))
        running[0] -= 1
        finished.append(i)
        if i == 4:
            raise TransientError("broker away")
        return i * 10

    assert await gather_limited((call(i) for i in range(4)), limit=2) == [0, 10, 20, 30]
    assert peak[0] == 2
    finished.clear()
    with pytest.raises(TransientError, match="broker away"):
        await gather_limited((call(i) for i in range(10)), limit=3)
    assert sorted(finished) == list(range(10))  # the failure did not stop the others


async def test_a_pipelined_batch_of_publishes_is_stored_in_order(bus: Bus) -> None:
    events = [
        ProposerHalted(campaign="order", event_id=f"halt-{i}", reason="budget", detail=str(i))
        for i in range(300)
    ]
    first = await bus.last_seq()
    await gather_limited(bus.publish(e) for e in events)
    assert await bus.last_seq() == first + 300
    seen: list[str] = []

    async def on_halt(event: ProposerHalted, _: Delivery) -> None:
        if event.campaign == "order":
            seen.append(event.detail)

    stop = asyncio.Event()
    follow = asyncio.create_task(bus.follow({ProposerHalted: on_halt}, stop=stop))
    await eventually(lambda: len(seen) == 300)
    stop.set()
    await follow
    assert seen == [str(i) for i in range(300)]
