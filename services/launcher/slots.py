"""A launcher's slots: which are free, and the work in hand that waits for one.

A launcher holds a few more messages than it has slots (`prefetch`: an eighth of its slots,
none below 8, at most 64), their sources read ahead: when a run ends its slot is free at once (before
its log and RunFinished are stored), and a run in hand starts on it without a fetch round
trip. When a thousand runs end together (a wave that started together) that is the
difference between starting the next ones now and after every report and fetch. Work that
waits is heartbeated like a run, and handed back when the launcher stops.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from services.bus import TransientError

WAIT_TICK_S = 1.0  # how often work waiting for a slot checks whether the launcher stops


PREFETCH_MAX = 64


def prefetch(slots: int) -> int:
    """Messages a launcher of `slots` slots holds beyond them: at most PREFETCH_MAX, since
    work waiting here is work another launcher of the tier with a free slot cannot take
    (measured: 2 launchers of 2,048 slots, 440 held by one while the other had 187 free)."""
    return min(slots // 8, PREFETCH_MAX)


class Slot:
    """One slot taken; `release()` frees it (once, however often it is called)."""

    def __init__(self, pool: SlotPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool.free.append(self.index)
            self.pool.freed.set()


class SlotPool:
    def __init__(self, slots: int) -> None:
        self.size = slots
        self.free = list(range(slots))
        self.freed = asyncio.Event()

    @property
    def busy(self) -> int:
        return self.size - len(self.free)

    async def take(self, stopping: Callable[[], bool], what: str) -> Slot:
        """The slot free longest; waits for one (TransientError if the launcher stops)."""
        while not self.free:
            if stopping():
                raise TransientError(f"{what}: the launcher is stopping; it will run again")
            self.freed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.freed.wait(), timeout=WAIT_TICK_S)
        return Slot(self, self.free.pop(0))
