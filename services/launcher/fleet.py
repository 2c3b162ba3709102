"""What a launcher tells the fleet, and how its runs are cancelled.

FleetStatus (slots, busy slots, the work queued for this tier) goes out every second, over
core NATS. A run is cancelled by a RunCancel (one run, or "*" for every run of a campaign),
by its campaign being marked stopped (checked on the same tick), or by the launcher
stopping: then its runs are handed back for redelivery instead of being reported.
"""

from __future__ import annotations

import asyncio
import contextlib

from services import contracts as c
from services.bus import Bus, Delivery, TransientError
from services.bus.errors import NATS_FAILURES
from services.launcher.runs import Launcher
from services.metrics import record_fleet

FLEET_INTERVAL_S = 1.0

# What a tick can meet while the broker is away or refuses (the next tick tries again).
TICK_FAILURES: tuple[type[Exception], ...] = (TransientError, *NATS_FAILURES)


class Fleet:
    def __init__(self, bus: Bus, launcher: Launcher, durable: str) -> None:
        self.bus = bus
        self.launcher = launcher
        self.durable = durable
        self.log = launcher.log

    # --- fleet status -------------------------------------------------------------------

    async def publish_status_until(self, stop: asyncio.Event) -> None:
        """Every FLEET_INTERVAL_S: publish FleetStatus, then cancel stopped campaigns' runs."""
        while not stop.is_set():
            try:
                await self.publish_status()
                await self.cancel_stopped_campaigns()
            except TICK_FAILURES as exc:
                self.log.warning("fleet_status_failed", error=repr(exc))
            except Exception:  # last resort: one bad tick must not end the status for good
                self.log.exception("fleet_tick_failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=FLEET_INTERVAL_S)
        # Leaving: no slots from now on (a SIGKILLed launcher just falls silent, and stops
        # being counted when the others' view of the fleet expires it).
        with contextlib.suppress(*TICK_FAILURES):
            await self.publish_status(leaving=True)

    async def publish_status(self, leaving: bool = False) -> None:
        launcher = self.launcher
        slots = launcher.backend.slots  # runs queued behind a busy GPU (pre-submitted) are not busy
        busy = min(slots, launcher.slots.busy)
        if leaving:
            slots = busy = 0
        queued = await self.count_queued()
        record_fleet(launcher.tier, launcher.launcher_id, slots, busy, queued)
        await self.bus.publish(
            c.FleetStatus(
                campaign="*",
                launcher_id=launcher.launcher_id,
                slots={launcher.tier: slots},
                busy={launcher.tier: busy},
                queued=queued,
            )
        )

    async def count_queued(self) -> int:
        """Messages of this tier's durable not yet delivered; 0 when that cannot be known."""
        try:
            lag = await self.bus.consumer_lag(self.durable)
        except NATS_FAILURES:
            return 0
        return lag.pending if lag is not None else 0

    # --- cancellation -------------------------------------------------------------------

    async def on_cancel(self, event: c.RunCancel, _delivery: Delivery) -> None:
        # Not awaited here: a local run takes its grace period to die, and the subscription
        # delivers the next cancel only after this callback returns.
        self.launcher.background.spawn(self.cancel_runs(event.campaign, event.run_id, event.reason))

    async def cancel_stopped_campaigns(self) -> None:
        for campaign in set(self.launcher.running.values()):
            if await self.bus.campaigns.is_stopped(campaign):
                await self.cancel_runs(campaign, "*", "campaign stopped")

    async def cancel_runs(self, campaign: str, run_id: str, reason: str) -> None:
        """Cancel this launcher's runs of `campaign` named `run_id` ("*": all of them)."""
        targets = [
            r
            for r, camp in self.launcher.running.items()
            if camp == campaign and (run_id == "*" or r == run_id)
        ]
        for target in targets:
            self.log.info("run_cancel_requested", campaign=campaign, run_id=target, reason=reason)
        await asyncio.gather(
            *(self.launcher.backend.cancel(t, reason) for t in targets), return_exceptions=True
        )

    async def hand_back_on(self, stop: asyncio.Event) -> None:
        """On shutdown, stop every run; their work is redelivered (not reported)."""
        await stop.wait()
        launcher = self.launcher
        launcher.stopping = True
        cancels = [launcher.backend.cancel(r, "launcher stopping") for r in list(launcher.running)]
        await asyncio.gather(*cancels, return_exceptions=True)
