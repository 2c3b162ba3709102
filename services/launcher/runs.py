"""The runs a launcher consumes: which run an event asks for, running it on the backend,
and reporting what happened.

VariantProposed runs replica 0 on the campaign's first tier; RunRequested runs the named
replica on the named tier; work for another tier or a stopped campaign is acked and
skipped. Each run publishes RunStarted, throttled RunProgress (lossy), its log to the
`logs` bucket, and RunFinished. An infrastructure failure is published and then raised as
transient, so JetStream redelivers the work (a new attempt). A run cancelled by its
campaign's stop is reported as set aside (an infrastructure failure) and acked: the
ledger requests it, and the skipped work, again when the campaign resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import asdict, dataclass, replace
from typing import Any

from services import contracts as c
from services.bus import Bus, Delivery, PoisonError, TransientError
from services.launcher.backend import Backend, Job, LineCallback, RunOutcome, log_tail
from services.launcher.harness import HarnessCache, HarnessError
from services.launcher.slots import Slot, SlotPool
from services.metrics import record_gpu_cost, record_run_started
from services.telemetry import annotate_span, get_logger

PROGRESS_INTERVAL_S = 1.0
MAX_LOG_BYTES = 32 * 1024 * 1024
SET_ASIDE_REASON = "set aside: its campaign was stopped; it runs again when the campaign resumes"


@dataclass(frozen=True)
class Work:
    """What one consumed event asks of this launcher."""

    campaign: c.CampaignStarted
    variant_id: str
    source_digest: str
    tier: str
    replica: int
    run_id: str

    def keys(self, kind: str, attempt: int) -> c.RunKeys:
        """The keys of this work's `kind` event ("started", "finished") for one attempt."""
        return c.run_keys(
            kind,
            self.campaign.campaign,
            self.run_id,
            self.variant_id,
            self.tier,
            self.replica,
            attempt,
        )


