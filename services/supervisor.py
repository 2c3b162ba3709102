"""`nightshift up`: a private nats-server and the four services in one process.

The services are the same `run()` functions `python -m services.<name>` runs, each with its
own NATS connection; the supervisor only starts them, starts (or resumes) the campaign,
prints a line per finished experiment and stops everything on Ctrl-C or completion.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO, TypeVar

import msgspec
import stamina

from services.broker import EmbeddedNats
from services.bus import Bus, Delivery, Handlers, handlers_on
from services.campaign import start_campaign
from services.contracts import (
    BestUpdated,
    CampaignStarted,
    CampaignStopped,
    ProposerHalted,
    ResultEvaluated,
    VariantDecided,
    VariantProposed,
)
from services.runner import ServiceMain
from services.settings import Settings
from services.telemetry import get_logger

log = get_logger(component="supervisor")
PRINT_DELAY_S = 0.5


T = TypeVar("T")


class NotYet(Exception):
    """A condition polled for is not true yet (retried until its deadline)."""


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
    verdicts: dict[str, str] = field(default_factory=dict)  # variant -> latest decision

    def handlers(self) -> Handlers:
        return handlers_on(self)  # its on_* methods

    async def on_campaign_started(self, event: CampaignStarted, _: Delivery) -> None:
        pass  # followed so that the history is read up to the campaign's (re)start

    async def on_variant_proposed(self, event: VariantProposed, _: Delivery) -> None:
        if event.campaign == self.campaign:
            self.titles[event.variant_id] = event.title

    async def on_best_updated(self, event: BestUpdated, _: Delivery) -> None:
        if event.campaign == self.campaign:
            self.best = event.value

    async def on_variant_decided(self, event: VariantDecided, _: Delivery) -> None:
        if event.campaign != self.campaign:
            return
        # The best's mean moves with its replicates (no BestUpdated for that).
        self.best = event.mean_candidate if event.decision == "keep" else event.mean_best
        # A verdict line closes a close call only (replicates were asked for it), not a
        # variant that merely waited for the seed's first result.
        if event.decision == "undecided" and event.replicates_requested:
            self.verdicts[event.variant_id] = "replicating"
        close_call = self.verdicts.get(event.variant_id) == "replicating"
        if event.decision != "undecided":
            self.verdicts[event.variant_id] = event.decision
        if not self.live:
            return
        title = self.titles.get(event.variant_id, event.variant_id)
        if event.decision == "undecided" and event.replicates_requested:
            print(close_call_line(event, title), file=self.out, flush=True)
        elif event.decision != "undecided" and close_call:
            print(verdict_line(event, title), file=self.out, flush=True)

    async def on_result_evaluated(self, event: ResultEvaluated, _: Delivery) -> None:
        if event.campaign != self.campaign or event.status == "infra":
            return
        if event.replica > 0:  # a replicate, not a new experiment
            if self.live:
                print(replicate_line(event, self.metric), file=self.out, flush=True)
            return
        self.finished += 1
        if self.live:
            # The ledger's keep decision (BestUpdated) follows the result by milliseconds;
            # print once it had the chance to land.
            asyncio.get_running_loop().call_later(
                PRINT_DELAY_S, self.print_result, event, self.finished
            )

    async def on_proposer_halted(self, event: ProposerHalted, _: Delivery) -> None:
        if event.campaign == self.campaign and self.live:
            print(f"proposer halted: {event.reason} {event.detail}", file=self.out, flush=True)

    async def on_campaign_stopped(self, event: CampaignStopped, _: Delivery) -> None:
        if event.campaign == self.campaign:
            self.stop_reason = f"{event.reason}: {event.detail}".strip(": ")
            self.completed.set()

    def print_result(self, event: ResultEvaluated, number: int) -> None:
        value = f"{event.value:.6f}" if event.value is not None else "-".ljust(8)
        best = f"{self.best:.6f}" if self.best is not None else "-"
        title = self.titles.get(event.variant_id, event.variant_id)
        reason = f"  ({event.crash_reason[:60]})" if event.crash_reason else ""
        print(
            f"[{number:4d}] {event.status:<8} {self.metric} {value}  best {best}  {title}{reason}",
            file=self.out,
            flush=True,
        )


def close_call_line(event: VariantDecided, title: str) -> str:
    """The live view's line for a candidate inside the margin (or past it on a single run
    while the noise is measured on few degrees of freedom): the replicates requested."""
    gain = abs((event.mean_best or 0.0) - (event.mean_candidate or 0.0))
    margin = event.margin or 0.0
    why = "" if gain < margin else f", {event.reason}"
    return (
        f"       close call: {title}: better by {gain:.6f} {'<' if gain < margin else '>'} "
        f"margin {margin:.6f} (n {event.n_candidate} vs {event.n_best}{why}); "
        f"{event.replicates_requested} replicate run(s) requested"
    )


def verdict_line(event: VariantDecided, title: str) -> str:
    """The live view's line for the verdict on a close call (and the runs it cancelled)."""
    cancelled = len(event.cancelled_runs)
    return (
        f"       {event.decision} after replicates: {title}: mean {event.mean_candidate or 0:.6f} "
        f"(n {event.n_candidate}) vs best {event.mean_best or 0:.6f} (n {event.n_best}): "
        f"{event.reason}" + (f"; {cancelled} run(s) still out cancelled" if cancelled else "")
    )


