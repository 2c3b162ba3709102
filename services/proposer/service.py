"""The proposer: keeps variants in flight = fleet slots + look-ahead, for every campaign.

Wiring only: the history comes from `bus.follow` (replayed from the start, so a restarted
proposer knows what it already proposed) plus a core-NATS fast path on the same subjects
(the stream replay hands a lone new event over only at the end of its fetch window), the
fleet from lossy FleetStatus; the arithmetic lives in state.py and the ideas in the
strategies. One request per campaign at a time; every event wakes the top-up loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import io
import tarfile
import time
from dataclasses import dataclass, field

from opentelemetry import trace

from services.bus import Bus
from services.contracts import (
    AnyEvent,
    BestUpdated,
    CampaignStarted,
    CampaignStopped,
    Event,
    FleetStatus,
    ProposerHalted,
    ResultEvaluated,
    VariantProposed,
    event_id_for,
    variant_id_for,
)
from services.proposer.apikey import load_api_key
from services.proposer.grid import GridStrategy
from services.proposer.state import CampaignState, Fleet, History, completion, to_propose
from services.proposer.strategy import (
    BudgetExhausted,
    Proposal,
    ProposalRequest,
    Strategy,
    StrategyExhausted,
)
from services.proposer.validate import validate_source
from services.settings import Settings
from services.telemetry import get_logger, tracer

FOLLOWED: list[type[Event]] = [CampaignStarted, CampaignStopped, VariantProposed,
                               ResultEvaluated, BestUpdated, ProposerHalted]
TICK_S = 0.5  # the top-up loop runs at least this often
COALESCE_S = 0.02  # after a wake, let a burst (a result, then its BestUpdated) land
SETTLE_S = 1.0  # exhaustion is final only this long after the last result or best
RETRY_S = 2.0  # back-off after a failed request
SOURCE_CACHE = 64  # parent sources kept in memory
FLEET_GRACE_S = 1.5  # at start, wait this long for the launchers' slots (they beat every 1 s)

# The seed's val_bpb spread over seeds on the cpu profile (README, The trainer); on a GPU
# autoresearch measured ~7e-4 (ProposalRequest's default).
CPU_NOISE_FLOOR = 0.017

log = get_logger(service="proposer")


@dataclass
class _Campaign:
    """Runtime bookkeeping beside the projection (not rebuilt from events)."""

    strategy: Strategy | None = None
    task: asyncio.Task[None] | None = None
    retry_at: float = 0.0
    program: str | None = None
    idle_on: tuple[object, ...] | None = None  # the state an empty wave was asked in
    generation: int = 0  # the campaign start this bookkeeping belongs to
    warned: set[str] = field(default_factory=set)


class Proposer:
    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.history = History()
        self.fleet = Fleet()
        self.wake = asyncio.Event()
        self.runtime: dict[str, _Campaign] = {}
        self.sources: dict[str, str] = {}
        self.fleet_heard = asyncio.Event()

    # --- inputs ---------------------------------------------------------------------

    async def on_event(self, event: AnyEvent, _seq: int = 0) -> None:
        if self.history.apply(event) is not None:
            self.wake.set()

    async def on_fleet(self, event: AnyEvent) -> None:
        if isinstance(event, FleetStatus) and self.fleet.update(event, time.monotonic()):
            self.fleet_heard.set()
            self.wake.set()

    # --- the loop -------------------------------------------------------------------

    async def loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await _first(self.wake, stop, within=TICK_S)
            if stop.is_set():
                break
            await asyncio.sleep(COALESCE_S)
            self.wake.clear()
            for state in self.history.running():
                try:
                    await self.tick(state)
                except Exception as exc:  # the broker away past publish's retries, ...
                    log.error("top_up_failed", campaign=state.name, error=repr(exc))

    async def tick(self, state: CampaignState) -> None:
        rt = self.runtime.setdefault(state.name, _Campaign())
        if rt.task is not None and not rt.task.done():
            return  # one request per campaign at a time
        if rt.generation != state.generation:  # (re)started, maybe with another strategy
            rt = self.runtime[state.name] = _Campaign(generation=state.generation)
        reason = completion(state)
        if reason is not None:
            await self.complete(state, reason)
            return
        if state.halted or time.monotonic() < rt.retry_at or rt.idle_on == _signature(state):
            return  # halted, backing off, or nothing new since the strategy had no idea
        slots = sum(self.fleet.slots(time.monotonic()).values())
        if state.variants and to_propose(state, slots, self.settings.lookahead) <= 0:
            return
        rt.task = asyncio.create_task(self.top_up(state, rt))
        rt.task.add_done_callback(lambda _: self.wake.set())

    async def top_up(self, state: CampaignState, rt: _Campaign) -> None:
        clog = log.bind(campaign=state.name)
        try:
            if not await self.baseline(state):
                rt.retry_at = time.monotonic() + RETRY_S
                return
            slots = sum(self.fleet.slots(time.monotonic()).values())
            k = to_propose(state, slots, self.settings.lookahead)
            if k > 0:
                await self.wave(state, rt, k)
        except (StrategyExhausted, BudgetExhausted) as exc:
            await self.exhausted(state, rt, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            rt.retry_at = time.monotonic() + RETRY_S
            clog.error("proposal_failed", error=repr(exc), retry_in_s=RETRY_S)

    # --- proposing ------------------------------------------------------------------

    async def source(self, digest: str) -> str:
        if digest not in self.sources:
            if len(self.sources) >= SOURCE_CACHE:
                self.sources.clear()
            self.sources[digest] = await self.bus.get_source(digest)
        return self.sources[digest]

    async def baseline(self, state: CampaignState) -> bool:
        """Propose the seed itself once; False when its source cannot be read."""
        cfg = state.config
        try:
            seed = await self.source(cfg.seed_digest)
        except KeyError:
            if not self.runtime[state.name].warned & {"seed"}:
                self.runtime[state.name].warned.add("seed")
                log.error("seed_source_missing", campaign=state.name, digest=cfg.seed_digest,
                          hint="start the campaign again with `nightshift campaign start`")
            return False
        variant_id = variant_id_for(state.name, seed)
        if variant_id in state.variants:
            return True
        if cfg.max_experiments > 0 and len(state.variants) >= cfg.max_experiments:
            return True
        await self.publish(state, VariantProposed(
            campaign=state.name, event_id=event_id_for("proposed", state.name, variant_id),
            variant_id=variant_id, parent_id=None, source_digest=cfg.seed_digest, diff="",
            title="baseline", rationale="the seed, unchanged: the reference every variant is "
            "measured against", proposer="seed", wave=0,
        ))
        return True

    async def parent(self, state: CampaignState) -> tuple[str, str]:
        """(variant id, source) of the current best; the seed before any best."""
        if state.best is not None:
            return state.best.variant_id, await self.source(state.best.source_digest)
        seed = await self.source(state.config.seed_digest)
        return variant_id_for(state.name, seed), seed

    async def request(self, state: CampaignState, rt: _Campaign, k: int) -> ProposalRequest:
        parent_id, parent_source = await self.parent(state)
        noise = state.noise() or default_noise_floor(self.settings, state.config.profile)
        return ProposalRequest(
            campaign=state.name, parent_id=parent_id, parent_source=parent_source,
            best_value=state.best.value if state.best else None, results=state.rows(),
            in_flight_titles=[state.variants[v].title for v in state.in_flight],
            known_ids=set(state.variants), k=k, wave=state.next_wave,
            free_slots=self.fleet.free(time.monotonic()), metric=state.config.metric,
            direction=state.config.direction, program=await self.program(state, rt),
            edit_file=state.config.edit_file, noise_floor=noise,
            spent_usd=state.spent_usd, requests_made=state.spent_requests,
        )

    async def wave(self, state: CampaignState, rt: _Campaign, k: int) -> None:
        cfg = state.config
        if cfg.proposer.wave_size > 0:
            k = cfg.proposer.wave_size
            if cfg.max_experiments > 0:
                k = min(k, cfg.max_experiments - len(state.variants))
        request = await self.request(state, rt, k)
        strategy = await self.strategy(state, rt)
        proposals = await strategy.propose(request)
        known = set(request.known_ids)
        published = 0
        for proposal in proposals[:k]:
            if not state.running:
                break  # stopped while the strategy was thinking
            if await self.publish_proposal(state, request, proposal, strategy.name, known):
                published += 1
        rt.idle_on = _signature(state) if published == 0 else None
        log.info("wave_proposed", campaign=state.name, wave=request.wave, asked=k,
                 proposed=published, parent_id=request.parent_id, strategy=strategy.name)

    async def publish_proposal(self, state: CampaignState, request: ProposalRequest,
                               proposal: Proposal, strategy: str, known: set[str]) -> bool:
        reasons = validate_source(
            proposal.source, campaign=state.name, known_ids=known,
            filename=state.config.edit_file, parent_source=request.parent_source,
        )
        if reasons:
            log.warning("proposal_rejected", campaign=state.name, title=proposal.title,
                        reasons=reasons)
            return False
        variant_id = variant_id_for(state.name, proposal.source)
        known.add(variant_id)
        digest = await self.bus.put_source(proposal.source)
        await self.publish(state, VariantProposed(
            campaign=state.name, event_id=event_id_for("proposed", state.name, variant_id),
            variant_id=variant_id, parent_id=proposal.parent_id, source_digest=digest,
            diff=unified_diff(request.parent_source, proposal.source, state.config.edit_file),
            title=proposal.title, rationale=proposal.rationale, proposer=strategy,
            wave=request.wave, llm_cost=proposal.llm_cost,
        ))
        return True

    async def publish(self, state: CampaignState, event: Event) -> None:
        """Publish, and fold the event in at once (the replay will bring it again)."""
        if isinstance(event, VariantProposed):
            # The root of the experiment's trace: the launcher, evaluator and ledger spans
            # follow it through the trace context in the message headers.
            with tracer().start_as_current_span(
                "propose variant", kind=trace.SpanKind.PRODUCER,
                attributes={"campaign": state.name, "variant_id": event.variant_id,
                            "proposer": event.proposer},
            ):
                await self.bus.publish(event)
        else:
            await self.bus.publish(event)
        self.history.apply(event)  # type: ignore[arg-type]
        if isinstance(event, VariantProposed):
            log.info("variant_proposed", campaign=state.name, variant_id=event.variant_id,
                     title=event.title, parent_id=event.parent_id, wave=event.wave)

    # --- strategies -----------------------------------------------------------------

    async def strategy(self, state: CampaignState, rt: _Campaign) -> Strategy:
        if rt.strategy is None:
            # In a thread: importing the Anthropic SDK takes seconds the loop cannot spare.
            rt.strategy = await asyncio.to_thread(
                build_strategy, self.settings, state.config, rt.warned
            )
        return rt.strategy

    async def program(self, state: CampaignState, rt: _Campaign) -> str:
        """program.md from the campaign's harness, when the trainer ships one."""
        if rt.program is None:
            rt.program = ""
            try:
                tar = await self.bus.get_object(self.bus.sources_bucket, state.config.harness_key)
                rt.program = read_program(tar)
            except (KeyError, tarfile.TarError, OSError) as exc:
                log.warning("program_unreadable", campaign=state.name, error=repr(exc))
        return rt.program

    # --- ending ---------------------------------------------------------------------

    async def exhausted(self, state: CampaignState, rt: _Campaign, exc: Exception) -> None:
        if isinstance(exc, StrategyExhausted) and (
            state.in_flight or time.time() - state.last_change < SETTLE_S
        ):
            rt.retry_at = time.monotonic() + SETTLE_S  # a new best may still arrive
            return
        reason = "budget" if isinstance(exc, BudgetExhausted) else "exhausted"
        parts: list[object] = ["halted", state.name]
        if state.generation > 1:
            parts.append(state.generation)
        await self.publish(state, ProposerHalted(
            campaign=state.name, event_id=event_id_for(*parts), reason=reason, detail=str(exc),
        ))
        log.warning("proposer_halted", campaign=state.name, reason=reason, detail=str(exc))

    async def complete(self, state: CampaignState, detail: str) -> None:
        parts: list[object] = ["stopped", state.name]
        if state.generation > 1:
            parts.append(state.generation)
        await self.bus.mark_campaign_stopped(state.name, "completed")
        await self.publish(state, CampaignStopped(
            campaign=state.name, event_id=event_id_for(*parts), reason="completed",
            detail=detail,
        ))
        log.info("campaign_completed", campaign=state.name, detail=detail)

    async def close(self) -> None:
        tasks = [rt.task for rt in self.runtime.values() if rt.task and not rt.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _signature(state: CampaignState) -> tuple[object, ...]:
    """What a new wave depends on: results and the best so far."""
    return (len(state.variants), sum(len(r) for r in state.results.values()), state.best)


def unified_diff(parent: str, source: str, filename: str) -> str:
    return "".join(difflib.unified_diff(
        parent.splitlines(keepends=True), source.splitlines(keepends=True),
        fromfile=f"a/{filename}", tofile=f"b/{filename}",
    ))


def read_program(tar_gz: bytes) -> str:
    with tarfile.open(fileobj=io.BytesIO(tar_gz), mode="r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.rsplit("/", 1)[-1] == "program.md":
                fh = tar.extractfile(member)
                return fh.read().decode(errors="replace") if fh else ""
    return ""


def default_noise_floor(settings: Settings, profile: str) -> float:
    """The run-to-run spread to assume until replicate runs measure it."""
    if settings.noise_floor > 0:
        return settings.noise_floor
    return CPU_NOISE_FLOOR if profile == "cpu" else ProposalRequest.noise_floor


def build_strategy(settings: Settings, campaign: CampaignStarted, warned: set[str]) -> Strategy:
    """The campaign's strategy. `auto` is claude when an API key is configured here, else
    grid; an explicit `claude` that cannot run falls back to grid and says why, once."""
    name = campaign.proposer.strategy or settings.strategy
    if name == "auto":
        name = "claude" if load_api_key() else "grid"
        log.info("strategy_chosen", campaign=campaign.campaign, strategy=name)
    if name == "claude":
        try:
            # Imported here: the Anthropic SDK takes seconds to import.
            from services.proposer.claude import build_claude_strategy

            built = build_claude_strategy(settings, campaign)
            if built is not None:
                return built
            why = "no Anthropic API key (set ANTHROPIC_API_KEY or a secrets file)"
        except Exception as exc:  # bad model name, unreadable secrets file, ...
            why = str(exc)
        if "claude" not in warned:
            warned.add("claude")
            log.warning("claude_unavailable_using_grid", campaign=campaign.campaign, reason=why)
    elif name != "grid" and name not in warned:
        warned.add(name)
        log.warning("unknown_strategy_using_grid", campaign=campaign.campaign, strategy=name)
    return GridStrategy(profile=campaign.profile)


async def _first(event: asyncio.Event, stop: asyncio.Event, within: float | None = None) -> None:
    """Wait for `event` or `stop` (or `within` seconds)."""
    waits = {asyncio.create_task(event.wait()), asyncio.create_task(stop.wait())}
    _, pending = await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def run(settings: Settings, bus: Bus, stop: asyncio.Event) -> None:
    proposer = Proposer(settings, bus)
    caught_up = asyncio.Event()
    done = asyncio.Event()  # stops the follower; never sets the caller's `stop`
    follow = asyncio.create_task(
        bus.follow(FOLLOWED, proposer.on_event, stop=done, caught_up=caught_up)
    )
    subs = [await bus.subscribe_lossy(FleetStatus, proposer.on_fleet)]
    for event_type in FOLLOWED:
        subs.append(await bus.subscribe_lossy(event_type, proposer.on_event))
    try:
        await _first(caught_up, stop)
        # The first wave sized by the fleet, not by the look-ahead alone.
        await _first(proposer.fleet_heard, stop, within=FLEET_GRACE_S)
        if not stop.is_set():
            log.info("proposer_caught_up", campaigns=len(proposer.history.campaigns))
            await proposer.loop(stop)
    finally:
        await proposer.close()
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        done.set()
        await follow
