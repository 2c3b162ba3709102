"""The campaign lease of several proposers: the logic alone (no broker, a clock in hand),
then the compare-and-set on a real nats-server's KV, keepers contending for it, and
the follow mark a new holder waits on."""

from __future__ import annotations

import asyncio
import contextlib
import time

from services.bus import Bus, Delivery, FollowMark, LeaseEntry
from services.contracts import ProposerHalted
from services.proposer.lease import LeaseBook, LeaseKeeper, Step
from tests.eventually import eventually

TTL = 3.0


def test_a_free_lease_is_created_and_held_until_a_ttl_after_the_write_was_sent() -> None:
    book = LeaseBook("a", TTL)
    assert book.plan("c", None, now=10.0) == (Step.CREATE, 0)
    assert not book.holds("c", 10.0)
    assert book.wrote("c", Step.CREATE, 7, sent_at=10.0) is True
    assert book.holds("c", 12.9)
    assert not book.holds("c", 13.0)  # not renewed: lapsed
    # Renewed on our revision, and only on it.
    assert book.plan("c", LeaseEntry("a", 7), now=11.0) == (Step.RENEW, 7)
    assert book.wrote("c", Step.RENEW, 8, sent_at=11.0) is False  # kept, not acquired
    assert book.holds("c", 13.5)


def test_a_standby_takes_only_a_revision_unchanged_for_a_whole_ttl() -> None:
    standby = LeaseBook("b", TTL)
    assert standby.plan("c", LeaseEntry("a", 1), now=0.0) == (Step.WAIT, 1)
    assert standby.plan("c", LeaseEntry("a", 2), now=1.0) == (Step.WAIT, 2)  # renewed
    assert standby.plan("c", LeaseEntry("a", 2), now=3.9) == (Step.WAIT, 2)
    assert standby.plan("c", LeaseEntry("a", 2), now=4.0) == (Step.TAKE, 2)
    assert standby.wrote("c", Step.TAKE, 3, sent_at=4.0) is True
    assert standby.holds("c", 4.1)


def test_the_holder_stops_before_any_standby_can_take_over() -> None:
    """The holder counts from when it sent its write; a standby from when it first read
    the result, which is later: their windows never overlap, whatever the timing."""
    holder, standby = LeaseBook("a", TTL), LeaseBook("b", TTL)
    holder.plan("c", None, now=0.0)
    holder.wrote("c", Step.CREATE, 1, sent_at=0.0)
    for read_at in (0.01, 0.5, 2.0):  # the standby's first read of revision 1
        standby.forget("c")
        standby.plan("c", LeaseEntry("a", 1), now=read_at)
        took_at = next(
            t / 100
            for t in range(0, 1000)
            if standby.plan("c", LeaseEntry("a", 1), t / 100)[0] is Step.TAKE
        )
        assert not holder.holds("c", took_at), (read_at, took_at)


def test_a_lost_compare_and_set_is_not_a_lease() -> None:
    book = LeaseBook("a", TTL)
    book.plan("c", None, now=0.0)
    assert book.wrote("c", Step.CREATE, None, sent_at=0.0) is False  # another created first
    assert not book.holds("c", 0.1)
    book.wrote("c", Step.CREATE, 1, sent_at=0.0)
    # Rewritten by another since (it took the lease over): ours no more, nothing to renew.
    assert book.plan("c", LeaseEntry("b", 5), now=1.0) == (Step.WAIT, 5)
    assert not book.holds("c", 1.0)
    assert book.held() == []


async def test_writes_are_compare_and_set_on_the_kv(bus: Bus) -> None:
    kv = bus.campaigns
    assert await kv.read_lease("c") is None
    first = await kv.write_lease("c", "a", 0)
    assert first is not None
    assert await kv.write_lease("c", "b", 0) is None  # exists: create fails
    assert await kv.read_lease("c") == LeaseEntry("a", first)
    second = await kv.write_lease("c", "a", first)
    assert second is not None and second > first
    assert await kv.write_lease("c", "b", first) is None  # a stale revision
    await kv.release_lease("c", first)  # not ours any more at that revision: kept
    assert await kv.read_lease("c") == LeaseEntry("a", second)
    await kv.release_lease("c", second)
    assert await kv.read_lease("c") is None
    assert await kv.write_lease("c", "b", 0) is not None  # free again after a release


async def _keeping(
    keeper: LeaseKeeper, names: list[str], stop: asyncio.Event
) -> asyncio.Task[None]:
    return asyncio.create_task(keeper.keep(lambda: names, stop, lambda: None))


async def _renewing(keeper: LeaseKeeper) -> None:
    """A keeper's steps without its release on the way out: cancelled, it just goes silent
    (as a SIGKILLed proposer does)."""
    while True:
        await keeper.step("c")
        await asyncio.sleep(keeper.renew_s)


async def test_one_of_two_keepers_holds_and_the_other_takes_over_a_silent_one(bus: Bus) -> None:
    a = LeaseKeeper(bus, ttl_s=2.5, renew_s=0.2, holder="a")
    b = LeaseKeeper(bus, ttl_s=2.5, renew_s=0.2, holder="b")
    task_a = asyncio.create_task(_renewing(a))
    await eventually(lambda: a.holds("c"), 10, "a to take the free lease")
    stop_b = asyncio.Event()
    task_b = await _keeping(b, ["c"], stop_b)
    try:
        for _ in range(10):  # a renews: b never takes it
            await asyncio.sleep(0.2)
            assert a.holds("c") and not b.holds("c")
        task_a.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task_a
        silent_at = time.monotonic()
        await eventually(lambda: b.holds("c"), 10, "b to take the lapsed lease")
        # Not before the ttl ran out (counted from b's first read of a's last renewal).
        assert time.monotonic() - silent_at >= 2.5 - 0.3
        assert not a.holds("c")
    finally:
        stop_b.set()
        await task_b


async def test_a_stopping_keeper_releases_and_the_standby_takes_it_at_once(bus: Bus) -> None:
    a = LeaseKeeper(bus, ttl_s=30.0, renew_s=0.2, holder="a")
    b = LeaseKeeper(bus, ttl_s=30.0, renew_s=0.2, holder="b")
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    task_a = await _keeping(a, ["c"], stop_a)
    await eventually(lambda: a.holds("c"), 10, "a to take the free lease")
    task_b = await _keeping(b, ["c"], stop_b)
    try:
        stop_a.set()
        await task_a
        # Far sooner than the 30 s ttl: the lease was deleted, not left to lapse.
        await eventually(lambda: b.holds("c"), 5, "b to take the released lease")
    finally:
        stop_b.set()
        await task_b
    assert await bus.campaigns.read_lease("c") is None  # b released it in turn


async def test_the_follow_mark_passes_a_moment_once_all_stored_before_it_is_handled(
    bus: Bus,
) -> None:
    """What a new holder waits for: the history read past the moment it took the lease."""
    for k in range(40):
        await bus.publish(ProposerHalted(campaign="c", event_id=f"h{k}", reason="test"))
    took_at = time.monotonic()
    handled: list[str] = []
    mark = FollowMark()

    async def slow(event: ProposerHalted, _: Delivery) -> None:
        await asyncio.sleep(0.01)  # a follower behind the stream
        handled.append(event.event_id)

    stop = asyncio.Event()
    follow = asyncio.create_task(bus.follow({ProposerHalted: slow}, stop=stop, mark=mark))
    try:
        await eventually(lambda: mark.synced_at >= took_at, 20, "the follow to pass the moment")
        assert len(handled) == 40
    finally:
        stop.set()
        await follow
