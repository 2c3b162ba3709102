"""`nightshift bench fleet`: the whole system (real nats-server, all four services) on the
sim backend, measuring how much of the fleet's time goes to training.

- utilization: the share of slot time spent in runs while work remained (from the first
  run's start to the last run's start; the drain after it is reported separately as
  utilization_with_drain): the published 16-GPU autoresearch run used ~59%;
- overhead: per slot, seconds from a run's end to the next run's start (p50, p95);
- events_per_s: how fast the ledger projects the campaign's history (a replay of the
  whole stream into a fresh SQLite file, sources and logs fetched as in production);
- live_events_per_s: events the ledger applied per second while the fleet ran.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgspec

from services.broker import EmbeddedNats
from services.bus import Bus, Delivery, Handlers, handlers_of
from services.campaign import start_campaign
from services.contracts import CampaignStopped, ResultEvaluated, RunFinished, RunStarted
from services.settings import Settings
from services.supervisor import run_services, wait_until_consumed

REPO = Path(__file__).resolve().parents[1]


@dataclass
class FleetReport:
    slots: int
    experiments: int
    utilization: float  # while work remained: first start to last start
    utilization_with_drain: float  # first start to last finish
    overhead_p50_s: float
    overhead_p95_s: float
    events_per_s: float
    live_events_per_s: float
    run_seconds: float
    wall_s: float
    stream_events: int


@dataclass
class _Observed:
    campaign: str
    slot_of: dict[str, tuple[str, int]] = field(default_factory=dict)
    spans: list[tuple[tuple[str, int], float, float]] = field(default_factory=list)
    results: int = 0
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_run_started(self, event: RunStarted, _: Delivery) -> None:
        if event.campaign == self.campaign:
            self.slot_of[event.run_id] = (event.host, event.slot)

    async def on_run_finished(self, event: RunFinished, _: Delivery) -> None:
        if event.campaign == self.campaign and not event.infra_failure:
            slot = self.slot_of.get(event.run_id, ("?", -1))
            self.spans.append((slot, event.started_at, event.finished_at))

    async def on_result_evaluated(self, event: ResultEvaluated, _: Delivery) -> None:
        if event.campaign == self.campaign and event.status != "infra":
            self.results += 1

    async def on_stopped(self, event: CampaignStopped, _: Delivery) -> None:
        if event.campaign == self.campaign:
            self.stopped.set()

    def handlers(self) -> Handlers:
        return handlers_of(
            self.on_run_started, self.on_run_finished, self.on_result_evaluated, self.on_stopped
        )


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _busy_fraction(spans: list[tuple[float, float]], slots: int, t0: float, t1: float) -> float:
    """Share of slots x [t0, t1] spent inside runs."""
    if t1 <= t0:
        return 0.0
    busy = sum(max(0.0, min(e, t1) - max(s, t0)) for s, e in spans)
    return busy / (slots * (t1 - t0))


def _overheads(spans: list[tuple[tuple[str, int], float, float]]) -> list[float]:
    by_slot: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for slot, start, end in spans:
        by_slot.setdefault(slot, []).append((start, end))
    gaps: list[float] = []
    for runs in by_slot.values():
        runs.sort()
        gaps.extend(max(0.0, nxt[0] - prev[1]) for prev, nxt in itertools.pairwise(runs))
    return gaps


def bench_settings(home: Path, url: str, slots: int, experiments: int, run_s: float) -> Settings:
    return Settings(
        nats_url=url,
        home=str(home),
        backend="sim",
        slots=slots,
        campaign="bench",
        trainer_dir=str(REPO / "trainer"),
        max_experiments=experiments,
        http_port=0,
        sim_budget_s=300.0,
        sim_time_scale=run_s / 300.0,
        run_timeout_s=600.0,
        log_format="json",
        log_level="warning",
        noise_floor=7e-4,
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a `python -m services.<name>` process these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIGHTSHIFT_")}
    for f in msgspec.structs.fields(Settings):
        value = getattr(settings, f.name)
        if value != f.default:
            env[f"NIGHTSHIFT_{f.name.upper()}"] = str(value)
    env["NATS_URL"] = settings.nats_url
    return env


class ServiceProcesses:
    """The four services as separate processes, as a distributed deployment runs them."""

    def __init__(self, settings: Settings) -> None:
        env = settings_env(settings)
        logs = Path(settings.home)
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"],
                env=env,
                stdout=(logs / f"{name}.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
            for name in ("ledger", "evaluator", "launcher", "proposer")
        ]

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


async def fleet_bench(
    slots: int, experiments: int = 0, run_seconds: float = 0.0, processes: bool = True
) -> FleetReport:
    experiments = experiments or slots * 6
    # Runs are compressed from 300 s to run_seconds: the fleet then needs slots/run_seconds
    # runs per second from two cores. Keep that near 8/s at every fleet size.
    run_seconds = run_seconds or max(2.0, slots / 8.0)
    with tempfile.TemporaryDirectory(prefix="nightshift-bench-") as tmp:
        home = Path(tmp)
        server = EmbeddedNats(home / "nats").start()
        try:
            return await _bench(home, server.url, slots, experiments, run_seconds, processes)
        finally:
            server.stop()


async def _bench(
    home: Path, url: str, slots: int, experiments: int, run_s: float, processes: bool
) -> FleetReport:
    settings = bench_settings(home, url, slots, experiments, run_s)
    stop = asyncio.Event()
    children: ServiceProcesses | None = None
    if processes:
        buses: list[Bus] = []
        tasks: list[asyncio.Task[None]] = []
        children = ServiceProcesses(settings)
    else:
        buses, tasks = await run_services(settings, url, stop)
    bus = await Bus.from_settings(settings, "bench")
    observed = _Observed(settings.campaign)
    follower = asyncio.create_task(bus.follow(observed.handlers(), stop=stop))
    t0 = time.monotonic()
    await start_campaign(bus, settings)
    await observed.stopped.wait()
    await wait_until_consumed(bus, "ledger", timeout_s=120)
    live_s = time.monotonic() - t0
    stop.set()
    if children is not None:
        await asyncio.to_thread(children.stop)
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    await follower
    events = await bus.last_seq()  # limits retention, nothing deleted: the event count
    replay_rate = await _ledger_replay(bus, settings)
    for b in (bus, *buses):
        await b.close()
    spans = [(s, e) for _, s, e in observed.spans]
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    last_start = max(s for s, _ in spans)
    gaps = _overheads(observed.spans)
    return FleetReport(
        slots=slots,
        experiments=observed.results,
        utilization=round(_busy_fraction(spans, slots, first, last_start), 4),
        utilization_with_drain=round(_busy_fraction(spans, slots, first, last), 4),
        overhead_p50_s=round(_percentile(gaps, 50), 4),
        overhead_p95_s=round(_percentile(gaps, 95), 4),
        events_per_s=round(replay_rate, 1),
        live_events_per_s=round(events / live_s, 1),
        run_seconds=run_s,
        wall_s=round(last - first, 2),
        stream_events=events,
    )


async def _ledger_replay(bus: Bus, settings: Settings) -> float:
    """Project the whole stream into a fresh ledger and return events per second.

    Timed from the first event the new ledger acknowledges to the last, so the start-up
    of the service (connect, HTTP server) is not counted.
    """
    await bus.reset_consumer("ledger")
    replay = msgspec.structs.replace(settings, ledger_db=str(Path(settings.home) / "replay.db"))
    stop = asyncio.Event()
    buses, tasks = await run_services(replay, settings.nats_url, stop, names=["ledger"])
    first: tuple[float, int] | None = None
    last: tuple[float, int] = (time.monotonic(), 0)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # samples the ledger's progress every 20 ms
        lag = await bus.consumer_lag("ledger")
        now = time.monotonic()
        if lag is not None and lag.acked_seq > 0:
            first = first or (now, lag.acked_seq)
            last = (now, lag.acked_seq)
            if lag.pending == 0 and lag.ack_pending == 0:
                break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait(tasks, timeout=30)
    for b in buses:
        await b.close()
    if first is None or last[0] <= first[0]:
        return 0.0
    return (last[1] - first[1]) / (last[0] - first[0])


def print_report(report: FleetReport, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(asdict(report)))
        return
    print(
        f"slots {report.slots}: {report.experiments} experiments in {report.wall_s:.1f} s "
        f"(simulated runs of {report.run_seconds:.1f} s)\n"
        f"  slot utilization   {report.utilization * 100:.1f}% while work remained, "
        f"{report.utilization_with_drain * 100:.1f}% with the final drain "
        "(published 16-GPU run: ~59%)\n"
        f"  overhead per run   p50 {report.overhead_p50_s * 1000:.0f} ms, "
        f"p95 {report.overhead_p95_s * 1000:.0f} ms (a run's end to the next start on its slot)\n"
        f"  ledger             {report.events_per_s:.0f} events/s (replay), "
        f"{report.live_events_per_s:.0f} events/s live ({report.stream_events} events)"
    )
