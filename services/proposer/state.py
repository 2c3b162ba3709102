"""The proposer's projection of the history: per campaign, what was proposed and finished.

Pure and idempotent: an event may be applied twice (once from a fast core-NATS
subscription, once from the ordered replay of the stream) or out of order between those
two paths, and the projection stays the same. Also the fleet (slots per tier, from
FleetStatus, per launcher, forgetting launchers that went quiet) and the in-flight control
arithmetic built on both.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from services.contracts import (
    MAX_RUN_ATTEMPTS,
    BestUpdated,
    CampaignStarted,
    CampaignStopped,
    Event,
    NoiseMeasured,
    ProposerHalted,
    ResultEvaluated,
    RunRequested,
    VariantDecided,
    VariantProposed,
)
from services.proposer.strategy import ResultRow


@dataclass(frozen=True)
class Variant:
    variant_id: str
    title: str
    parent_id: str | None
    wave: int


@dataclass(frozen=True)
class Best:
    variant_id: str
    source_digest: str
    value: float
    ts: float


@dataclass
class CampaignState:
    config: CampaignStarted
    generation: int = 1  # how many times the campaign was (re)started
    stopped: bool = False
    halted: bool = False
    halt_reason: str = ""
    variants: dict[str, Variant] = field(default_factory=dict)  # in proposal order
    results: dict[str, dict[tuple[str, int], ResultEvaluated]] = field(default_factory=dict)
    best: Best | None = None
    llm_usd: dict[str, float] = field(default_factory=dict)  # variant -> its share of cost
    llm_waves: set[int] = field(default_factory=set)  # waves that cost an LLM request
    last_change: float = 0.0  # ts of the latest result or best seen
    decisions: dict[str, VariantDecided] = field(default_factory=dict)  # latest per variant
    measured_noise: dict[str, NoiseMeasured] = field(default_factory=dict)  # per tier
    # Proposed variants not settled yet, in proposal order, kept as events are folded in:
    # the top-up asks for them after every event, and a scan of every variant's results
    # was most of the proposer's time at 1,000 slots.
    unsettled: dict[str, None] = field(default_factory=dict)
    undecided_ids: dict[str, None] = field(default_factory=dict)
    # Each finished variant's row as the strategy sees it, until its variant or results change.
    row_cache: dict[str, ResultRow] = field(default_factory=dict)
    requested: dict[str, RunRequested] = field(default_factory=dict)  # the ledger's runs
    # Those still to come, kept as events fold in (the top-up asks after every event).
    out: dict[str, RunRequested] = field(default_factory=dict)
    settled_runs: set[str] = field(default_factory=set)  # runs with a result that counts
    cancelled_runs: set[str] = field(default_factory=set)  # runs a decision cancelled

    @property
    def name(self) -> str:
        return self.config.campaign

    @property
    def running(self) -> bool:
        return not self.stopped

    @property
    def in_flight(self) -> list[str]:
        """Proposed variants without a result yet. An infrastructure failure is not one
        while its run is being tried again (up to MAX_RUN_ATTEMPTS): the launcher re-queues
        it, so counting it as done would end a campaign with that run still to come."""
        return list(self.unsettled)

    def settled(self, variant_id: str) -> bool:
        results = self.results.get(variant_id, {}).values()
        return any(r.status != "infra" or r.attempt >= MAX_RUN_ATTEMPTS for r in results)

    @property
    def first_tier(self) -> str:
        """The tier new variants run on (replica 0): the campaign's first."""
        return (self.config.tiers or ["default"])[0]

    @property
    def runs_out(self) -> list[RunRequested]:
        """The runs the ledger requested (replicates, promotions) that are still to come:
        no result yet (an infrastructure failure runs again), not cancelled. Each holds a
        slot, so they count against the fleet like variants in flight."""
        return list(self.out.values())

    @property
    def undecided(self) -> list[str]:
        """Variants the keep rule is still replicating (their replicates hold slots)."""
        return list(self.undecided_ids)

    @property
    def awaiting_verdict(self) -> list[str]:
        """Variants with an ok result the ledger has not decided yet, or is replicating.

        `strict` decides on every result, so there only the replicating ones: a jump past
        the best waits for its replicate (`confirm_jump`) under either rule."""
        if self.config.keep_rule == "strict":
            return self.undecided
        return [
            vid
            for vid, runs in self.results.items()
            if any(r.status == "ok" for r in runs.values())
            and (vid not in self.decisions or self.decisions[vid].decision == "undecided")
        ]

    @property
    def next_wave(self) -> int:
        return max((v.wave for v in self.variants.values()), default=0) + 1

    @property
    def spent_usd(self) -> float:
        return sum(self.llm_usd.values())

    @property
    def spent_requests(self) -> int:
        return len(self.llm_waves)

    def row(self, variant_id: str) -> ResultRow | None:
        """The strategy's view of a finished variant: replica 0 decides its status.

        The value is the mean over the ok runs on replica 0's tier; among several attempts
        of replica 0 the latest non-infra one counts (infra only when nothing else came).
        """
        if variant_id in self.row_cache:
            return self.row_cache[variant_id]
        runs = self.results.get(variant_id)
        if not runs:
            return None
        variant = self.variants.get(variant_id)
        primary = _primary(list(runs.values()))
        ok = [
            r.value
            for r in runs.values()
            if r.status == "ok" and r.value is not None and r.tier == primary.tier
        ]
        row = self.row_cache[variant_id] = ResultRow(
            variant_id=variant_id,
            title=variant.title if variant else "",
            status="ok" if ok else primary.status,
            value=statistics.fmean(ok) if ok else None,
            crash_reason=primary.crash_reason,
            parent_id=variant.parent_id if variant else None,
            finished_at=max(r.ts for r in runs.values()),
            runs=max(1, len(ok)),
        )
        return row

    def rows(self) -> list[ResultRow]:
        """Every finished variant, oldest result first; a variant still undecided (the keep
        rule is replicating it) is left out: a lucky first run is not evidence to build on."""
        pending = set(self.undecided)
        rows = [
            r
            for r in (self.row(vid) for vid in self.variants if vid not in pending)
            if r is not None
        ]
        return sorted(rows, key=lambda r: r.finished_at)

    def noise(self) -> float | None:
        """The spread the ledger measured on the campaign's first tier (NoiseMeasured); else
        the pooled std of replicate ok runs seen here; None without replicates."""
        tier = (self.config.tiers or ["default"])[0]
        if tier in self.measured_noise:
            return self.measured_noise[tier].noise
        squares, dof = 0.0, 0
        for runs in self.results.values():
            by_tier: dict[str, list[float]] = {}
            for r in runs.values():
                if r.status == "ok" and r.value is not None:
                    by_tier.setdefault(r.tier, []).append(r.value)
            for values in by_tier.values():
                if len(values) >= 2:
                    mean = statistics.fmean(values)
                    squares += sum((v - mean) ** 2 for v in values)
                    dof += len(values) - 1
        return (squares / dof) ** 0.5 if dof else None


