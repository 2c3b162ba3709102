"""The bus against a real nats-server: redelivery, dedup, dead letters, heartbeats."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from services.bus import Bus, Delivery, PoisonError
from services.contracts import AnyEvent, CampaignStopped, DeadLettered
from services.object_reads import read_small_object


def stopped(i: int, campaign: str = "c") -> CampaignStopped:
    return CampaignStopped(campaign=campaign, event_id=f"stop-{i}", reason=f"r{i}")


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def consume_in_background(
    bus: Bus, handler: Callable[[AnyEvent, Delivery], Awaitable[None]], **kwargs: object
) -> tuple[asyncio.Task[None], asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(
        bus.consume("test", [CampaignStopped], handler, stop=stop, **kwargs)  # type: ignore[arg-type]
    )
    return task, stop


async def dead_letters(bus: Bus) -> list[DeadLettered]:
    found: list[DeadLettered] = []
    caught_up = asyncio.Event()
    stop = asyncio.Event()

    async def collect(event: AnyEvent, _: int) -> None:
        if isinstance(event, DeadLettered):
            found.append(event)

    task = asyncio.create_task(bus.follow([DeadLettered], collect, stop=stop, caught_up=caught_up))
    await asyncio.wait_for(caught_up.wait(), 10)
    stop.set()
    await task
    return found


async def test_failed_handler_is_redelivered(bus: Bus) -> None:
    attempts: list[int] = []

    async def flaky(event: AnyEvent, delivery: Delivery) -> None:
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

    async def record(event: AnyEvent, _: Delivery) -> None:
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

    async def handler(event: AnyEvent, _: Delivery) -> None:
        assert isinstance(event, CampaignStopped)
        if event.reason == "r1":
            raise PoisonError("can never succeed")
        if event.reason == "r2":
            raise ValueError("fails every time")
        handled.append(event.reason)

    # An undecodable payload on a stream subject, then two bad events, then good ones.
    await bus.js.publish("ns.campaign.stopped", b"{not json", headers={"Nats-Msg-Id": "junk"})
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

    async def slow(event: AnyEvent, delivery: Delivery) -> None:
        deliveries.append(delivery.num_delivered)
        await asyncio.sleep(4.0)  # four times ack_wait

    await bus.publish(stopped(1))
    task, stop = await consume_in_background(bus, slow, ack_wait_s=1.0, concurrency=2)
    await eventually(lambda: len(deliveries) >= 1)
    await asyncio.sleep(5.0)
    stop.set()
    await task
    assert deliveries == [1]


async def test_publish_waits_for_a_restarted_broker(nats_server, bus: Bus) -> None:  # type: ignore[no-untyped-def]
    nats_server.stop()
    publish = asyncio.create_task(bus.publish(stopped(42)))
    await asyncio.sleep(1.0)
    assert not publish.done()
    nats_server.start()
    await asyncio.wait_for(publish, 30)
    seen: list[str] = []

    async def record(event: AnyEvent, _: Delivery) -> None:
        seen.append(event.event_id)

    task, stop = await consume_in_background(bus, record)
    await eventually(lambda: seen == ["stop-42"], timeout=15)
    stop.set()
    await task


async def test_small_objects_are_read_directly_and_agree_with_the_store(bus: Bus) -> None:
    big = bytes(range(256)) * 2000  # 512 KB: several chunks, the object store's own read
    for key, data in (("small", b"print('hi')\n"), ("empty", b""), ("big", big)):
        await bus.put_object(bus.logs_bucket, key, data)
        fast = await read_small_object(bus.js, bus.logs_bucket, key)
        assert fast == (None if key == "big" else data)
        assert await bus.get_object(bus.logs_bucket, key) == data
        store = await bus.js.object_store(bus.logs_bucket)
        assert bytes((await store.get(key)).data or b"") == data
    await bus.put_object(bus.logs_bucket, "small", b"replaced")
    assert await bus.get_object(bus.logs_bucket, "small") == b"replaced"
    with pytest.raises(KeyError):
        await bus.get_object(bus.logs_bucket, "absent")
