"""Every subject and event of nightshift: the one place the services agree.

Events are msgspec Structs encoded as JSON (readable with `nats sub`). Each carries a
`schema` version, a deterministic `event_id` (sent as `Nats-Msg-Id`, so JetStream drops
duplicates), the `campaign` it belongs to and a timestamp `ts`. Each class names its
subject suffix; the prefix (default `ns`) is a setting.
"""

from __future__ import annotations

import ast
import hashlib
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

import msgspec

SCHEMA_VERSION = 1

# JetStream names. One stream holds the history; sources and logs live in object stores.
STREAM = "NIGHTSHIFT"
SOURCES_BUCKET = "sources"
LOGS_BUCKET = "logs"
CAMPAIGNS_BUCKET = "campaigns"  # KV: campaign name -> encoded CampaignStarted

# The trainer prints one line per step in this form (see trainer/train.py); the launcher
# turns it into RunProgress events.
PROGRESS_LINE = re.compile(r"^step (\d+) \(([\d.]+)%\) \| loss: ([-+\w.]+) .*?tok/sec: ([\d,]+)")

# Statuses of a result. `ok` is the only one with a trustworthy metric.
Status = Literal["ok", "crash", "timeout", "diverged", "oom", "infra"]
Direction = Literal["minimize", "maximize"]


class ContractError(ValueError):
    """A message that is not a valid nightshift event (malformed, unknown type or schema)."""


class Event(msgspec.Struct, kw_only=True, tag_field="type", frozen=True):
    """Fields every event carries."""

    subject_suffix: ClassVar[str] = ""
    # Lossy events go over core NATS (not stored in the stream).
    lossy: ClassVar[bool] = False

    campaign: str
    event_id: str = ""
    schema: int = SCHEMA_VERSION
    ts: float = msgspec.field(default_factory=time.time)

    def subject(self, prefix: str = "ns") -> str:
        return f"{prefix}.{self.subject_suffix}"


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
    subject_suffix: ClassVar[str] = "campaign.started"

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
    keep_rule: str = "strict"
    proposer: ProposerConfig = msgspec.field(default_factory=ProposerConfig)


class CampaignStopped(Event, tag="campaign.stopped", kw_only=True, frozen=True):
    subject_suffix: ClassVar[str] = "campaign.stopped"

    reason: str  # "stopped" (by a user), "completed" (max experiments reached), ...
    detail: str = ""


class VariantProposed(Event, tag="variant.proposed", kw_only=True, frozen=True):
    subject_suffix: ClassVar[str] = "variant.proposed"

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
    subject_suffix: ClassVar[str] = "run.requested"

    run_id: str
    variant_id: str
    source_digest: str
    tier: str
    replica: int
    reason: str = ""


class RunStarted(Event, tag="run.started", kw_only=True, frozen=True):
    subject_suffix: ClassVar[str] = "run.started"

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
    subject_suffix: ClassVar[str] = "run.progress"
    lossy: ClassVar[bool] = True

    run_id: str
    variant_id: str
    step: int
    fraction: float
    train_loss: float
    tok_per_s: float

    def subject(self, prefix: str = "ns") -> str:
        return f"{prefix}.run.progress.{self.run_id}"


class RunFinished(Event, tag="run.finished", kw_only=True, frozen=True):
    subject_suffix: ClassVar[str] = "run.finished"

    run_id: str
    variant_id: str
    tier: str
    replica: int = 0
    attempt: int = 1
    exit_code: int | None
    started_at: float
    finished_at: float
    log_key: str  # key in the `logs` object store
    log_tail: str  # the last lines of the log, enough for the summary block and a traceback
    timed_out: bool = False
    cancelled: bool = False
    infra_failure: bool = False
    infra_reason: str = ""


class RunCancel(Event, tag="run.cancel", kw_only=True, frozen=True):
    subject_suffix: ClassVar[str] = "run.cancel"
    lossy: ClassVar[bool] = True

    run_id: str  # "*" cancels every run of the campaign
    reason: str


class ResultEvaluated(Event, tag="result.evaluated", kw_only=True, frozen=True):
    subject_suffix: ClassVar[str] = "result.evaluated"

    run_id: str
    variant_id: str
    tier: str
    replica: int = 0
    attempt: int = 1
    status: Status
    metric: str = "val_bpb"
    value: float | None = None  # the campaign's metric; None unless status is ok
    metrics: dict[str, float] = msgspec.field(default_factory=dict)
    crash_reason: str = ""
    training_seconds: float = 0.0  # wall seconds the run held its slot


class BestUpdated(Event, tag="best.updated", kw_only=True, frozen=True):
    subject_suffix: ClassVar[str] = "best.updated"

    variant_id: str
    source_digest: str
    value: float  # mean of the metric over the variant's ok runs
    runs: int
    previous_variant_id: str | None = None
    previous_value: float | None = None
    rule: str = "strict"


