"""`nightshift bench chaos`: a distributed sim campaign while every service and the
nats-server are SIGKILLed and restarted at random, with forged events injected.

The four services run as their own processes (as a distributed deployment runs them)
against one nats-server. In rounds, each of the five (ledger, evaluator, launcher,
proposer, nats) is killed with SIGKILL once, in a random order, at random intervals, and
started again after a random pause. Meanwhile bad events are published: results for a
variant never proposed, a RunFinished for a run no launcher started, a result for an
unknown run of a real variant, an undecodable message. At the end it reports, from the
ledger's SQLite file and the launcher's logs:

- lost: proposed variants without a result in the ledger;
- double_counted: results.tsv rows beyond one per evaluated variant;
- forged_counted: injected events that became a result;
- reruns_of_finished: runs a launcher started again after it had reported them finished;
- unexpected_exits: service processes that ended without being killed;
- dead_letters: what the ledger recorded as never to be handled (the injected ones, and
  what follows from them);
- completed: whether the campaign reached its experiment count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgspec

from services.bench import bench_settings
from services.bench_processes import settings_env
from services.broker import EmbeddedNats, free_port
from services.bus import Bus, Delivery, handlers_on
from services.campaign import start_campaign
from services.contracts import CampaignStopped, ResultEvaluated, RunFinished, VariantProposed
from services.settings import Settings
from services.supervisor import wait_until_consumed

SERVICES = ("ledger", "evaluator", "launcher", "proposer")
TARGETS = (*SERVICES, "nats")


@dataclass
class ChaosReport:
    experiments: int  # proposed variants
    completed: bool
    lost: int
    double_counted: int
    forged_counted: int
    reruns_of_finished: int
    unexpected_exits: int
    dead_letters: int
    injected: int
    kills: dict[str, int]
    wall_s: float
    exits: list[str] = field(default_factory=list)  # which service, with what code


class Fleet:
    """The four services as processes and the nats-server; each can be killed and restarted."""

    def __init__(self, settings: Settings, home: Path, port: int) -> None:
        self.settings = settings
        self.env = settings_env(settings)
        self.home = home
        self.nats = EmbeddedNats(home / "nats", port=port)
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.unexpected: list[str] = []
        self._checked: set[int] = set()  # pids already looked at after they ended

    async def start(self, name: str) -> None:
        if name == "nats":
            await asyncio.to_thread(self.nats.start)
            return
        with (self.home / f"{name}.log").open("ab") as log:
            self.procs[name] = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                f"services.{name}",
                env=self.env,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )

    async def kill(self, name: str) -> None:
        if name == "nats":
            await asyncio.to_thread(self.nats.kill)
            return
        proc = self.procs[name]
        self.check(name)
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        self._checked.add(proc.pid)  # ended by us

    def check(self, name: str) -> None:
        """Note a service that ended on its own (not killed by us, not stopped)."""
        proc = self.procs.get(name)
        if proc is None or proc.returncode is None or proc.pid in self._checked:
            return
        self._checked.add(proc.pid)
        self.unexpected.append(f"{name} exited with {proc.returncode}")

    async def restart_the_dead(self) -> None:
        for name in SERVICES:
            proc = self.procs[name]
            if proc.returncode is not None:
                self.check(name)
                await self.start(name)

    async def stop(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await asyncio.to_thread(self.nats.stop)


@dataclass
class Watched:
    """What the bench follows of the stream: proposals, and the campaign's end."""

    campaign: str
    variants: list[str] = field(default_factory=list)
    completed: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_proposed(self, event: VariantProposed, _: Delivery) -> None:
        if event.campaign == self.campaign:
            self.variants.append(event.variant_id)

    async def on_stopped(self, event: CampaignStopped, _: Delivery) -> None:
        if event.campaign == self.campaign and event.reason == "completed":
            self.completed.set()


def forged_events(campaign: str, real_variant: str, k: int) -> list[ResultEvaluated | RunFinished]:
    """Three bad events: a result of a variant never proposed, a RunFinished of a run no
    launcher started (of a real variant), a result of that unknown run."""
    fake_variant, replica = f"{k:016x}", 900 + k
    unknown_run = f"{real_variant}-default-{replica}"
    claim = {"campaign": campaign, "tier": "default", "status": "ok", "value": 0.0001}
    return [
        ResultEvaluated(
            event_id=f"forged-result-{k}",
            run_id=f"{fake_variant}-default-0",
            variant_id=fake_variant,
            **claim,  # type: ignore[arg-type]
        ),
        RunFinished(
            campaign=campaign,
            event_id=f"forged-finished-{k}",
            run_id=unknown_run,
            variant_id=real_variant,
            tier="default",
            replica=replica,
            exit_code=0,
            started_at=time.time() - 1.0,
            finished_at=time.time(),
            log_key="",
            log_tail="---\nval_bpb: 0.0001\n",
        ),
        ResultEvaluated(
            event_id=f"forged-unknown-run-{k}",
            run_id=unknown_run,
            variant_id=real_variant,
            replica=replica,
            **claim,  # type: ignore[arg-type]
        ),
    ]


async def inject(bus: Bus, watched: Watched, k: int) -> tuple[int, list[str]]:
    """Publish one batch of bad events; (how many, the run ids they name)."""
    real = watched.variants[0] if watched.variants else "0" * 16
    events = forged_events(watched.campaign, real, k)
    for event in events:
        await bus.publish(event)
    await bus.nc.publish(
        f"{bus.prefix}.result.evaluated", b"\x00 not an event", headers={"Nats-Msg-Id": f"junk-{k}"}
    )
    return len(events) + 1, [e.run_id for e in events]


