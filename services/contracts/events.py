"""Every subject and event of nightshift: the one place the services agree.

Events are msgspec Structs encoded as JSON (readable with `nats sub`). Each carries a
`schema` version, a deterministic `event_id` (sent as `Nats-Msg-Id`, so JetStream drops
duplicates), the `campaign` it belongs to and a timestamp `ts`. An event's
subject is `<prefix>.<its tag>`; the prefix (default `ns`) is a setting.
"""

from __future__ import annotations

import time
import typing
from typing import Any, ClassVar, Literal

import msgspec

from services.contracts.ids import RunKeys, run_keys

SCHEMA_VERSION = 1

# JetStream names. One stream holds the history; sources and logs live in object stores.
STREAM = "NIGHTSHIFT"
SOURCES_BUCKET = "sources"
LOGS_BUCKET = "logs"
CAMPAIGNS_BUCKET = "campaigns"  # KV: campaign name -> encoded CampaignStarted

# Deliveries of one run's work before it is given up (dead-lettered): the launchers'
# max_deliver. A run whose attempt failed on the infrastructure is tried again until then,
# so its variant is still in flight.
MAX_RUN_ATTEMPTS = 5

# Statuses of a result. `ok` is the only one with a trustworthy metric. `implausible`: the
# run printed a summary block its own measurements contradict (a training time longer than
# the launcher's wall clock, or far below the budget; no steps or tokens): a failure of the
# variant, shown with its reason like a crash, never a metric.
Status = Literal["ok", "crash", "timeout", "diverged", "oom", "implausible", "infra"]
Direction = Literal["minimize", "maximize"]


class ContractError(ValueError):
    """A message that is not a valid nightshift event (malformed, unknown type or schema)."""


class Event(msgspec.Struct, kw_only=True, tag_field="type", frozen=True):
    """Fields every event carries."""

    # Lossy events go over core NATS (not stored in the stream).
    lossy: ClassVar[bool] = False

    campaign: str
    event_id: str = ""
    schema: int = SCHEMA_VERSION
    ts: float = msgspec.field(default_factory=time.time)

    @classmethod
    def tag(cls) -> str:
        """The event's type on the wire, which is also its subject after the prefix."""
        return str(cls.__struct_config__.tag)

    @classmethod
    def subject_filter(cls, prefix: str = "ns") -> str:
        """The subject (or wildcard) a subscriber of this type listens on."""
        return f"{prefix}.{cls.tag()}"

    def subject(self, prefix: str = "ns") -> str:
        """The subject this event is published on."""
        return f"{prefix}.{self.tag()}"


class LlmCost(msgspec.Struct, kw_only=True, frozen=True):
    """Token usage and price attributed to one variant (a share of one request)."""

    model: str
    input_tokens: float = 0.0
    cache_creation_input_tokens: float = 0.0
    cache_read_input_tokens: float = 0.0
    output_tokens: float = 0.0
    usd: float = 0.0


class ProposerConfig(msgspec.Struct, kw_only=True, frozen=True):
    strategy: str = "grid"
    lookahead: int = 0  # variants queued beyond the slots (0: a quarter of the slots, >= 2)
    wave_size: int = 0  # 0: follow free capacity
    model: str = ""
    budget_usd: float = 0.0  # 0: no cap
    budget_requests: int = 0  # 0: no cap


class CampaignStarted(Event, tag="campaign.started", kw_only=True, frozen=True):
    seed_digest: str  # key of the seed source in the `sources` object store
    harness_key: str  # key of a tar of the trainer directory (all but edit_file) in `sources`
    trainer_dir: str = "trainer"
    edit_file: str = "train.py"
    metric: str = "val_bpb"
    direction: Direction = "minimize"
    profile: str = "cpu"  # NIGHTSHIFT_PROFILE passed to every run
    max_experiments: int = 0  # 0: until stopped
    run_timeout_s: float = 600.0
    tiers: list[str] = msgspec.field(default_factory=lambda: ["default"])
    keep_rule: str = "noise-aware"
    keep_confidence: float = 0.99  # noise-aware: one-sided confidence of a keep
    keep_max_runs: int = 5  # noise-aware: replicate cap (ok runs of a candidate)
    noise_runs: int = 3  # runs of the seed at the start, which measure the noise
    # A result better than the best by more than this share of it (improbably far) is kept
    # only once a replicate run of the same variant agrees (0: never asks).
    confirm_jump: float = 0.0
    proposer: ProposerConfig = msgspec.field(default_factory=ProposerConfig)