class Background:
    """Fire-and-forget tasks (progress publishes, cancels), cancelled when the service ends."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()


class Launcher:
    """The consumer's handlers, and the runs in hand on this launcher's slots."""

    def __init__(
        self,
        bus: Bus,
        backend: Backend,
        harness: HarnessCache,
        *,
        launcher_id: str,
        tier: str,
        log_tail_lines: int,
        gpu_usd_per_hour: float = 0.0,
    ) -> None:
        self.bus = bus
        self.backend = backend
        self.harness = harness
        self.launcher_id = launcher_id
        self.tier = tier
        self.log_tail_lines = log_tail_lines
        self.gpu_usd_per_hour = gpu_usd_per_hour
        self.log = get_logger(component="launcher", launcher_id=launcher_id)
        self.running: dict[str, str] = {}  # run_id -> campaign
        self.slots = SlotPool(backend.intake)
        self.references: dict[str, str] = {}  # campaign -> its seed source (sim only)
        self.stopping = False  # set on shutdown: runs in hand are handed back, not reported
        self.background = Background()

    # --- handlers -------------------------------------------------------------------------

    async def on_variant_proposed(self, event: c.VariantProposed, delivery: Delivery) -> None:
        campaign = await self.load_campaign(event.campaign)
        tier = (campaign.tiers or ["default"])[0]
        run_id = c.run_id_for(event.variant_id, tier, 0)
        work = Work(campaign, event.variant_id, event.source_digest, tier, 0, run_id)
        await self.take(work, delivery.num_delivered)

    async def on_run_requested(self, event: c.RunRequested, delivery: Delivery) -> None:
        campaign = await self.load_campaign(event.campaign)
        work = Work(
            campaign, event.variant_id, event.source_digest, event.tier, event.replica, event.run_id
        )
        await self.take(work, event.attempt_base + delivery.num_delivered)

    async def load_campaign(self, name: str) -> c.CampaignStarted:
        if self.stopping:  # fetched while stopping: hand it back at once
            raise TransientError(f"launcher {self.launcher_id} is stopping")
        campaign = await self.bus.campaigns.load(name)
        if campaign is None:  # saved before its first event is published: never started
            raise PoisonError(f"campaign {name!r} is not in the campaigns KV: it was never started")
        return campaign

    async def take(self, work: Work, attempt: int) -> None:
        """Run the work on a free slot, unless it is another tier's or its campaign stopped."""
        if work.tier != self.tier:
            return
        log = self.log.bind(
            campaign=work.campaign.campaign, variant_id=work.variant_id, run_id=work.run_id
        )
        if work.run_id in self.running:
            log.info("run_already_running")
            return
        # The reads a run needs go out together (one round trip, not one after another);
        # the source is read ahead, and used only if the run goes ahead.
        source = asyncio.ensure_future(self.bus.get_source(work.source_digest))
        try:
            if not await self.still_wanted(work, attempt, log):
                return
            waited = not self.slots.free
            slot = await self.slots.take(lambda: self.stopping, f"run {work.run_id}")
            # Work that waited for a slot is checked again: it may have been run or stopped.
            if work.run_id in self.running or (
                waited and not await self.still_wanted(work, attempt, log)
            ):
                slot.release()
                return
            self.running[work.run_id] = work.campaign.campaign
            try:
                await self.execute(work, attempt, slot, log, source)
            finally:
                self.running.pop(work.run_id, None)
                slot.release()
        finally:
            if not source.done():
                source.cancel()
            source.add_done_callback(_retrieve)

    async def still_wanted(self, work: Work, attempt: int, log: Any) -> bool:
        """Neither its campaign stopped nor the run settled: reported finished, or cancelled
        by the ledger (a replicate a decision made useless). Both asked at once."""
        stopped, settled = await asyncio.gather(
            self.bus.campaigns.is_stopped(work.campaign.campaign),
            self.bus.campaigns.settled(work.campaign.campaign, work.run_id),
        )
        if stopped:
            log.info("run_skipped", reason="campaign stopped")
        elif settled == "finished":
            log.info("run_already_finished", attempt=attempt)  # a message published again
        elif settled is not None:
            log.info("run_skipped", reason=settled)
        return not (stopped or settled)

    # --- one run --------------------------------------------------------------------------

    async def execute(
        self, work: Work, attempt: int, taken: Slot, log: Any, source: Awaitable[str]
    ) -> None:
        slot = taken.index
        try:
            job = await self.fetch_job(work, slot, source)
        except (KeyError, HarnessError) as exc:
            now = time.time()
            reason = missing_reason(work, exc)
            outcome = RunOutcome(None, now, now, infra_failure=True, infra_reason=reason)
            await self.report(work, attempt, outcome)
            raise TransientError(f"run {work.run_id}: {outcome.infra_reason}") from exc
        outcome, accelerator = await self.run_placed(work, attempt, job, log)
        taken.release()  # the run is over: the slot takes the next run while this one reports
        if outcome.cancelled and self.stopping:
            raise TransientError(f"run {work.run_id}: launcher stopping; it will run again")
        set_aside = outcome.cancelled and await self.stopped_not_cancelled(work)
        if set_aside:
            # A stop is no verdict on the variant: reported like an infrastructure failure
            # (its GPU time counted, nothing charged to the variant) and acked; the ledger
            # requests the run again when the campaign is resumed.
            outcome = replace(outcome, infra_failure=True, infra_reason=SET_ASIDE_REASON)
        finished = await self.report(work, attempt, outcome)
        if not outcome.infra_failure:  # an infrastructure failure runs again, by design
            keys = work.keys("finished", attempt)
            await self.bus.campaigns.mark_finished(keys["campaign"], work.run_id, keys["event_id"])
        gpu_usd = record_gpu_cost(finished, accelerator, self.gpu_usd_per_hour)
        annotate_span(exit_code=outcome.exit_code, infra_failure=outcome.infra_failure)
        log.info(
            "run_finished",
            gpu_usd=round(gpu_usd, 6),
            exit_code=outcome.exit_code,
            timed_out=outcome.timed_out,
            cancelled=outcome.cancelled,
            infra_failure=outcome.infra_failure,
            seconds=round(outcome.finished_at - outcome.started_at, 3),
        )
        if outcome.infra_failure and not set_aside:
            raise TransientError(
                f"run {work.run_id}: infrastructure failure: {outcome.infra_reason}"
            )

    async def stopped_not_cancelled(self, work: Work) -> bool:
        """Whether a cancelled run was cancelled by its campaign's stop alone: not settled,
        i.e. not cancelled by a decision that made it useless (the ledger marks those in the
        campaigns KV, as `still_wanted` reads them). A campaign completes as soon as its
        last decision cancels the replicates still out; a run both cancelled and stopped
        was reported set aside, an infrastructure failure to run again, after its variant
        was decided."""
        stopped, settled = await asyncio.gather(
            self.bus.campaigns.is_stopped(work.campaign.campaign),
            self.bus.campaigns.settled(work.campaign.campaign, work.run_id),
        )
        return stopped and settled is None

    async def run_placed(
        self, work: Work, attempt: int, job: Job, log: Any
    ) -> tuple[RunOutcome, str]:
        """Run the job; RunStarted names the host that really runs it (published once the
        backend has placed it, and always before the run is reported); its accelerator."""
        loop = asyncio.get_running_loop()
        placed: asyncio.Future[tuple[str, str]] = loop.create_future()
        if self.backend.reports_placement:

            def on_placed(host: str, accelerator: str) -> None:
                if not placed.done():
                    placed.set_result((host, accelerator))

            job = replace(job, on_placed=on_placed)
        else:
            placed.set_result(self.backend.placement(job.slot))
        running = asyncio.ensure_future(self.backend.run(job, self.progress_reporter(job)))
        try:
            either: set[asyncio.Future[Any]] = {running, placed}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not placed.done():  # ended before it was placed (cancelled while waiting)
                placed.set_result(self.backend.placement(job.slot))
            host, accelerator = placed.result()
            await self.publish_started(work, attempt, job.slot, host, accelerator)
            log.info("run_started", attempt=attempt, slot=job.slot, host=host)
            return await running, accelerator
        finally:
            if not running.done():  # our caller is cancelled: the run must stop with it
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running

    async def fetch_job(self, work: Work, slot: int, source_read: Awaitable[str]) -> Job:
        """The job with its source, harness and reference; KeyError or HarnessError if gone."""
        camp = work.campaign
        source = await source_read
        harness_dir = await self.harness.get(camp.harness_key)
        reference = await self.load_reference(camp)
        return Job(
            run_id=work.run_id,
            variant_id=work.variant_id,
            campaign=camp.campaign,
            replica=work.replica,
            source=source,
            harness_dir=harness_dir,
            edit_file=camp.edit_file,
            profile=camp.profile,
            timeout_s=camp.run_timeout_s,
            reference_source=reference,
            slot=slot,
        )

    async def load_reference(self, campaign: c.CampaignStarted) -> str | None:
        """The campaign's seed source (the sim landscape's reference), cached."""
        if self.backend.name != "sim":
            return None
        if campaign.campaign not in self.references:
            self.references[campaign.campaign] = await self.bus.get_source(campaign.seed_digest)
        return self.references[campaign.campaign]

    async def publish_started(
        self, work: Work, attempt: int, slot: int, host: str, accelerator: str
    ) -> None:
        keys = work.keys("started", attempt)
        started = c.RunStarted(
            **keys, backend=self.backend.name, host=host, accelerator=accelerator, slot=slot
        )
        await self.bus.publish(started)
        record_run_started(started)
        annotate_span(
            run_id=work.run_id,
            tier=work.tier,
            backend=started.backend,
            cluster=host,
            accelerator=accelerator,
        )

    async def report(self, work: Work, attempt: int, outcome: RunOutcome) -> c.RunFinished:
        """Put the log in the logs bucket, then publish RunFinished (returned)."""
        text = outcome.read_log()
        data = text.encode()
        if len(data) > MAX_LOG_BYTES:
            data = f"{c.truncated_line()}\n".encode() + data[-MAX_LOG_BYTES:]
        await self.bus.logs.put(work.run_id, data)
        keys = work.keys("finished", attempt)
        finished = outcome.finished_event(keys, log_tail(text, self.log_tail_lines))
        await self.bus.publish(finished)
        return finished

    def progress_reporter(self, job: Job) -> LineCallback:
        """on_line for a run: publish its progress at most once per PROGRESS_INTERVAL_S."""
        last_sent = [0.0]

        def on_line(line: str) -> None:
            progress = c.parse_progress(line)
            now = time.monotonic()
            if progress is None or now - last_sent[0] < PROGRESS_INTERVAL_S:
                return
            if not math.isfinite(progress.train_loss):
                return  # NaN does not survive JSON; the evaluator reports the divergence
            last_sent[0] = now
            self.background.spawn(
                self.bus.publish(
                    c.RunProgress(
                        campaign=job.campaign,
                        run_id=job.run_id,
                        variant_id=job.variant_id,
                        **asdict(progress),
                    )
                )
            )

        return on_line


def _retrieve(task: asyncio.Future[str]) -> None:
    """Mark a read-ahead's failure as seen (the run did not go ahead, or reported it)."""
    if not task.cancelled():
        task.exception()


def missing_reason(work: Work, exc: KeyError | HarnessError) -> str:
    if isinstance(exc, KeyError):
        return (
            f"an object of variant {work.variant_id} is missing from the object store "
            f"({exc}); was the campaign's bucket purged?"
        )
    return str(exc)