class FleetStatus(Event, tag="fleet.status", kw_only=True, frozen=True):
    subject_suffix: ClassVar[str] = "fleet.status"
    lossy: ClassVar[bool] = True

    launcher_id: str
    slots: dict[str, int]  # tier -> slots
    busy: dict[str, int]  # tier -> busy slots
    queued: int = 0


class ProposerHalted(Event, tag="proposer.halted", kw_only=True, frozen=True):
    """The proposer stopped proposing for a campaign (budget reached, strategy exhausted)."""

    subject_suffix: ClassVar[str] = "proposer.halted"

    reason: str
    detail: str = ""


class DeadLettered(Event, tag="deadletter", kw_only=True, frozen=True):
    """A message that can never be handled, recorded before it is terminated."""

    subject_suffix: ClassVar[str] = "deadletter"

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
    | FleetStatus
    | ProposerHalted
    | DeadLettered
)

EVENT_TYPES: tuple[type[Event], ...] = (
    CampaignStarted,
    CampaignStopped,
    VariantProposed,
    RunRequested,
    RunStarted,
    RunProgress,
    RunFinished,
    RunCancel,
    ResultEvaluated,
    BestUpdated,
    FleetStatus,
    ProposerHalted,
    DeadLettered,
)

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
    return [f"{prefix}.{cls.subject_suffix}" for cls in EVENT_TYPES if not cls.lossy]


# --- the trainer's knobs -----------------------------------------------------------------

_KNOB_OPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
}


def knob_value(node: ast.expr) -> int | float | None:
    """The value of a knob's right-hand side: a numeric literal or a small arithmetic of
    literals (`0.04`, `-1e-3`, `2**19`); None for anything else.

    The trainer contract (DESIGN §5) puts the knobs at the top of train.py as UPPER_CASE
    constants; the grid strategy rewrites them and the sim landscape scores them.
    """
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            return None
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        inner = knob_value(node.operand)
        if inner is None:
            return None
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.BinOp) and type(node.op) in _KNOB_OPS:
        left, right = knob_value(node.left), knob_value(node.right)
        if left is None or right is None or (isinstance(node.op, ast.Pow) and abs(right) > 64):
            return None
        try:
            value: int | float = _KNOB_OPS[type(node.op)](left, right)
        except (ZeroDivisionError, OverflowError):
            return None
        return value
    return None


KNOB_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


def knob_assignments(tree: ast.Module) -> Iterator[tuple[ast.Name, ast.expr]]:
    """(name, value) of each single-target UPPER_CASE assignment at the top of a module,
    before its first def or class: where the knobs live."""
    for stmt in tree.body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            return
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target, value = stmt.targets[0], stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            target, value = stmt.target, stmt.value
        else:
            continue
        if isinstance(target, ast.Name) and KNOB_NAME.fullmatch(target.id):
            yield target, value


# A top-level knob line: `NAME = number` (or 2**k), an optional comment.
_KNOB_LINE = re.compile(
    r"([A-Z][A-Z0-9_]*)(\s*=\s*)([-+]?(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][-+]?\d+)?"
    r"(?:\s*\*\*\s*\d+)?)(\s*(?:#.*)?)"
)


def knob_values_only(source: str, parent_source: str) -> bool:
    """True when `source` is its parent with only the numbers of knob lines changed."""
    lines, parent_lines = source.splitlines(), parent_source.splitlines()
    if len(lines) != len(parent_lines):
        return False
    changed = 0
    for new, old in zip(lines, parent_lines, strict=True):
        if new == old:
            continue
        changed += 1
        a, b = _KNOB_LINE.fullmatch(new), _KNOB_LINE.fullmatch(old)
        if a is None or b is None or a.group(1) != b.group(1):
            return False
    return changed > 0


# --- identity -------------------------------------------------------------------------


def normalize_source(source: str) -> str:
    """Normalize a source so cosmetic differences (line endings, trailing space) are one variant."""
    lines = source.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n") + "\n"


def source_digest(source: str) -> str:
    """Content key of a source in the `sources` object store."""
    return hashlib.sha256(normalize_source(source).encode()).hexdigest()


def variant_id_for(campaign: str, source: str) -> str:
    """First 16 hex of sha256 of the normalized source, scoped to its campaign.

    Two identical proposals in a campaign are one variant; the same source in another
    campaign (another trainer, profile or budget) is another experiment.
    """
    digest = hashlib.sha256(f"{campaign}\0{normalize_source(source)}".encode()).hexdigest()
    return digest[:16]


def run_id_for(variant_id: str, tier: str, replica: int) -> str:
    """Re-requesting the same run is idempotent."""
    return f"{variant_id}-{tier}-{replica}"


def event_id_for(*parts: object) -> str:
    """A deterministic event id from the parts that make the event unique."""
    return ":".join(str(p) for p in parts)