class CampaignStopped(Event, tag="campaign.stopped", kw_only=True, frozen=True):
    reason: str  # "stopped" (by a user), "completed" (max experiments reached), ...
    detail: str = ""


class VariantProposed(Event, tag="variant.proposed", kw_only=True, frozen=True):
    variant_id: str
    parent_id: str | None
    source_digest: str
    diff: str
    title: str
    rationale: str = ""
    proposer: str = "grid"
    wave: int = 0
    llm_cost: LlmCost | None = None


class RunRequested(Event, tag="run.requested", kw_only=True, frozen=True):
    run_id: str
    variant_id: str
    source_digest: str
    tier: str
    replica: int
    reason: str = ""
    # Attempts this run already had: the launcher numbers its attempt attempt_base + the
    # delivery count, so a run requested again (after a campaign's stop) gets new event ids.
    attempt_base: int = 0


class RunStarted(Event, tag="run.started", kw_only=True, frozen=True):
    run_id: str
    variant_id: str
    backend: str
    host: str
    accelerator: str
    tier: str
    replica: int = 0
    attempt: int = 1
    slot: int = 0


class RunProgress(Event, tag="run.progress", kw_only=True, frozen=True):
    lossy: ClassVar[bool] = True

    run_id: str
    variant_id: str
    step: int
    fraction: float
    train_loss: float
    tok_per_s: float

    @classmethod
    def subject_filter(cls, prefix: str = "ns") -> str:
        return f"{prefix}.{cls.tag()}.>"

    def subject(self, prefix: str = "ns") -> str:
        return f"{prefix}.{self.tag()}.{self.run_id}"


class RunAttemptEvent(Event, kw_only=True, frozen=True):
    """An event of one attempt of a run, named by its RunKeys (RunFinished, ResultEvaluated)."""

    run_id: str
    variant_id: str
    tier: str
    replica: int = 0
    attempt: int = 1

    def keys(self, kind: str) -> RunKeys:
        """The keys of an event that follows from this run's attempt (its result)."""
        return run_keys(
            kind, self.campaign, self.run_id, self.variant_id, self.tier, self.replica, self.attempt
        )


class RunFinished(RunAttemptEvent, tag="run.finished", kw_only=True, frozen=True):
    exit_code: int | None
    started_at: float
    finished_at: float
    log_key: str  # key in the `logs` object store
    log_tail: str  # the last lines of the log, enough for the summary block and a traceback
    timed_out: bool = False
    cancelled: bool = False
    infra_failure: bool = False
    infra_reason: str = ""
    # The launcher's clock, for the evaluator's plausibility checks: wall seconds per
    # second the trainer reports (1 for real runs; the sim backend's time scale), and the
    # training budget the run was given in the trainer's seconds (0: not known here).
    clock_scale: float = 1.0
    budget_s: float = 0.0
    # GPU time this attempt held (GPUs x seconds) and its price at the tier's $/GPU-hour;
    # 0 where the backend does not meter (local, sim).
    gpu_seconds: float = 0.0
    gpu_usd: float = 0.0


class RunCancel(Event, tag="run.cancel", kw_only=True, frozen=True):
    lossy: ClassVar[bool] = True

    run_id: str  # "*" cancels every run of the campaign
    reason: str