def replicate_line(event: ResultEvaluated, metric: str) -> str:
    if event.crash_reason.startswith("cancelled"):  # a decision made it useless mid-run
        return f"       replicate {event.run_id}: {event.crash_reason}"
    value = f"{event.value:.6f}" if event.value is not None else "-"
    return f"       replicate {event.run_id}: {event.status} {metric} {value}"


async def wait_until(check: Callable[[], Awaitable[T]], timeout_s: float) -> T | None:
    """`check()`'s value once it stops raising NotYet (polled with a short back-off);
    None when it still raises NotYet after `timeout_s`."""
    try:
        async for attempt in stamina.retry_context(
            on=NotYet, attempts=None, timeout=timeout_s, wait_initial=0.05, wait_max=0.2
        ):
            with attempt:
                return await check()
    except NotYet:
        pass
    return None


async def wait_for_ledger_url(home: Path, timeout_s: float = 20.0) -> str:
    """The ledger's address once it listens (it writes `<home>/ledger.url`)."""
    path = home / "ledger.url"

    async def read_url() -> str:
        if not path.exists():
            raise NotYet(str(path))
        return path.read_text().strip()

    url = await wait_until(read_url, timeout_s)
    return "(ledger HTTP not up yet)" if url is None else url


async def wait_until_consumed(bus: Bus, durable: str, timeout_s: float = 30.0) -> bool:
    """Wait until a durable consumer has nothing pending or unacked (the ledger caught up)."""

    async def caught_up() -> bool:
        lag = await bus.consumer_lag(durable)
        if lag is None or lag.pending or lag.ack_pending:
            raise NotYet(f"consumer {durable}: {lag}")
        return True

    return await wait_until(caught_up, timeout_s) is not None


async def run_services(
    settings: Settings, url: str, stop: asyncio.Event, names: list[str] | None = None
) -> tuple[list[Bus], list[asyncio.Task[None]]]:
    mains = service_mains()
    buses: list[Bus] = []
    tasks: list[asyncio.Task[None]] = []
    for name in names or list(mains):
        svc_bus = await Bus.from_settings(msgspec.structs.replace(settings, nats_url=url), name)
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
    print(
        f"service {task.get_name()} stopped unexpectedly: {exc!r}; shutting down", file=sys.stderr
    )
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
    bus = await Bus.from_settings(settings, "up")
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
    follower = asyncio.create_task(bus.follow(view.handlers(), stop=stop, caught_up=caught_up))
    await asyncio.wait_for(caught_up.wait(), 60)
    limit = settings.max_experiments
    if view.completed.is_set() and limit and view.finished >= limit:
        print(
            f"campaign {settings.campaign!r} already finished {view.finished} experiments "
            f"(--max-experiments {limit}); raise --max-experiments to go on, or start "
            "another with --campaign NAME",
            file=out,
        )
        stop.set()
        await follower
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
        print(
            f"campaign {event.campaign} {view.stop_reason}; {view.finished} experiments, "
            f"best {'none' if view.best is None else f'{view.best:.6f}'}. "
            f"The ledger stays in {settings.ledger_path}.",
            file=out,
        )
    else:
        print("stopping (Ctrl-C): running experiments will be re-run on resume", file=out)
    stop.set()
    waiter.cancel()
    await asyncio.gather(waiter, stopper, follower, return_exceptions=True)
    return 0


def _print_banner(
    settings: Settings, event: CampaignStarted, resumed: bool, view: LiveView, url: str, out: TextIO
) -> None:
    verb = "resuming" if resumed else "started"
    limit = f", stops after {event.max_experiments}" if event.max_experiments else ""
    print(
        f"nightshift: {verb} campaign {event.campaign!r} ({settings.backend} backend, "
        f"{settings.slots} slot(s), strategy {event.proposer.strategy}{limit})\n"
        f"  ledger + dashboard: {url}\n"
        f"  {view.finished} experiments finished so far; Ctrl-C stops, `nightshift up` resumes",
        file=out,
        flush=True,
    )


async def _shutdown(
    tasks: list[asyncio.Task[None]], buses: list[Bus], server: EmbeddedNats | None
) -> None:
    """Let the services finish (their handlers in hand), then drain, then stop the broker."""
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=30)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # retrieved: nothing is printed
    for bus in buses:
        try:
            await asyncio.wait_for(bus.close(), 5)
        except TimeoutError:
            log.warning("drain_timed_out", connection=bus.nc.options.get("name"))
    if server is not None:
        server.stop()
