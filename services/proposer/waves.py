"""One wave of a campaign: the request built from the history, the strategy's proposals,
each validated, stored and published as a VariantProposed (and folded into the history at
once, so the next decision sees it before the replay brings it back)."""

from __future__ import annotations

import asyncio
import difflib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from services.bus import Bus, gather_limited
from services.contracts import VariantProposed, source_digest, variant_id_for, variant_keys
from services.metrics import record_llm_cost
from services.proposer.factory import build_strategy
from services.proposer.fleet import Fleet
from services.proposer.lease import LeaseLost
from services.proposer.noise import default_noise_floor
from services.proposer.program import ARCHIVE_ERRORS, program_from_harness
from services.proposer.state import CampaignState, History
from services.proposer.strategy import Proposal, ProposalRequest, Strategy
from services.proposer.validate import validate_source
from services.proposer.verdicts import pending_runs, recent_verdicts, tier_noise
from services.settings import Settings
from services.telemetry import fields_of, get_logger, tracer

SOURCE_CACHE = 64  # parent sources kept in memory
# The harness is not in the bucket, or its archive is damaged: the wave goes without it.
NO_PROGRAM: tuple[type[Exception], ...] = (KeyError, *ARCHIVE_ERRORS)

log = get_logger(service="proposer")


@dataclass
class CampaignRuntime:
    """Runtime bookkeeping of one campaign start beside the projection (not rebuilt from
    events): its strategy, the request in hand, back-off, what was already warned about."""

    name: str
    generation: int  # the campaign start this bookkeeping belongs to
    since: float = 0.0  # when this proposer took the campaign's lease (lease.py)
    strategy: Strategy | None = None
    task: asyncio.Task[None] | None = None
    retry_at: float = 0.0
    program: str | None = None
    idle_on: tuple[object, ...] | None = None  # the state an empty wave was asked in
    seed_runs_due: float = 0.0  # until when the first wave waits for the seed's replicates
    warned: set[str] = field(default_factory=set)
    log: Any = field(init=False, repr=False)  # bound to the campaign

    def __post_init__(self) -> None:
        self.log = log.bind(campaign=self.name)

    def back_off(self, seconds: float) -> None:
        self.retry_at = time.monotonic() + seconds


def signature(state: CampaignState) -> tuple[object, ...]:
    """What a new wave depends on: results and the best so far."""
    return (len(state.variants), sum(len(r) for r in state.results.values()), state.best)


def unified_diff(parent: str, source: str, filename: str) -> str:
    return "".join(
        difflib.unified_diff(
            parent.splitlines(keepends=True),
            source.splitlines(keepends=True),
            fromfile=f"a/{filename}",
            tofile=f"b/{filename}",
        )
    )


