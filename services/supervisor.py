"""`nightshift up`: a private nats-server and the four services in one process.

The services are the same `run()` functions `python -m services.<name>` runs, each with its
own NATS connection; the supervisor only starts them, starts (or resumes) the campaign,
prints a line per finished experiment and stops everything on Ctrl-C or completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import msgspec

from services.broker import EmbeddedNats
from services.bus import Bus
from services.campaign import start_campaign
from services.contracts import (
    AnyEvent,
    BestUpdated,
    CampaignStarted,
    CampaignStopped,
    ProposerHalted,
    ResultEvaluated,
    VariantProposed,
)
from services.settings import Settings
from services.telemetry import get_logger

ServiceMain = Callable[[Settings, Bus, asyncio.Event], Coroutine[Any, Any, None]]
log = get_logger(component="supervisor")
PRINT_DELAY_S = 0.5


def service_mains() -> dict[str, ServiceMain]:
    from services.evaluator.service import run as evaluator
    from services.launcher.service import run as launcher
    from services.ledger.service import run as ledger
    from services.proposer.service import run as proposer

    return {"ledger": ledger, "evaluator": evaluator, "launcher": launcher, "proposer": proposer}


@dataclass
class LiveView:
    """Prints one line per finished experiment of a campaign."""

    campaign: str
    metric: str = "val_bpb"
    out: TextIO = sys.stdout
    titles: dict[str, str] = field(default_factory=dict)
    best: float | None = None
    finished: int = 0
    live: bool = False
    completed: asyncio.Event = field(default_factory=asyncio.Event)
    stop_reason: str = ""

    async def on_event(self, event: AnyEvent, _: int) -> None:
        if event.campaign != self.campaign:
            return
        if isinstance(event, VariantProposed):
            self.titles[event.variant_id] = event.title
        elif isinstance(event, BestUpdated):
            self.best = event.value
        elif isinstance(event, ResultEvaluated) and event.status != "infra":
            self.finished += 1
            if self.live:
                # The ledger's keep decision (BestUpdated) follows the result by
                # milliseconds; print once it had the chance to land.
                number = self.finished
                asyncio.get_running_loop().call_later(
                    PRINT_DELAY_S, self.print_result, event, number)
        elif isinstance(event, ProposerHalted) and self.live:
            print(f"proposer halted: {event.reason} {event.detail}", file=self.out, flush=True)
        elif isinstance(event, CampaignStopped):
            self.stop_reason = f"{event.reason}: {event.detail}".strip(": ")
            self.completed.set()

    def print_result(self, event: ResultEvaluated, number: int) -> None:
        value = f"{event.value:.6f}" if event.value is not None else "-".ljust(8)
        best = f"{self.best:.6f}" if self.best is not None else "-"
        title = self.titles.get(event.variant_id, event.variant_id)
        reason = f"  ({event.crash_reason[:60]})" if event.crash_reason else ""
        print(
            f"[{number:4d}] {event.status:<8} {self.metric} {value}  best {best}  "
            f"{title}{reason}",
            file=self.out, flush=True,
        )


async def wait_for_ledger_url(home: Path, timeout_s: float = 20.0) -> str:
    path = home / "ledger.url"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text().strip()
        await asyncio.sleep(0.1)
    return "(ledger HTTP not up yet)"


async def wait_until_consumed(bus: Bus, durable: str, timeout_s: float = 30.0) -> None:
    """Wait until a durable consumer has nothing pending or unacked (the ledger caught up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            info = await bus.js.consumer_info(bus.stream, durable)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return
        await asyncio.sleep(0.2)


async def run_services(
    settings: Settings, url: str, stop: asyncio.Event, names: list[str] | None = None
) -> tuple[list[Bus], list[asyncio.Task[None]]]:
    mains = service_mains()
    buses: list[Bus] = []
    tasks: list[asyncio.Task[None]] = []
    for name in names or list(mains):
        svc_bus = await Bus.connect(url, prefix=settings.subject_prefix, name=f"nightshift-{name}")
        buses.append(svc_bus)
        task = asyncio.create_task(mains[name](settings, svc_bus, stop), name=name)
        task.add_done_callback(lambda t: _on_service_exit(t, stop))
        tasks.append(task)
    return buses, tasks


def _on_service_exit(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    if task.cancelled() or stop.is_set():
        return
    exc = task.exception()
    log.error("service_exited", service=task.get_name(), error=repr(exc))
    print(f"service {task.get_name()} stopped unexpectedly: {exc!r}; shutting down",
          file=sys.stderr)
    stop.set()


async def up(settings: Settings, out: TextIO = sys.stdout) -> int:
    """Run everything until Ctrl-C, a stop, or `max_experiments` finished experiments."""
    home = Path(settings.home)
    home.mkdir(parents=True, exist_ok=True)
    server: EmbeddedNats | None = None
    url = settings.nats_url
    if not url:
        server = EmbeddedNats(home / "nats").start()
        url = server.url
    settings = msgspec.structs.replace(settings, nats_url=url)
    if settings.backend == "sim" and settings.noise_floor == 0:
        # The simulated fleet's spread is known: the proposer need not assume the cpu one.
        settings = msgspec.structs.replace(settings, noise_floor=settings.sim_noise)
    (home / "ledger.url").unlink(missing_ok=True)  # the ledger writes it anew when it listens
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bus = await Bus.connect(url, prefix=settings.subject_prefix, name="nightshift-up")
    buses, tasks = await run_services(settings, url, stop)
    try:
        return await _run_campaign(settings, bus, stop, home, out)
    finally:
        stop.set()
        await _shutdown(tasks, [bus, *buses], server)


async def _run_campaign(
    settings: Settings, bus: Bus, stop: asyncio.Event, home: Path, out: TextIO
) -> int:
    view = LiveView(settings.campaign, metric=settings.metric, out=out)
    caught_up = asyncio.Event()
    follower = asyncio.create_task(bus.follow(
        [CampaignStarted, VariantProposed, ResultEvaluated, BestUpdated, CampaignStopped,
         ProposerHalted], view.on_event, stop=stop, caught_up=caught_up))
    await asyncio.wait_for(caught_up.wait(), 60)
    limit = settings.max_experiments
    if view.completed.is_set() and limit and view.finished >= limit:
        print(f"campaign {settings.campaign!r} already finished {view.finished} experiments "
              f"(--max-experiments {limit}); raise --max-experiments to go on, or start "
              "another with --campaign NAME", file=out)
        follower.cancel()
        return 0
    view.completed.clear()  # a stop from an earlier session does not end this one
    event, resumed = await start_campaign(bus, settings)
    view.live = True
    url = await wait_for_ledger_url(home)
    _print_banner(settings, event, resumed, view, url, out)
    waiter = asyncio.create_task(view.completed.wait())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
    if view.completed.is_set():
        await wait_until_consumed(bus, "ledger")
        await asyncio.sleep(PRINT_DELAY_S * 1.5)  # the last result lines
        print(f"campaign {event.campaign} {view.stop_reason}; {view.finished} experiments, "
              f"best {view.best}. The ledger stays in {settings.ledger_path}.", file=out)
    else:
        print("stopping (Ctrl-C): running experiments will be re-run on resume", file=out)
    stop.set()
    for task in (waiter, stopper, follower):
        task.cancel()
    return 0


def _print_banner(
    settings: Settings, event: CampaignStarted, resumed: bool, view: LiveView, url: str,
    out: TextIO,
) -> None:
    verb = "resuming" if resumed else "started"
    limit = f", stops after {event.max_experiments}" if event.max_experiments else ""
    print(
        f"nightshift: {verb} campaign {event.campaign!r} ({settings.backend} backend, "
        f"{settings.slots} slot(s), strategy {event.proposer.strategy}{limit})\n"
        f"  ledger + dashboard: {url}\n"
        f"  {view.finished} experiments finished so far; Ctrl-C stops, `nightshift up` resumes",
        file=out, flush=True,
    )


async def _shutdown(
    tasks: list[asyncio.Task[None]], buses: list[Bus], server: EmbeddedNats | None
) -> None:
    done, pending = await asyncio.wait(tasks, timeout=30) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    for bus in buses:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(bus.close(), 5)
    if server is not None:
        server.stop()
