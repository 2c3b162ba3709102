"""The launcher service: consumes run work, runs it on a backend, reports what happened.

Wiring only. runs.py turns VariantProposed / RunRequested into runs and reports them;
fleet.py publishes FleetStatus and cancels runs; factory.py picks the backend. The work
comes through the durable `launcher-<tier>`, shared by this tier's launchers, one message
in hand per slot (per `intake`: twice the GPUs on skypilot with pre-submission) and a few
more waiting for one (slots.py); RunCancel comes over core NATS. When `stop` is set, the
runs in hand are handed back for redelivery and the consumer drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import msgspec

from services import contracts as c
from services.bus import Bus
from services.bus.errors import NATS_FAILURES
from services.launcher.factory import make_backend
from services.launcher.fleet import Fleet
from services.launcher.harness import HarnessCache
from services.launcher.runs import Launcher
from services.launcher.slots import prefetch
from services.settings import Settings

MAX_DELIVER = c.MAX_RUN_ATTEMPTS
LEAVING_S = 2.0  # how long a stopping launcher waits to tell the fleet it has no slots


async def run(settings: Settings, bus: Bus, stop: asyncio.Event) -> None:
    """Serve `tier`, or each of `launcher_tiers` (one launcher per tier in this process)."""
    launcher_id = settings.launcher_id or f"{socket.gethostname()}-{os.getpid()}"
    tiers = [t.strip() for t in settings.launcher_tiers.split(",") if t.strip()]
    if not tiers:
        return await serve_tier(settings, bus, stop, launcher_id)
    await asyncio.gather(
        *(
            serve_tier(msgspec.structs.replace(settings, tier=t), bus, stop, f"{launcher_id}-{t}")
            for t in tiers
        )
    )


async def serve_tier(settings: Settings, bus: Bus, stop: asyncio.Event, launcher_id: str) -> None:
    backend = make_backend(settings, launcher_id)
    harness = HarnessCache(settings.runs_path / "harness", bus.sources.get)
    launcher = Launcher(
        bus,
        backend,
        harness,
        launcher_id=launcher_id,
        tier=settings.tier,
        log_tail_lines=settings.log_tail_lines,
        gpu_usd_per_hour=settings.gpu_usd_per_hour,
    )
    durable = f"launcher-{settings.tier}"
    fleet = Fleet(bus, launcher, durable)
    subs = await bus.subscribe_lossy({c.RunCancel: fleet.on_cancel})
    tasks = [
        asyncio.create_task(fleet.publish_status_until(stop)),
        asyncio.create_task(fleet.hand_back_on(stop)),
    ]
    launcher.log.info(
        "launcher_serving", backend=backend.name, tier=settings.tier, slots=backend.slots
    )
    try:
        await bus.consume(
            durable,
            {
                c.VariantProposed: launcher.on_variant_proposed,
                c.RunRequested: launcher.on_run_requested,
            },
            concurrency=backend.intake + prefetch(backend.slots),
            ack_wait_s=settings.ack_wait_s,
            max_deliver=MAX_DELIVER,
            stop=stop,
        )
    finally:
        # The status task's last word (no slots) goes out when it sees `stop`.
        await asyncio.wait(tasks[:1], timeout=LEAVING_S)
        for task in tasks:
            task.cancel()
        launcher.background.cancel()
        for sub in subs:
            with contextlib.suppress(*NATS_FAILURES):
                await sub.unsubscribe()
