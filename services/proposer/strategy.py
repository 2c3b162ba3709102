"""What a proposer strategy receives and returns; the strategies are grid and claude."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from services.contracts import LlmCost


class StrategyExhausted(Exception):
    """The strategy has nothing new to propose (grid: every point tried)."""


class BudgetExhausted(Exception):
    """The campaign's proposal budget (dollars or requests) is spent."""


@dataclass(frozen=True)
class ResultRow:
    """One finished variant, as the strategy sees it."""

    variant_id: str
    title: str
    status: str  # ok | crash | timeout | diverged | oom | infra
    value: float | None  # the metric (mean over ok runs), None unless ok
    crash_reason: str = ""
    parent_id: str | None = None
    finished_at: float = 0.0
    runs: int = 1  # the ok runs behind the value (replicates of a close call)


@dataclass(frozen=True)
class TierNoise:
    """The run-to-run spread the ledger measured on a tier (NoiseMeasured)."""

    tier: str
    noise: float
    dof: int  # degrees of freedom of the measure


@dataclass(frozen=True)
class PendingRuns:
    """Runs the ledger requested of a variant (replicates, promotions), still to come."""

    title: str
    tier: str
    runs: int
    reason: str


@dataclass(frozen=True)
class VerdictRow:
    """The keep rule's latest decision on a variant (VariantDecided)."""

    title: str
    decision: str  # keep | discard | undecided
    tier: str
    n_candidate: int
    n_best: int
    mean_candidate: float | None
    mean_best: float | None
    margin: float | None
    reason: str


@dataclass
class ProposalRequest:
    campaign: str
    parent_id: str
    parent_source: str  # the current best (or a top-k variant, for exploration)
    best_value: float | None
    results: list[ResultRow]  # every finished variant so far, oldest first
    in_flight_titles: list[str]  # proposed, not yet evaluated
    known_ids: set[str]  # every variant id ever proposed in this campaign
    k: int  # how many variants this wave should hold
    wave: int
    free_slots: dict[str, int] = field(default_factory=dict)  # tier -> free slots
    noise_floor: float = 7e-4  # run-to-run spread of the metric: smaller "wins" are not wins
    metric: str = "val_bpb"
    direction: str = "minimize"
    program: str = ""  # program.md: the researcher's rules, when the trainer ships one
    edit_file: str = "train.py"
    # What this campaign's proposer has spent so far, from the history (so a restarted
    # proposer keeps to its budget): the sum of llm_cost.usd over its variants, and the
    # number of LLM proposal requests (waves) that produced them.
    spent_usd: float = 0.0
    requests_made: int = 0
    # What the ledger's keep rule says (empty under `strict` or before it said anything):
    # the noise it measured per tier, the runs it is still waiting for, its recent verdicts.
    keep_rule: str = ""
    measured_noise: list[TierNoise] = field(default_factory=list)
    pending_runs: list[PendingRuns] = field(default_factory=list)
    verdicts: list[VerdictRow] = field(default_factory=list)  # oldest first


@dataclass(frozen=True)
class Proposal:
    title: str
    source: str
    parent_id: str
    rationale: str = ""
    llm_cost: LlmCost | None = None


class Strategy(Protocol):
    name: str

    async def propose(self, request: ProposalRequest) -> list[Proposal]:
        """A wave of up to request.k new, valid variants (may be fewer; [] = try later)."""
        ...
