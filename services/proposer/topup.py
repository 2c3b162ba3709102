"""The top-up loop: keeps variants in flight = fleet slots + look-ahead, for every campaign.

Every event folded into the history (and every change of the fleet's slots) wakes the
loop; for each running campaign whose lease this proposer holds (lease.py) it completes the
campaign, or starts one request (at most one per campaign at a time) for as many variants
as the fleet can take, or waits: halted, backing off after a failure, or nothing new since
the strategy last had no idea. Campaigns another proposer holds are only followed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from services.bus import Bus, Delivery, FollowMark, Handler, Handlers, TransientError
from services.contracts import CampaignStopped, Event, FleetStatus, ProposerHalted, event_id_for
from services.proposer.fleet import Fleet, fleet_expiry
from services.proposer.lease import LeaseKeeper, LeaseLost
from services.proposer.state import CampaignState, History, completion, to_propose
from services.proposer.strategy import BudgetExhausted, StrategyExhausted
from services.proposer.waves import CampaignRuntime, WaveMaker, signature
from services.settings import Settings
from services.telemetry import get_logger

TICK_S = 0.5  # the top-up loop runs at least this often
COALESCE_S = 0.02  # after a wake, let a burst (a result, then its BestUpdated) land
SETTLE_S = 1.0  # exhaustion is final only this long after the last result or best
RETRY_S = 2.0  # back-off after a failed request
# The first wave waits at most this long for the ledger to request the seed's replicates.
SEED_RUNS_WAIT_S = 5.0

log = get_logger(service="proposer")


async def wait_first(
    event: asyncio.Event, stop: asyncio.Event, within: float | None = None
) -> None:
    """Wait for `event` or `stop` (or `within` seconds)."""
    waits = {asyncio.create_task(event.wait()), asyncio.create_task(stop.wait())}
    _, pending = await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


class Proposer:
    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.history = History()
        self.fleet = Fleet(fleet_expiry(settings.ack_wait_s))
        self.waves = WaveMaker(settings, bus, self.history, self.fleet)
        self.leases = LeaseKeeper(bus, settings.lease_ttl_s, settings.lease_renew_s)
        self.waves.may_publish = self.leases.holds
        self.mark = FollowMark()  # how far the follow of the history has read
        self.wake = asyncio.Event()
        self.fleet_heard = asyncio.Event()
        self.runtime: dict[str, CampaignRuntime] = {}

    # --- inputs ---------------------------------------------------------------------

    def handlers(self) -> Handlers:
        """The followed event types, each folded in by its History method, then a wake."""
        return {
            event_type: self._folding(fold) for event_type, fold in self.history.folds().items()
        }

    def _folding(self, fold: Callable[[Any], CampaignState | None]) -> Handler:
        async def handle(event: Event, _delivery: Delivery) -> None:
            if fold(event) is not None:
                self.wake.set()

        return handle

    async def on_fleet(self, event: FleetStatus, _delivery: Delivery) -> None:
        if self.fleet.update(event, time.monotonic()):
            self.fleet_heard.set()
            self.wake.set()

    # --- the loop -------------------------------------------------------------------

    async def loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await wait_first(self.wake, stop, within=TICK_S)
            if stop.is_set():
                break
            await asyncio.sleep(COALESCE_S)
            self.wake.clear()
            for state in self.history.running():
                try:
                    await self.tick(state)
                except TransientError as exc:  # the broker away past publish's retries
                    log.error("top_up_failed", campaign=state.name, error=repr(exc))
                except Exception as exc:
                    # Last resort: a bug in one campaign's bookkeeping must not stop the
                    # proposer (nor the other campaigns); the next tick tries again.
                    log.exception("top_up_failed", campaign=state.name, error=repr(exc))

    def leads(self, name: str) -> bool:
        """Whether this proposer tops `name` up: it holds the lease and its history holds
        everything stored before it took the lease (a predecessor's half-published wave)."""
        if not self.leases.knows(name):
            self.leases.due.set()  # a campaign the keeper has not tried yet
        return self.leases.holds(name) and self.mark.synced_at >= self.leases.acquired_at(name)

    async def tick(self, state: CampaignState) -> None:
        rt = self.runtime.get(state.name)
        if rt is not None and rt.task is not None and not rt.task.done():
            return  # one request per campaign at a time
        if not self.leads(state.name):
            return  # another proposer's, or ours but the history is still being read
        since = self.leases.acquired_at(state.name)
        if rt is None or rt.generation != state.generation or rt.since != since:
            # (Re)started, maybe with another strategy, or taken over: fresh bookkeeping.
            rt = CampaignRuntime(state.name, state.generation, since=since)
            self.runtime[state.name] = rt
        reason = completion(state)
        if reason is not None:
            await self.complete(state, rt, reason)
            return
        if state.halted or time.monotonic() < rt.retry_at or rt.idle_on == signature(state):
            return  # halted, backing off, or nothing new since the strategy had no idea
        if state.variants and (self.wanted(state) <= 0 or self.seed_runs_awaited(state, rt)):
            return
        rt.task = asyncio.create_task(self.top_up(state, rt))
        rt.task.add_done_callback(lambda _: self.wake.set())

    def seed_runs_awaited(self, state: CampaignState, rt: CampaignRuntime) -> bool:
        """Whether the first wave waits for the ledger to request the seed's replicate runs
        (`noise_runs`), at most SEED_RUNS_WAIT_S. Published after them, the wave queues
        behind them: the noise is measured with the first wave's results. Published at
        once, a wave as wide as the fleet took every slot, and every close call of that
        wave waited one more run length for the noise to decide it."""
        expected = state.config.noise_runs - 1
        if expected <= 0 or len(state.variants) > 1:
            return False
        seen = sum(
            1 for r in state.requested.values() if r.tier == state.first_tier and r.replica > 0
        )
        if seen >= expected:
            return False
        now = time.monotonic()
        if rt.seed_runs_due == 0.0:
            rt.seed_runs_due = now + SEED_RUNS_WAIT_S
        return now < rt.seed_runs_due

    def running_names(self) -> list[str]:
        return [s.name for s in self.history.running()]

    def wanted(self, state: CampaignState) -> int:
        """New variants to propose: for the first tier's slots (all, when no launcher
        names that tier)."""
        slots = self.fleet.slots(time.monotonic())
        first = slots.get(state.first_tier) or sum(slots.values())
        return to_propose(state, first, self.settings.lookahead)

    async def top_up(self, state: CampaignState, rt: CampaignRuntime) -> None:
        try:
            if not await self.waves.propose_baseline(state, rt):
                rt.back_off(RETRY_S)
                return
            k = self.wanted(state)
            if k > 0 and not self.seed_runs_awaited(state, rt):
                await self.waves.propose_wave(state, rt, k)
        except StrategyExhausted as exc:
            await self.exhausted(state, rt, exc)
        except BudgetExhausted as exc:
            await self.halt(state, rt, "budget", exc)
        except LeaseLost:
            rt.log.warning("wave_abandoned", reason="another proposer took the campaign over")
        except (TransientError, KeyError) as exc:  # the broker away, a source gone
            rt.back_off(RETRY_S)
            rt.log.error("proposal_failed", error=repr(exc), retry_in_s=RETRY_S)
        except Exception as exc:
            # Last resort: a strategy's bug must not end the campaign's proposing for good.
            rt.back_off(RETRY_S)
            rt.log.exception("proposal_failed", error=repr(exc), retry_in_s=RETRY_S)

    # --- ending ---------------------------------------------------------------------

    async def exhausted(
        self, state: CampaignState, rt: CampaignRuntime, exc: StrategyExhausted
    ) -> None:
        """Halt, unless a result still in flight (or just in) may give the strategy ideas."""
        if state.in_flight or time.time() - state.last_change < SETTLE_S:
            rt.back_off(SETTLE_S)  # a new best may still arrive
            return
        await self.halt(state, rt, "exhausted", exc)

    async def halt(
        self, state: CampaignState, rt: CampaignRuntime, reason: str, exc: Exception
    ) -> None:
        if not self.leases.holds(state.name):
            return
        event = ProposerHalted(
            campaign=state.name,
            event_id=event_id_for(*_once_per_start("halted", state)),
            reason=reason,
            detail=str(exc),
        )
        await self.bus.publish(event)
        self.history.apply_proposer_halted(event)  # at once: the replay brings it again
        rt.log.warning("proposer_halted", reason=reason, detail=str(exc))

    async def complete(self, state: CampaignState, rt: CampaignRuntime, detail: str) -> None:
        if not self.leases.holds(state.name):
            return
        event = CampaignStopped(
            campaign=state.name,
            event_id=event_id_for(*_once_per_start("stopped", state)),
            reason="completed",
            detail=detail,
        )
        await self.bus.campaigns.mark_stopped(state.name, "completed")
        await self.bus.publish(event)
        self.history.apply_campaign_stopped(event)  # at once: the replay brings it again
        rt.log.info("campaign_completed", detail=detail)

    async def close(self) -> None:
        tasks = [rt.task for rt in self.runtime.values() if rt.task and not rt.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _once_per_start(what: str, state: CampaignState) -> list[object]:
    """The parts of an event id that is one per campaign start (the first keeps the old id)."""
    parts: list[object] = [what, state.name]
    if state.generation > 1:
        parts.append(state.generation)
    return parts
