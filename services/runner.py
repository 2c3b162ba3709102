"""Run one service as its own process: `python -m services.<name>`.

The shape of nats.py's examples/micro/service.py: connect (Bus.from_settings), start the
service's handlers, wait for SIGTERM or SIGINT, then stop cleanly (handlers in hand
finish, then the connection drains). Configuration comes from the environment
(services/settings.py).
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from services.bus import Bus
from services.metrics import configure_metrics
from services.settings import Settings, SettingsError
from services.settings_loader import load_settings
from services.telemetry import configure_logging, configure_tracing, get_logger

# A diagnostic, not a setting: a folder where each service process writes its cProfile
# statistics (`<name>-<pid>.prof`) when it stops (`nightshift bench fleet --profile-dir`).
PROFILE_DIR_ENV = "NIGHTSHIFT_CPROFILE_DIR"

# A service: its handlers run on `bus` until `stop` is set.
ServiceMain = Callable[[Settings, Bus, asyncio.Event], Coroutine[Any, Any, None]]


async def serve(name: str, run: ServiceMain, settings: Settings) -> None:
    # Waits for the broker (and its JetStream) as long as it takes: a service ends only on
    # a signal or a fatal configuration error (a refused login, bad settings).
    bus = await Bus.from_settings(settings, name, connect_timeout_s=None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log = get_logger(service=name)
    log.info("service_started", nats_url=settings.redacted()["nats_url"])
    try:
        await run(settings, bus, stop)
    finally:
        await bus.close()
        log.info("service_stopped")


def run_service(name: str, run: ServiceMain) -> None:
    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.exit(f"{name}: {exc}")
    configure_logging(name, settings.log_format, settings.log_level)
    configure_tracing(name)
    configure_metrics(name)
    profile_dir = os.environ.get(PROFILE_DIR_ENV, "")
    profiler = cProfile.Profile() if profile_dir else None
    if profiler is not None:
        profiler.enable()
    try:
        asyncio.run(serve(name, run, settings))
    except ConnectionError as exc:
        sys.exit(f"{name}: {exc}")
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(os.path.join(profile_dir, f"{name}-{os.getpid()}.prof"))
