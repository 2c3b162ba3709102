"""Run one service as its own process: `python -m services.<name>`.

Configuration comes from the environment (see services/settings.py); SIGTERM and SIGINT
stop the service cleanly (handlers in hand finish, then the connection drains).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from services.bus import Bus
from services.settings import Settings, load_settings
from services.telemetry import configure_logging, configure_tracing, get_logger

ServiceMain = Callable[[Settings, Bus, asyncio.Event], Coroutine[Any, Any, None]]


async def serve(name: str, run: ServiceMain, settings: Settings) -> None:
    if not settings.nats_url:
        raise SystemExit(f"{name}: set NATS_URL to the NATS server to use")
    bus = await Bus.connect(settings.nats_url, prefix=settings.subject_prefix,
                            name=f"nightshift-{name}", creds=settings.nats_creds)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log = get_logger(service=name)
    log.info("service_started", nats_url=settings.nats_url)
    try:
        await run(settings, bus, stop)
    finally:
        await bus.close()
        log.info("service_stopped")


def run_service(name: str, run: ServiceMain) -> None:
    settings = load_settings()
    configure_logging(name, settings.log_format, settings.log_level)
    configure_tracing(name)
    asyncio.run(serve(name, run, settings))