_E = TypeVar("_E", bound=Event)


def _keep_latest(table: dict[str, _E], key: str, event: _E, rank: Callable[[_E], Any]) -> None:
    """`table[key] = event` unless the event there ranks higher (a replay brings old ones)."""
    latest = table.get(key)
    if latest is None or rank(event) >= rank(latest):
        table[key] = event


def _primary(runs: list[ResultEvaluated]) -> ResultEvaluated:
    replica0 = [r for r in runs if r.replica == 0] or runs
    real = [r for r in replica0 if r.status != "infra"] or replica0
    return max(real, key=lambda r: (r.attempt, r.ts))


class History:
    """Every campaign's state, built from the events in any order and any number of times.

    One method per event type; each returns the campaign it changed (None if it changed
    nothing). `folds()` maps each followed type to its method.
    """

    def __init__(self) -> None:
        self.campaigns: dict[str, CampaignState] = {}
        self._seen: set[tuple[str, str, float]] = set()

    def folds(self) -> dict[type[Event], Callable[[Any], CampaignState | None]]:
        """The event types the proposer follows, each with the method that folds it in."""
        return {
            CampaignStarted: self.apply_campaign_started,
            CampaignStopped: self.apply_campaign_stopped,
            ProposerHalted: self.apply_proposer_halted,
            VariantProposed: self.apply_variant_proposed,
            ResultEvaluated: self.apply_result_evaluated,
            BestUpdated: self.apply_best_updated,
            VariantDecided: self.apply_variant_decided,
            NoiseMeasured: self.apply_noise_measured,
            RunRequested: self.apply_run_requested,
        }

    def _first_time(self, event: CampaignStarted | CampaignStopped | ProposerHalted) -> bool:
        """Whether a (re)start, stop or halt is new: each may happen again, later, as a new
        event; the same event seen twice (fast path and replay) counts once."""
        key = (event.tag(), event.event_id, event.ts)
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    def apply_campaign_started(self, event: CampaignStarted) -> CampaignState | None:
        if not self._first_time(event):
            return None
        state = self.campaigns.get(event.campaign)
        if state is None:
            state = self.campaigns[event.campaign] = CampaignState(config=event)
            return state
        # Started again (after a stop, with new limits): same history, proposing again.
        state.config = event
        state.generation += 1
        state.stopped = state.halted = False
        state.halt_reason = ""
        return state

    def apply_campaign_stopped(self, event: CampaignStopped) -> CampaignState | None:
        state = self.campaigns.get(event.campaign)
        if state is None or not self._first_time(event):
            return None
        state.stopped = True
        return state

    def apply_proposer_halted(self, event: ProposerHalted) -> CampaignState | None:
        state = self.campaigns.get(event.campaign)
        if state is None or not self._first_time(event):
            return None
        state.halted, state.halt_reason = True, event.reason
        return state

    def apply_variant_proposed(self, event: VariantProposed) -> CampaignState | None:
        state = self.campaigns.get(event.campaign)
        if state is None:
            return None
        if event.variant_id not in state.variants:
            state.variants[event.variant_id] = Variant(
                event.variant_id, event.title, event.parent_id, event.wave
            )
            if not state.settled(event.variant_id):  # its result may have come first
                state.unsettled[event.variant_id] = None
            state.row_cache.pop(event.variant_id, None)
            if event.llm_cost is not None:
                state.llm_usd[event.variant_id] = event.llm_cost.usd
                state.llm_waves.add(event.wave)
        return state

    def apply_result_evaluated(self, event: ResultEvaluated) -> CampaignState | None:
        state = self.campaigns.get(event.campaign)
        if state is None:
            return None
        state.results.setdefault(event.variant_id, {})[(event.run_id, event.attempt)] = event
        state.row_cache.pop(event.variant_id, None)
        if state.settled(event.variant_id):
            state.unsettled.pop(event.variant_id, None)
        if event.status != "infra" or event.attempt >= MAX_RUN_ATTEMPTS:
            state.settled_runs.add(event.run_id)
            state.out.pop(event.run_id, None)
        state.last_change = max(state.last_change, event.ts)
        return state

    def apply_best_updated(self, event: BestUpdated) -> CampaignState | None:
        state = self.campaigns.get(event.campaign)
        if state is None:
            return None
        if state.best is None or event.ts >= state.best.ts:
            state.best = Best(event.variant_id, event.source_digest, event.value, event.ts)
        state.last_change = max(state.last_change, event.ts)
        return state

    def apply_variant_decided(self, event: VariantDecided) -> CampaignState | None:
        state = self.campaigns.get(event.campaign)
        if state is not None:  # the latest decision; the later of two at the same ts
            _keep_latest(state.decisions, event.variant_id, event, lambda d: (d.ts, d.n_candidate))
            if state.decisions[event.variant_id].decision == "undecided":
                state.undecided_ids[event.variant_id] = None
            else:
                state.undecided_ids.pop(event.variant_id, None)
            state.cancelled_runs.update(event.cancelled_runs)
            for run_id in event.cancelled_runs:
                state.out.pop(run_id, None)
        return state

    def apply_run_requested(self, event: RunRequested) -> CampaignState | None:
        state = self.campaigns.get(event.campaign)
        # A variant's first run, requested again after a stop, counts as the variant in flight.
        if state is not None and (event.replica, event.tier) != (0, state.first_tier):
            state.requested.setdefault(event.run_id, event)
            if event.run_id not in state.settled_runs and event.run_id not in state.cancelled_runs:
                state.out.setdefault(event.run_id, event)
        return state

    def apply_noise_measured(self, event: NoiseMeasured) -> CampaignState | None:
        state = self.campaigns.get(event.campaign)
        if state is not None:  # the measure with the most degrees of freedom
            _keep_latest(state.measured_noise, event.tier, event, lambda n: n.dof)
        return state

    def running(self) -> list[CampaignState]:
        return [s for s in self.campaigns.values() if s.running]


