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
import contextlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgspec

from services.bench_processes import ServiceProcesses, Topology
from services.bench_stats import (
    Span,
    busy_fraction,
    last_queued,
    overheads,
    percentile,
    rate_of_first,
    read_peak_rss_mb,
    sampled_rate,
    time_to_full,
)
from services.broker import EmbeddedNats
from services.bus import Bus, Delivery, Handlers, handlers_on
from services.bus.errors import NATS_FAILURES
from services.campaign import start_campaign
from services.contracts import (
    CampaignStopped,
    ResultEvaluated,
    RunFinished,
    RunStarted,
    VariantProposed,
)
from services.settings import KeepRuleName, Settings
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
    events_per_s: float  # the ledger's replay (kept under its first name)
    live_events_per_s: float
    run_seconds: float
    wall_s: float
    stream_events: int
    time_to_full_s: float | None = None  # campaign start -> every slot busy at once
    # first start -> the last moment work waited to be delivered: what the control plane costs
    # while it has work, without the campaign's tail (too few experiments left to fill it)
    utilization_while_queued: float = 0.0
    proposals_per_s: float = 0.0  # the first wave's proposals (the first `slots` of them)
    run_starts_per_s: float = 0.0  # the first wave's run starts (the first `slots` of them)
    ledger_live_events_per_s: float = 0.0  # the ledger's acks while the fleet ran
    ledger_replay_events_per_s: float = 0.0
    ledger_lag_max: int = 0  # events stored but not yet applied by the ledger, at most
    proposers: int = 1
    launchers: int = 1
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # each process's VmHWM


@dataclass
class _Observed:
    campaign: str
    slot_of: dict[str, tuple[str, int]] = field(default_factory=dict)
    spans: list[Span] = field(default_factory=list)
    proposed_at: list[float] = field(default_factory=list)
    results: int = 0
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_variant_proposed(self, event: VariantProposed, _: Delivery) -> None:
        if event.campaign == self.campaign:
            self.proposed_at.append(event.ts)

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
        return handlers_on(self)  # its on_* methods


def bench_settings(
    home: Path,
    url: str,
    slots: int,
    experiments: int,
    run_s: float,
    keep_rule: KeepRuleName = "noise-aware",
) -> Settings:
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
        keep_rule=keep_rule,
        noise_runs=1 if keep_rule == "strict" else 3,  # strict: one run per variant
    )


async def fleet_bench(
    slots: int,
    experiments: int = 0,
    run_seconds: float = 0.0,
    processes: bool = True,
    topology: Topology | None = None,
) -> FleetReport:
    experiments = experiments or default_experiments(slots)
    run_seconds = run_seconds or default_run_seconds(slots)
    topology = topology or Topology()
    with tempfile.TemporaryDirectory(prefix="nightshift-bench-") as tmp:
        home = Path(topology.keep_dir or tmp)
        home.mkdir(parents=True, exist_ok=True)
        server = EmbeddedNats(home / "nats").start()
        try:
            return await _bench(home, server, slots, experiments, run_seconds, processes, topology)
        finally:
            server.stop()


def default_run_seconds(slots: int) -> float:
    """How long one simulated run takes by default: up to 256 slots the fleet asks for ~8
    runs per second; 1,024 slots get 64 s runs (16 runs/s), larger fleets 128 s (4,096:
    32 runs/s; a real fleet of 4,096 with 300 s runs asks for 13.7/s), so that a benchmark
    ends within ~10 minutes on two cores and the first wave's fill (~20 s at 4,096) is not
    a third of a run."""
    if slots <= 256:
        return max(2.0, slots / 8.0)
    return 64.0 if slots <= 1024 else 128.0


def default_experiments(slots: int) -> int:
    """Six waves of the slots up to 256 slots, three beyond: the noise-aware rule's
    replicates add about a third more runs and a tail of a few run lengths."""
    return slots * (6 if slots <= 256 else 3)


@dataclass
class _Samples:
    """Every 0.5 s while the campaign runs: the ledger's progress and the launchers' work."""

    ledger: list[tuple[float, int, int]] = field(default_factory=list)  # (t, acked, behind)
    work: list[tuple[float, int, int]] = field(default_factory=list)  # (wall t, queued, in hand)

    async def collect(self, bus: Bus, stop: asyncio.Event, trace: Path | None) -> None:
        """Until `stop`; with `trace`, also written out one line per sample (a diagnostic)."""
        while not stop.is_set():
            with contextlib.suppress(*NATS_FAILURES):
                lag = await bus.consumer_lag("ledger")
                if lag is not None:
                    behind = lag.pending + lag.ack_pending
                    self.ledger.append((time.monotonic(), lag.acked_seq, behind))
                work = await bus.consumer_lag("launcher-default")
                if work is not None:
                    self.work.append((time.time(), work.pending, work.ack_pending))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
        if trace is not None:
            lines = [f"{t:.2f}\t{queued}\t{in_hand}" for t, queued, in_hand in self.work]
            trace.write_text("time\twork_queued\twork_in_hand\n" + "\n".join(lines) + "\n")