class ResultEvaluated(RunAttemptEvent, tag="result.evaluated", kw_only=True, frozen=True):
    status: Status
    metric: str = "val_bpb"
    value: float | None = None  # the campaign's metric; None unless status is ok
    metrics: dict[str, float] = msgspec.field(default_factory=dict)
    crash_reason: str = ""
    training_seconds: float = 0.0  # wall seconds the run held its slot


class BestUpdated(Event, tag="best.updated", kw_only=True, frozen=True):
    variant_id: str
    source_digest: str
    value: float  # mean of the metric over the variant's ok runs
    runs: int
    previous_variant_id: str | None = None
    previous_value: float | None = None
    rule: str = "strict"
    tier: str = ""
    previous_runs: int = 0  # ok runs behind previous_value
    noise: float | None = None  # the run-to-run spread the rule used
    margin: float | None = None  # the improvement the rule required at these n


Decision = Literal["keep", "discard", "undecided"]


class VariantDecided(Event, tag="variant.decided", kw_only=True, frozen=True):
    """A keep rule's verdict on a variant (published by the ledger, one per decision).

    `undecided` comes with the replicate runs it requested (RunRequested, same tier). A
    final one (keep or discard) cancels the runs still out that it made useless: the
    variant's own, and on a keep the replaced best's (`cancelled_runs`, their run ids; the
    ledger marks them in the campaigns KV so no launcher starts them, and sends a RunCancel
    for those already running).
    """

    variant_id: str
    decision: Decision
    rule: str
    tier: str
    reason: str
    n_candidate: int
    n_best: int
    mean_candidate: float | None
    mean_best: float | None
    best_variant_id: str | None
    noise: float | None
    margin: float | None
    replicates_requested: int = 0
    cancelled_runs: list[str] = msgspec.field(default_factory=list)


class NoiseMeasured(Event, tag="noise.measured", kw_only=True, frozen=True):
    """The run-to-run spread of the metric on a tier: pooled std over every variant run
    more than once there (the seed's noise_runs first)."""

    tier: str
    noise: float
    dof: int  # degrees of freedom: sum over variants of (ok runs - 1)
    variants: int  # variants that contributed


class FleetStatus(Event, tag="fleet.status", kw_only=True, frozen=True):
    lossy: ClassVar[bool] = True

    launcher_id: str
    slots: dict[str, int]  # tier -> slots
    busy: dict[str, int]  # tier -> busy slots
    queued: int = 0


class ProposerHalted(Event, tag="proposer.halted", kw_only=True, frozen=True):
    """The proposer stopped proposing for a campaign (budget reached, strategy exhausted)."""

    reason: str
    detail: str = ""


class DeadLettered(Event, tag="deadletter", kw_only=True, frozen=True):
    """A message that can never be handled, recorded before it is terminated."""

    subject_name: str
    stream_seq: int
    consumer: str
    error: str
    payload_preview: str = ""


AnyEvent = (
    CampaignStarted
    | CampaignStopped
    | VariantProposed
    | RunRequested
    | RunStarted
    | RunProgress
    | RunFinished
    | RunCancel
    | ResultEvaluated
    | BestUpdated
    | VariantDecided
    | NoiseMeasured
    | FleetStatus
    | ProposerHalted
    | DeadLettered
)

EVENT_TYPES: tuple[type[Event], ...] = typing.get_args(AnyEvent)

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(AnyEvent)


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes) -> AnyEvent:
    """Decode one event; raise ContractError for anything that is not a valid event."""
    try:
        event: AnyEvent = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ContractError(f"malformed event: {exc}") from exc
    if event.schema > SCHEMA_VERSION:
        raise ContractError(
            f"unknown schema version {event.schema} for {type(event).__name__} "
            f"(this build understands <= {SCHEMA_VERSION}); upgrade nightshift"
        )
    return event


def stream_subjects(prefix: str = "ns") -> list[str]:
    """Subjects stored in the stream: every event that is not lossy."""
    return [cls.subject_filter(prefix) for cls in EVENT_TYPES if not cls.lossy]