def to_propose(state: CampaignState, slots: int, default_lookahead: int) -> int:
    """How many new variants keep the fleet fed: slots + lookahead - in flight, capped.

    `slots` are those of the campaign's first tier, where new variants run. In flight: the
    variants without a result and the runs the ledger requested there still to come (each
    replicate holds a slot: counting a replicated variant once would queue new variants
    ahead of its replicates, and its decision would wait behind them; runs on a later tier
    hold that tier's slots, not these). Lookahead 0
    is automatic: a quarter of the slots (at least 2), so the runs that end while a
    proposal round trip is under way find their successors already queued.
    """
    lookahead = state.config.proposer.lookahead or default_lookahead
    if lookahead <= 0:
        lookahead = max(2, -(-slots // 4))
    first = [r for r in state.runs_out if r.tier == state.first_tier]
    want = slots + lookahead - len(state.in_flight) - len(first)
    limit = state.config.max_experiments
    if limit > 0:
        want = min(want, limit - len(state.variants))
    return max(0, want)


def completion(state: CampaignState) -> str | None:
    """Why the campaign is complete (a detail for CampaignStopped), or None if it is not."""
    if state.stopped or state.in_flight or state.awaiting_verdict:
        return None  # the ledger has yet to decide, or a close call's replicates still run
    limit = state.config.max_experiments
    if limit > 0 and len(state.variants) >= limit:
        return f"all {len(state.variants)} experiments proposed and evaluated (max {limit})"
    if state.halted:
        return (
            f"the proposer halted ({state.halt_reason}) and all {len(state.variants)} "
            "experiments are evaluated"
        )
    return None