async def chaos_loop(
    fleet: Fleet, bus: Bus, watched: Watched, rng: random.Random, deadline: float, rounds: int
) -> tuple[dict[str, int], int, list[str]]:
    """Rounds of one SIGKILL of each target in random order, until the campaign completes
    and at least `rounds` rounds are done; a batch of forged events in each round.
    Returns kills, injected count, forged run ids."""
    kills = dict.fromkeys(TARGETS, 0)
    injected, forged_runs = 0, list[str]()
    k = 0
    while (k < rounds or not watched.completed.is_set()) and time.monotonic() < deadline:
        order = list(TARGETS)
        rng.shuffle(order)
        k += 1
        count, runs = await inject(bus, watched, k)
        injected, forged_runs = injected + count, forged_runs + runs
        for target in order:
            await fleet.restart_the_dead()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watched.completed.wait(), rng.uniform(0.5, 2.0))
            if watched.completed.is_set() and k > rounds:
                break
            await fleet.kill(target)
            kills[target] += 1
            await asyncio.sleep(rng.uniform(0.1, 1.0))
            await fleet.start(target)
    return kills, injected, forged_runs


def reruns_of_finished(launcher_log: Path) -> int:
    """Starts of a run after its launcher reported it finished (infra failures excepted)."""
    finished: set[str] = set()
    reruns = 0
    for line in launcher_log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        run_id, what = record.get("run_id"), record.get("event")
        if what == "run_started" and run_id in finished:
            reruns += 1
        elif what == "run_finished" and not record.get("infra_failure"):
            finished.add(str(run_id))
    return reruns


def ledger_figures(
    db: Path, campaign: str, proposed: list[str], forged: list[str]
) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        evaluated = {
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT variant_id FROM results WHERE campaign = ? AND status != 'infra'",
                (campaign,),
            )
        }
        rows = conn.execute(
            "SELECT COUNT(*) FROM variants WHERE campaign = ? AND evaluated_seq IS NOT NULL",
            (campaign,),
        ).fetchone()[0]
        marks = ",".join("?" * len(forged)) or "''"
        forged_counted = conn.execute(
            f"SELECT COUNT(*) FROM results WHERE run_id IN ({marks})", forged
        ).fetchone()[0]
        dead = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
    finally:
        conn.close()
    return {
        "lost": len(set(proposed) - evaluated),
        "double_counted": max(0, int(rows) - len(evaluated)),
        "forged_counted": int(forged_counted),
        "dead_letters": int(dead),
    }


async def chaos_bench(
    experiments: int = 150, seed: int = 0, rounds: int = 3, timeout_s: float = 0.0
) -> ChaosReport:
    """Run the campaign under chaos (at least `rounds` kills of each target) and report
    what was lost, doubled or left standing."""
    rng = random.Random(seed)
    timeout_s = timeout_s or 60.0 + 2.0 * experiments
    with tempfile.TemporaryDirectory(prefix="nightshift-chaos-") as tmp:
        home = Path(tmp)
        port = free_port()
        # One run per variant (the strict rule, no seed replicates): what is lost or counted
        # twice is then plain to count, and the figures compare with earlier runs.
        settings = bench_settings(home, f"nats://127.0.0.1:{port}", 4, experiments, 0.5, "strict")
        settings = msgspec.structs.replace(
            settings, campaign="chaos", ack_wait_s=2.0, log_level="info", confirm_jump=0.0
        )
        fleet = Fleet(settings, home, port)
        t0 = time.monotonic()
        await fleet.start("nats")
        for name in SERVICES:
            await fleet.start(name)
        bus = await Bus.from_settings(settings, "bench-chaos", connect_timeout_s=None)
        watched = Watched(settings.campaign)
        stop = asyncio.Event()
        follow = asyncio.create_task(bus.follow(handlers_on(watched), stop=stop))
        try:
            await start_campaign(bus, settings)
            kills, injected, forged = await chaos_loop(
                fleet, bus, watched, rng, t0 + timeout_s, rounds
            )
            await fleet.restart_the_dead()
            await wait_until_consumed(bus, "ledger", timeout_s=60)
            await asyncio.sleep(1.0)  # the dead letters of the last forged results
            await wait_until_consumed(bus, "ledger", timeout_s=30)
        finally:
            stop.set()
            await asyncio.wait_for(follow, 30)
            await bus.close()
            for name in SERVICES:
                fleet.check(name)
            await fleet.stop()
        figures = ledger_figures(settings.ledger_path, settings.campaign, watched.variants, forged)
        return ChaosReport(
            experiments=len(set(watched.variants)),
            completed=watched.completed.is_set(),
            reruns_of_finished=reruns_of_finished(home / "launcher.log"),
            unexpected_exits=len(fleet.unexpected),
            injected=injected,
            kills=kills,
            wall_s=round(time.monotonic() - t0, 1),
            exits=fleet.unexpected,
            **figures,
        )


def print_chaos(report: ChaosReport, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(asdict(report)))
        return
    kills = ", ".join(f"{name} {n}" for name, n in report.kills.items())
    print(
        f"chaos: {report.experiments} experiments in {report.wall_s:.0f} s, campaign "
        f"{'completed' if report.completed else 'NOT completed'}\n"
        f"  SIGKILLs           {sum(report.kills.values())} ({kills})\n"
        f"  lost               {report.lost}\n"
        f"  double-counted     {report.double_counted}\n"
        f"  forged counted     {report.forged_counted} of {report.injected} bad events injected\n"
        f"  finished runs run again  {report.reruns_of_finished}\n"
        f"  unexpected exits   {report.unexpected_exits} {'; '.join(report.exits)}\n"
        f"  dead letters       {report.dead_letters}"
    )