class WaveMaker:
    """Asks a campaign's strategy for a wave and publishes the variants that pass."""

    def __init__(self, settings: Settings, bus: Bus, history: History, fleet: Fleet) -> None:
        self.settings = settings
        self.bus = bus
        self.history = history
        self.fleet = fleet
        self.source_cache: dict[str, str] = {}
        # Asked before each publish: does this proposer still hold the campaign's lease?
        self.may_publish: Callable[[str], bool] = lambda _campaign: True

    # --- reading what a wave starts from --------------------------------------------

    async def fetch_source(self, digest: str) -> str:
        """A source from the `sources` bucket (cached); KeyError when it is not there."""
        if digest not in self.source_cache:
            if len(self.source_cache) >= SOURCE_CACHE:
                self.source_cache.clear()
            self.source_cache[digest] = await self.bus.get_source(digest)
        return self.source_cache[digest]

    async def fetch_parent(self, state: CampaignState, rt: CampaignRuntime) -> tuple[str, str]:
        """(variant id, source) of the current best; the seed before any best, or when the
        best's source cannot be read (a campaign must not stall on a best without one)."""
        if state.best is not None:
            try:
                return state.best.variant_id, await self.fetch_source(state.best.source_digest)
            except KeyError:
                if state.best.variant_id not in rt.warned:
                    rt.warned.add(state.best.variant_id)
                    rt.log.error(
                        "best_source_missing",
                        variant_id=state.best.variant_id,
                        digest=state.best.source_digest,
                        action="proposing from the seed instead",
                    )
        seed = await self.fetch_source(state.config.seed_digest)
        return variant_id_for(state.name, seed), seed

    async def fetch_program(self, state: CampaignState, rt: CampaignRuntime) -> str:
        """program.md from the campaign's harness ("" when it has none or is unreadable)."""
        if rt.program is None:
            try:
                archive = await self.bus.sources.get(state.config.harness_key)
                rt.program = program_from_harness(archive)
            except NO_PROGRAM as exc:
                rt.log.warning("program_unreadable", error=repr(exc))
                rt.program = ""
        return rt.program

    async def load_strategy(self, state: CampaignState, rt: CampaignRuntime) -> Strategy:
        if rt.strategy is None:
            # In a thread: importing the Anthropic SDK takes seconds the loop cannot spare.
            rt.strategy = await asyncio.to_thread(
                build_strategy, self.settings, state.config, rt.warned
            )
        return rt.strategy

    async def build_request(
        self, state: CampaignState, rt: CampaignRuntime, k: int
    ) -> ProposalRequest:
        parent_id, parent_source = await self.fetch_parent(state, rt)
        cfg = state.config
        return ProposalRequest(
            campaign=state.name,
            parent_id=parent_id,
            parent_source=parent_source,
            best_value=state.best.value if state.best else None,
            results=state.rows(),
            # Undecided variants (the keep rule is replicating them) are still in flight.
            in_flight_titles=[
                state.variants[v].title
                for v in [*state.in_flight, *state.undecided]
                if v in state.variants
            ],
            known_ids=set(state.variants),
            k=k,
            wave=state.next_wave,
            free_slots=self.fleet.free(time.monotonic()),
            metric=cfg.metric,
            direction=cfg.direction,
            program=await self.fetch_program(state, rt),
            edit_file=cfg.edit_file,
            noise_floor=state.noise() or default_noise_floor(self.settings, cfg.profile),
            spent_usd=state.spent_usd,
            requests_made=state.spent_requests,
            keep_rule=cfg.keep_rule,
            measured_noise=tier_noise(state),
            pending_runs=pending_runs(state),
            verdicts=recent_verdicts(state),
        )

    # --- proposing ------------------------------------------------------------------

    async def propose_baseline(self, state: CampaignState, rt: CampaignRuntime) -> bool:
        """Propose the seed itself once; False when its source cannot be read."""
        cfg = state.config
        try:
            seed = await self.fetch_source(cfg.seed_digest)
        except KeyError:
            if "seed" not in rt.warned:
                rt.warned.add("seed")
                rt.log.error(
                    "seed_source_missing",
                    digest=cfg.seed_digest,
                    hint="start the campaign again with `nightshift campaign start`",
                )
            return False
        variant_id = variant_id_for(state.name, seed)
        if variant_id in state.variants:
            return True
        if cfg.max_experiments > 0 and len(state.variants) >= cfg.max_experiments:
            return True
        await self.publish_variant(
            rt,
            VariantProposed(
                **variant_keys(state.name, variant_id),
                parent_id=None,
                source_digest=cfg.seed_digest,
                diff="",
                title="baseline",
                rationale="the seed, unchanged: the reference every variant is measured against",
                proposer="seed",
                wave=0,
            ),
        )
        return True

    async def propose_wave(self, state: CampaignState, rt: CampaignRuntime, k: int) -> None:
        """Ask the strategy for k variants (the campaign's wave size, when it sets one)."""
        cfg = state.config
        if cfg.proposer.wave_size > 0:
            k = cfg.proposer.wave_size
            if cfg.max_experiments > 0:
                k = min(k, cfg.max_experiments - len(state.variants))
        request = await self.build_request(state, rt, k)
        strategy = await self.load_strategy(state, rt)
        proposals = await strategy.propose(request)
        known = set(request.known_ids)
        accepted = [
            (proposal, event)
            for proposal in proposals[:k]
            if (event := self.accept(state, rt, request, proposal, strategy.name, known))
        ]
        published = 0
        if accepted and state.running:  # not stopped while the strategy was thinking
            # Every source first (the launcher reads it when the variant reaches it), then
            # every event; each batch pipelined, its acknowledgements awaited together.
            await gather_limited(self.bus.put_source(p.source) for p, _ in accepted)
            await gather_limited(self.publish_variant(rt, event) for _, event in accepted)
            published = len(accepted)
        rt.idle_on = signature(state) if published == 0 else None
        rt.log.info(
            "wave_proposed",
            wave=request.wave,
            asked=k,
            proposed=published,
            parent_id=request.parent_id,
            strategy=strategy.name,
        )

    def accept(
        self,
        state: CampaignState,
        rt: CampaignRuntime,
        request: ProposalRequest,
        proposal: Proposal,
        strategy: str,
        known: set[str],
    ) -> VariantProposed | None:
        """The event of a proposal that passes validation; None when it was rejected."""
        reasons = validate_source(
            proposal.source,
            campaign=state.name,
            known_ids=known,
            filename=state.config.edit_file,
            parent_source=request.parent_source,
        )
        if reasons:
            rt.log.warning("proposal_rejected", title=proposal.title, reasons=reasons)
            return None
        variant_id = variant_id_for(state.name, proposal.source)
        known.add(variant_id)
        return VariantProposed(
            **variant_keys(state.name, variant_id),
            parent_id=proposal.parent_id,
            source_digest=source_digest(proposal.source),
            diff=unified_diff(request.parent_source, proposal.source, state.config.edit_file),
            title=proposal.title,
            rationale=proposal.rationale,
            proposer=strategy,
            wave=request.wave,
            llm_cost=proposal.llm_cost,
        )

    async def publish_variant(self, rt: CampaignRuntime, event: VariantProposed) -> None:
        """Publish, and fold the variant in at once (the replay will bring it again);
        LeaseLost when another proposer may have taken the campaign over."""
        if not self.may_publish(event.campaign):
            raise LeaseLost(event.campaign)
        # The root of the experiment's trace: the launcher, evaluator and ledger spans
        # follow it through the trace context in the message headers.
        with tracer().start_as_current_span(
            "propose variant",
            kind=trace.SpanKind.PRODUCER,
            attributes={
                "campaign": event.campaign,
                "variant_id": event.variant_id,
                "proposer": event.proposer,
                "wave": event.wave,
            },
        ):
            await self.bus.publish(event)
        record_llm_cost(event.campaign, event.llm_cost)
        self.history.apply_variant_proposed(event)
        rt.log.info(
            "variant_proposed", **fields_of(event, "variant_id", "title", "parent_id", "wave")
        )
