"""The JSON bodies of the ledger's HTTP API, as declared in its OpenAPI document.

`queries` returns plain dicts (the CLI reads them directly); the API validates each answer
against these models, so `/openapi.json` says exactly what is served. A field added to a
query must be added here too, or the API drops it (tests/test_api.py compares the two).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from services.contracts import Status

VariantStatus = Literal["pending", "keep", "discard", "crash"]
CampaignStatus = Literal["running", "stopped", "completed"]
RunState = Literal["requested", "running", "finished", "evaluated", "cancelled"]


class ErrorBody(BaseModel):
    """What a 404 (unknown campaign, variant or run; nothing stored yet) or a 503 says."""

    detail: str = Field(description="what was not found or what went wrong, naming the id")


class Health(BaseModel):
    ok: bool
    events: int = Field(ge=0, description="events the ledger has applied")


class CampaignListItem(BaseModel):
    name: str
    status: CampaignStatus
    metric: str
    direction: str
    started_at: float | None
    stopped_at: float | None
    stop_reason: str | None
    best_variant_id: str | None
    best_value: float | None
    halted_reason: str | None
    variants: int = Field(ge=0, description="proposed variants")


class LlmCost(BaseModel):
    """Claude's tokens and dollars spent on a variant (all 0 for a grid proposal)."""

    model: str | None
    input_tokens: float
    cache_creation_input_tokens: float
    cache_read_input_tokens: float
    output_tokens: float
    usd: float


class VariantGpuCost(BaseModel):
    usd: float = Field(
        description="its runs' metered GPU dollars (infrastructure failures excluded)"
    )


class VariantSummary(BaseModel):
    variant_id: str
    campaign: str
    parent_id: str | None
    source_digest: str | None
    title: str
    rationale: str
    proposer: str
    wave: int
    proposed_at: float | None
    status: VariantStatus
    verdict: str | None = Field(
        description="the keep rule's latest decision (keep, discard, undecided, crash)"
    )
    value: float | None = Field(description="mean of the metric over the variant's ok runs")
    ok_runs: int
    decided_at: float | None
    llm: LlmCost
    gpu: VariantGpuCost


class Run(BaseModel):
    """A run with its evaluated result (the result fields are null until it is evaluated)."""

    run_id: str
    campaign: str
    variant_id: str
    tier: str
    replica: int
    attempt: int
    state: RunState
    requested_at: float | None
    request_reason: str | None
    backend: str | None
    host: str | None
    accelerator: str | None
    slot: int | None
    started_at: float | None
    finished_at: float | None
    exit_code: int | None
    timed_out: bool
    cancelled: bool
    infra_failure: bool
    infra_reason: str
    log_key: str | None
    status: Status | None
    value: float | None
    metrics: dict[str, float]
    crash_reason: str | None
    training_seconds: float | None
    evaluated_at: float | None


class RunDetail(Run):
    log_tail: str | None = Field(description="the last lines of the log the launcher sent")


class KeepDecision(BaseModel):
    """One decision of the keep rule on a variant, with its evidence."""

    decision: str = Field(description="keep | discard | undecided | crash")
    rule: str
    tier: str
    reason: str
    n_candidate: int
    mean_candidate: float | None
    best_variant_id: str | None
    n_best: int
    mean_best: float | None
    noise: float | None = Field(description="the run-to-run spread the rule used")
    margin: float | None = Field(description="the improvement it required at these n")
    replicates_requested: int
    runs_cancelled: int = Field(
        0, description="runs still out that the decision made useless, cancelled"
    )
    run_id: str = Field(description="the result that led to the decision")
    decided_at: float


class VariantDetail(VariantSummary):
    diff: str = Field(description="the diff the proposer sent (GET .../diff computes one)")
    runs: list[Run]
    decisions: list[KeepDecision]


class BestVariant(VariantSummary):
    """The campaign's best variant; `value` is its mean over `runs` ok runs."""

    diff: str
    runs: int = Field(ge=0, description="ok runs behind the value")
    decisions: list[KeepDecision]
    metric: str
    edit_file: str


class BestWithSource(BestVariant):
    source: str | None = Field(description="its source; null if missing from the object store")


class CampaignCounts(BaseModel):
    proposed: int
    variants: dict[str, int] = Field(description="proposed variants by status")
    running: int
    runs: dict[str, int] = Field(description="runs by state")
    evaluated: int
    experiments: int = Field(description="variants with a result (replicates not counted)")
    results: dict[str, int] = Field(description="results by status")
    dead_letters: int


class CampaignLlmCost(BaseModel):
    usd: float
    input_tokens: float
    cache_creation_input_tokens: float
    cache_read_input_tokens: float
    output_tokens: float


class CampaignGpuCost(BaseModel):
    usd: float = Field(description="metered GPU dollars of every attempt (0: not metered)")
    gpu_seconds: float = Field(description="GPUs x seconds the campaign's runs held")
    infra_usd: float = Field(description="the part of `usd` lost to infrastructure failures")


class TierNoise(BaseModel):
    noise: float = Field(description="pooled standard deviation of one run")
    dof: int = Field(description="its degrees of freedom")
    variants: int = Field(description="variants run more than once behind it")
    measured_at: float


class CampaignSummary(BaseModel):
    name: str
    config: dict[str, Any] | None = Field(description="the CampaignStarted event (null: unseen)")
    metric: str
    direction: str
    keep_rule: str
    edit_file: str
    status: CampaignStatus
    started_at: float | None
    stopped_at: float | None
    stop_reason: str | None
    stop_detail: str | None
    best_variant_id: str | None
    best_value: float | None
    best_runs: int
    halted_reason: str | None
    halted_detail: str | None
    counts: CampaignCounts
    llm: CampaignLlmCost
    gpu: CampaignGpuCost
    noise: dict[str, TierNoise] = Field(description="the measured run-to-run spread per tier")
    best: BestVariant | None


class DeadLetter(BaseModel):
    """A message no handler could ever accept, with why (forged, unknown run, undecodable)."""

    event_id: str
    campaign: str  # `?` when the payload named none that could be read
    subject: str
    stream_seq: int
    consumer: str
    error: str
    payload_preview: str
    ts: float


class BestChange(BaseModel):
    variant_id: str
    value: float
    previous_variant_id: str | None
    previous_value: float | None
    ts: float


class Ancestor(BaseModel):
    variant_id: str
    parent_id: str | None
    title: str
    status: VariantStatus
    value: float | None
    proposed_at: float | None


class MissingAncestor(BaseModel):
    """An ancestor the ledger has no row for: the chain stops there."""

    variant_id: str
    missing: Literal[True]
