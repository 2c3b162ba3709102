"""The proposer service: keeps variants in flight = fleet slots + look-ahead, per campaign.

Wiring only: the history comes from `bus.follow` (replayed from the start, so a restarted
proposer knows what it already proposed) plus a core-NATS fast path on the same types (the
replay hands a lone new event over only at the end of its fetch window), the fleet from the
lossy FleetStatus. The top-up loop is topup.py, a wave waves.py, the projection state.py,
the lease that lets several proposers share the campaigns lease.py.
"""

from __future__ import annotations

import asyncio
import contextlib

from services.bus import Bus
from services.bus.errors import NATS_FAILURES
from services.contracts import FleetStatus
from services.proposer.topup import Proposer, wait_first
from services.settings import Settings
from services.telemetry import get_logger

FLEET_GRACE_S = 1.5  # at start, wait this long for the launchers' slots (they beat every 1 s)

log = get_logger(service="proposer")


async def run(settings: Settings, bus: Bus, stop: asyncio.Event) -> None:
    proposer = Proposer(settings, bus)
    followed = proposer.handlers()
    caught_up = asyncio.Event()
    done = asyncio.Event()  # stops the follower; never sets the caller's `stop`
    follow = asyncio.create_task(
        bus.follow(followed, stop=done, caught_up=caught_up, mark=proposer.mark)
    )
    subs = await bus.subscribe_lossy({FleetStatus: proposer.on_fleet, **followed})
    leases: asyncio.Task[None] | None = None
    try:
        await wait_first(caught_up, stop)
        if not stop.is_set():
            # Leases once the history is read (a campaign it stopped is not claimed).
            leases = asyncio.create_task(
                proposer.leases.keep(proposer.running_names, done, proposer.wake.set)
            )
        # The first wave sized by the fleet, not by the look-ahead alone.
        await wait_first(proposer.fleet_heard, stop, within=FLEET_GRACE_S)
        if not stop.is_set():
            log.info("proposer_caught_up", campaigns=len(proposer.history.campaigns))
            await proposer.loop(stop)
    finally:
        await proposer.close()
        done.set()
        if leases is not None:
            await leases  # releases this proposer's leases: a standby takes them at once
        for sub in subs:
            with contextlib.suppress(*NATS_FAILURES):
                await sub.unsubscribe()
        done.set()
        await follow
