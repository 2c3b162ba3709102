"""Identity: the content-derived ids of sources, variants, runs and events, and the keys an
event of one run or one proposal carries. Deterministic, so a redelivered or re-planned
event has the id it had (JetStream drops the duplicate)."""

from __future__ import annotations

import hashlib
from typing import TypedDict


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


class RunKeys(TypedDict):
    """The fields that name one attempt of a run, shared by RunStarted, RunFinished and
    ResultEvaluated: spread them into the event (`RunStarted(**keys, ...)`)."""

    campaign: str
    event_id: str
    run_id: str
    variant_id: str
    tier: str
    replica: int
    attempt: int


def run_keys(
    kind: str, campaign: str, run_id: str, variant_id: str, tier: str, replica: int, attempt: int
) -> RunKeys:
    """The keys of the `kind` event ("started", "finished", ...) of one attempt of a run."""
    event_id = event_id_for(kind, campaign, run_id, attempt)
    return RunKeys(
        campaign=campaign,
        event_id=event_id,
        run_id=run_id,
        variant_id=variant_id,
        tier=tier,
        replica=replica,
        attempt=attempt,
    )


class VariantKeys(TypedDict):
    """The fields that name a variant's proposal: spread them into VariantProposed."""

    campaign: str
    event_id: str
    variant_id: str


def variant_keys(campaign: str, variant_id: str) -> VariantKeys:
    """The keys of the proposal of `variant_id` (one per variant and campaign)."""
    event_id = event_id_for("proposed", campaign, variant_id)
    return VariantKeys(campaign=campaign, event_id=event_id, variant_id=variant_id)