async def _bench(
    home: Path,
    server: EmbeddedNats,
    slots: int,
    experiments: int,
    run_s: float,
    processes: bool,
    topology: Topology,
) -> FleetReport:
    url = server.url
    settings = bench_settings(home, url, slots, experiments, run_s, topology.keep_rule)
    stop = asyncio.Event()
    children: ServiceProcesses | None = None
    if processes:
        buses: list[Bus] = []
        tasks: list[asyncio.Task[None]] = []
        children = ServiceProcesses(settings, topology)
    else:
        buses, tasks = await run_services(settings, url, stop)
    bus = await Bus.from_settings(settings, "bench")
    observed = _Observed(settings.campaign)
    follower = asyncio.create_task(bus.follow(observed.handlers(), stop=stop))
    samples = _Samples()
    sampling = asyncio.Event()
    trace = home / "samples.tsv" if topology.keep_dir else None
    sampler = asyncio.create_task(samples.collect(bus, sampling, trace))
    t0, t0_wall = time.monotonic(), time.time()
    await start_campaign(bus, settings)
    await observed.stopped.wait()
    await wait_until_consumed(bus, "ledger", timeout_s=120)
    live_s = time.monotonic() - t0
    sampling.set()
    await sampler
    pids = children.pids() if children is not None else {"services": os.getpid()}
    if server.proc is not None:
        pids["nats-server"] = server.proc.pid
    peaks = read_peak_rss_mb(pids)
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
    return _report(
        observed, settings, topology, events, live_s, replay_rate, samples, peaks, t0_wall
    )


def _report(
    observed: _Observed,
    settings: Settings,
    topology: Topology,
    events: int,
    live_s: float,
    replay_rate: float,
    samples: _Samples,
    peaks: dict[str, float],
    t0_wall: float,
) -> FleetReport:
    slots = settings.slots
    spans = [(s, e) for _, s, e in observed.spans]
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    last_start = max(s for s, _ in spans)
    gaps = overheads(observed.spans)
    to_full = time_to_full(spans, slots, t0_wall)
    queued_until = min(last_queued(samples.work) or first, last_start)
    return FleetReport(
        slots=slots,
        experiments=observed.results,
        utilization=round(busy_fraction(spans, slots, first, last_start), 4),
        utilization_with_drain=round(busy_fraction(spans, slots, first, last), 4),
        overhead_p50_s=round(percentile(gaps, 50), 4),
        overhead_p95_s=round(percentile(gaps, 95), 4),
        events_per_s=round(replay_rate, 1),
        live_events_per_s=round(events / live_s, 1),
        run_seconds=settings.sim_time_scale * settings.sim_budget_s,
        wall_s=round(last - first, 2),
        stream_events=events,
        time_to_full_s=round(to_full, 2) if to_full is not None else None,
        proposals_per_s=round(rate_of_first(observed.proposed_at, slots), 1),
        run_starts_per_s=round(rate_of_first([s for s, _ in spans], slots), 1),
        utilization_while_queued=round(busy_fraction(spans, slots, first, queued_until), 4),
        ledger_live_events_per_s=round(sampled_rate([(t, n) for t, n, _ in samples.ledger]), 1),
        ledger_replay_events_per_s=round(replay_rate, 1),
        ledger_lag_max=max((behind for _, _, behind in samples.ledger), default=0),
        proposers=topology.proposers,
        launchers=topology.launchers,
        peak_rss_mb=peaks,
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
    to_full = "never" if report.time_to_full_s is None else f"{report.time_to_full_s:.1f} s"
    memory = ", ".join(f"{name} {mb:.0f}" for name, mb in sorted(report.peak_rss_mb.items()))
    print(
        f"slots {report.slots}: {report.experiments} experiments in {report.wall_s:.1f} s "
        f"(simulated runs of {report.run_seconds:.1f} s; {report.proposers} proposer(s), "
        f"{report.launchers} launcher(s))\n"
        f"  slot utilization   {report.utilization * 100:.1f}% while work remained, "
        f"{report.utilization_with_drain * 100:.1f}% with the final drain, "
        f"{report.utilization_while_queued * 100:.1f}% while work waited to be delivered "
        "(published 16-GPU run: ~59%)\n"
        f"  overhead per run   p50 {report.overhead_p50_s * 1000:.0f} ms, "
        f"p95 {report.overhead_p95_s * 1000:.0f} ms (a run's end to the next start on its slot)\n"
        f"  first wave         full after {to_full}; {report.proposals_per_s:.0f} proposals/s, "
        f"{report.run_starts_per_s:.0f} run starts/s\n"
        f"  ledger             {report.events_per_s:.0f} events/s (replay), "
        f"{report.ledger_live_events_per_s:.0f} events/s live, at most "
        f"{report.ledger_lag_max} behind ({report.stream_events} events)\n"
        f"  peak memory (MiB)  {memory or 'not measured'}"
    )
