"""A launcher's slots: work in hand beyond them waits for one, freed as soon as a run ends."""

from __future__ import annotations

import asyncio

import pytest

from services.bus import TransientError
from services.launcher.slots import SlotPool, prefetch


async def test_work_in_hand_waits_for_the_slot_a_run_frees() -> None:
    pool = SlotPool(2)
    a = await pool.take(lambda: False, "a")
    b = await pool.take(lambda: False, "b")
    assert (a.index, b.index, pool.busy) == (0, 1, 2)
    waiting = asyncio.create_task(pool.take(lambda: False, "c"))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    b.release()
    b.release()  # once, however often
    c = await asyncio.wait_for(waiting, 1.0)
    assert c.index == 1 and pool.busy == 2 and pool.free == []
    a.release()
    assert pool.free == [0] and pool.busy == 1


async def test_work_waiting_when_the_launcher_stops_is_handed_back() -> None:
    pool = SlotPool(1)
    await pool.take(lambda: False, "a")
    stopping = [False]
    waiting = asyncio.create_task(pool.take(lambda: stopping[0], "run x"))
    await asyncio.sleep(0.05)
    stopping[0] = True
    with pytest.raises(TransientError, match="run x: the launcher is stopping"):
        await asyncio.wait_for(waiting, 3.0)


def test_small_launchers_hold_no_more_than_their_slots() -> None:
    assert [prefetch(n) for n in (1, 4, 7, 8, 256, 1024)] == [0, 0, 0, 1, 32, 64]
