"""The launcher service: consumes run work, runs it on a backend, reports what happened.

VariantProposed runs replica 0 on the campaign's first tier; RunRequested runs the named
replica on the named tier. Each run publishes RunStarted, throttled RunProgress (lossy),
its log to the `logs` bucket, and RunFinished. An infrastructure failure is published and
then raised as transient, so JetStream redelivers the work (a new attempt). FleetStatus
goes out every second; RunCancel (or a campaign marked stopped) cancels runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from services import contracts as c
from services.bus import Bus, Delivery, TransientError
from services.launcher.backend import Backend, Job, LineCallback, RunOutcome, log_tail
from services.launcher.harness import HarnessCache, HarnessError
from services.launcher.local import LocalBackend
from services.launcher.progress import parse_progress
from services.launcher.sim import SimBackend
from services.settings import Settings, SettingsError
from services.telemetry import get_logger

MAX_DELIVER = 5
PROGRESS_INTERVAL_S = 1.0
FLEET_INTERVAL_S = 1.0
MAX_LOG_BYTES = 32 * 1024 * 1024


def make_backend(settings: Settings, launcher_id: str) -> Backend:
    if settings.backend == "local":
        return LocalBackend(settings.runs_path, gpus=settings.gpus, slots=settings.slots)
    if settings.backend == "sim":
        return SimBackend(
            slots=settings.slots, budget_s=settings.sim_budget_s,
            time_scale=settings.sim_time_scale, noise=settings.sim_noise,
            failure_rate=settings.sim_failure_rate, seed=settings.sim_seed,
            host=f"sim-{launcher_id}",
        )
    raise SettingsError(
        f"backend {settings.backend!r} is not available in this launcher yet; "
        "set NIGHTSHIFT_BACKEND to local or sim"
    )


@dataclass(frozen=True)
class Work:
    """What one consumed event asks for."""

    campaign: c.CampaignStarted
    variant_id: str
    source_digest: str
    tier: str
    replica: int
    run_id: str


class Launcher:
    def __init__(self, settings: Settings, bus: Bus, backend: Backend | None = None) -> None:
        self.settings = settings
        self.bus = bus
        self.launcher_id = settings.launcher_id or f"{socket.gethostname()}-{os.getpid()}"
        self.backend = backend or make_backend(settings, self.launcher_id)
        self.durable = f"launcher-{settings.tier}"
        self.log = get_logger(component="launcher", launcher_id=self.launcher_id)
        self.running: dict[str, str] = {}  # run_id -> campaign
        self.free_slots = list(range(self.backend.slots))
        self.harness = HarnessCache(
            settings.runs_path / "harness",
            lambda key: bus.get_object(bus.sources_bucket, key),
        )
        self.references: dict[str, str] = {}
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    # --- service loop -------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        sub = await self.bus.subscribe_lossy(c.RunCancel, self.on_cancel)
        fleet = asyncio.create_task(self.fleet_loop(stop))
        watcher = asyncio.create_task(self._cancel_all_on(stop))
        self.log.info("launcher_serving", backend=self.backend.name, tier=self.settings.tier,
                      slots=self.backend.slots)
        try:
            await self.bus.consume(
                self.durable, [c.VariantProposed, c.RunRequested], self.handle,
                concurrency=lambda: self.backend.slots, ack_wait_s=self.settings.ack_wait_s,
                max_deliver=MAX_DELIVER, stop=stop,
            )
        finally:
            for task in (fleet, watcher, *self._tasks):
                task.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _cancel_all_on(self, stop: asyncio.Event) -> None:
        """On shutdown, stop every run; their work is redelivered (not reported)."""
        await stop.wait()
        self.stopping = True
        await asyncio.gather(
            *(self.backend.cancel(run_id, "launcher stopping") for run_id in list(self.running)),
            return_exceptions=True,
        )

    # --- one job ------------------------------------------------------------------------

    async def handle(self, event: c.AnyEvent, delivery: Delivery) -> None:
        if self.stopping:  # fetched while stopping: hand it back at once
            raise TransientError(f"launcher {self.launcher_id} is stopping")
        work = await self.resolve(event)
        if work is None:
            return
        log = self.log.bind(campaign=work.campaign.campaign, variant_id=work.variant_id,
                            run_id=work.run_id)
        if work.run_id in self.running:
            log.info("run_already_running")
            return
        if not self.free_slots:
            raise TransientError(f"run {work.run_id}: no free slot on {self.launcher_id}")
        slot = self.free_slots.pop(0)
        self.running[work.run_id] = work.campaign.campaign
        try:
            await self.execute(work, delivery.num_delivered, slot, log)
        finally:
            self.running.pop(work.run_id, None)
            self.free_slots.append(slot)

    async def resolve(self, event: c.AnyEvent) -> Work | None:
        """The run this event asks of this launcher, or None (other tier, stopped campaign)."""
        if not isinstance(event, c.VariantProposed | c.RunRequested):
            return None
        campaign = await self.bus.load_campaign(event.campaign)
        if campaign is None:
            raise TransientError(f"campaign {event.campaign!r} is not in the campaigns KV yet")
        if isinstance(event, c.VariantProposed):
            tier, replica = (campaign.tiers or ["default"])[0], 0
            run_id = c.run_id_for(event.variant_id, tier, replica)
        else:
            tier, replica, run_id = event.tier, event.replica, event.run_id
        if tier != self.settings.tier:
            return None
        if await self.bus.campaign_stopped(event.campaign):
            self.log.info("run_skipped", campaign=event.campaign, run_id=run_id,
                          reason="campaign stopped")
            return None
        return Work(campaign, event.variant_id, event.source_digest, tier, replica, run_id)

    async def execute(self, work: Work, attempt: int, slot: int, log: Any) -> None:
        camp = work.campaign
        try:
            source = await self.bus.get_source(work.source_digest)
            harness_dir = await self.harness.get(camp.harness_key)
            reference = await self.reference(camp)
        except (KeyError, HarnessError) as exc:
            now = time.time()
            outcome = RunOutcome(None, now, now, self.backend.name, infra_failure=True,
                                 infra_reason=_missing(work, exc))
            await self.report(work, attempt, outcome)
            raise TransientError(f"run {work.run_id}: {outcome.infra_reason}") from exc
        job = Job(
            run_id=work.run_id, variant_id=work.variant_id, campaign=camp.campaign,
            tier=work.tier, replica=work.replica, attempt=attempt, source=source,
            harness_dir=harness_dir, edit_file=camp.edit_file, profile=camp.profile,
            timeout_s=camp.run_timeout_s, reference_source=reference, slot=slot,
        )
        host, accelerator = self.backend.placement(slot)
        await self.bus.publish(c.RunStarted(
            campaign=camp.campaign, event_id=c.event_id_for("started", camp.campaign,
                                                            work.run_id, attempt),
            run_id=work.run_id, variant_id=work.variant_id, backend=self.backend.name,
            host=host, accelerator=accelerator, tier=work.tier, replica=work.replica,
            attempt=attempt, slot=slot,
        ))
        log.info("run_started", attempt=attempt, slot=slot)
        outcome = await self.backend.run(job, self.progress_reporter(job))
        if outcome.cancelled and self.stopping:
            raise TransientError(f"run {work.run_id}: launcher stopping; it will run again")
        await self.report(work, attempt, outcome)
        log.info("run_finished", exit_code=outcome.exit_code,
                 timed_out=outcome.timed_out, cancelled=outcome.cancelled,
                 infra_failure=outcome.infra_failure,
                 seconds=round(outcome.finished_at - outcome.started_at, 3))
        if outcome.infra_failure:
            raise TransientError(f"run {work.run_id}: infrastructure failure: "
                                 f"{outcome.infra_reason}")

    async def reference(self, campaign: c.CampaignStarted) -> str | None:
        """The campaign's seed source (the sim landscape's reference), cached."""
        if self.backend.name != "sim":
            return None
        if campaign.campaign not in self.references:
            self.references[campaign.campaign] = await self.bus.get_source(campaign.seed_digest)
        return self.references[campaign.campaign]

    async def report(self, work: Work, attempt: int, outcome: RunOutcome) -> None:
        """Put the log in the logs bucket, then publish RunFinished."""
        text = outcome.read_log()
        data = text.encode()
        if len(data) > MAX_LOG_BYTES:
            data = b"[nightshift] log truncated to its end\n" + data[-MAX_LOG_BYTES:]
        await self.bus.put_object(self.bus.logs_bucket, work.run_id, data)
        camp = work.campaign.campaign
        await self.bus.publish(c.RunFinished(
            campaign=camp, event_id=c.event_id_for("finished", camp, work.run_id, attempt),
            run_id=work.run_id, variant_id=work.variant_id, tier=work.tier,
            replica=work.replica, attempt=attempt, exit_code=outcome.exit_code,
            started_at=outcome.started_at, finished_at=outcome.finished_at,
            log_key=work.run_id, log_tail=log_tail(text, self.settings.log_tail_lines),
            timed_out=outcome.timed_out, cancelled=outcome.cancelled,
            infra_failure=outcome.infra_failure, infra_reason=outcome.infra_reason,
        ))

    def progress_reporter(self, job: Job) -> LineCallback:
        """on_line for a run: publish its progress at most once per PROGRESS_INTERVAL_S."""
        last_sent = [0.0]

        def on_line(line: str) -> None:
            progress = parse_progress(line)
            now = time.monotonic()
            if progress is None or now - last_sent[0] < PROGRESS_INTERVAL_S:
                return
            if not math.isfinite(progress.train_loss):
                return  # NaN does not survive JSON; the evaluator reports the divergence
            last_sent[0] = now
            self._spawn(self.bus.publish(c.RunProgress(
                campaign=job.campaign, run_id=job.run_id, variant_id=job.variant_id,
                step=progress.step, fraction=progress.fraction,
                train_loss=progress.train_loss, tok_per_s=progress.tok_per_s,
            )))

        return on_line

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- fleet status and cancellation ---------------------------------------------------

    async def fleet_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.bus.publish(c.FleetStatus(
                    campaign="*", launcher_id=self.launcher_id,
                    slots={self.settings.tier: self.backend.slots},
                    busy={self.settings.tier: len(self.running)}, queued=await self.queued(),
                ))
                await self.cancel_stopped_campaigns()
            except Exception as exc:  # the broker may be away; try again next tick
                self.log.warning("fleet_status_failed", error=repr(exc))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=FLEET_INTERVAL_S)

    async def queued(self) -> int:
        try:
            info = await self.bus.js.consumer_info(self.bus.stream, self.durable, timeout=0.5)
        except Exception:
            return 0
        return int(info.num_pending or 0)

    async def cancel_stopped_campaigns(self) -> None:
        for campaign in set(self.running.values()):
            if await self.bus.campaign_stopped(campaign):
                await self.cancel_runs(campaign, "*", "campaign stopped")

    async def on_cancel(self, event: c.AnyEvent) -> None:
        if isinstance(event, c.RunCancel):
            self._spawn(self.cancel_runs(event.campaign, event.run_id, event.reason))

    async def cancel_runs(self, campaign: str, run_id: str, reason: str) -> None:
        targets = [r for r, camp in self.running.items()
                   if camp == campaign and (run_id == "*" or r == run_id)]
        for target in targets:
            self.log.info("run_cancel_requested", campaign=campaign, run_id=target, reason=reason)
        await asyncio.gather(*(self.backend.cancel(t, reason) for t in targets),
                             return_exceptions=True)


def _missing(work: Work, exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return (f"an object of variant {work.variant_id} is missing from the object store "
                f"({exc}); was the campaign's bucket purged?")
    return str(exc)


async def run(settings: Settings, bus: Bus, stop: asyncio.Event) -> None:
    await Launcher(settings, bus).serve(stop)
