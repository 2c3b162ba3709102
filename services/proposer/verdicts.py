"""What the strategy is told of the ledger's keep decisions: the noise measured per tier,
the runs the ledger is still waiting for (replicates, promotions), the recent verdicts.

Read from the proposer's projection of the history (NoiseMeasured, RunRequested,
VariantDecided); pure.
"""

from __future__ import annotations

import dataclasses

from services.proposer.state import CampaignState
from services.proposer.strategy import PendingRuns, TierNoise, VerdictRow

RECENT_VERDICTS = 12  # the latest decisions shown, one per variant


def tier_noise(state: CampaignState) -> list[TierNoise]:
    """The latest measure of each tier, in the campaign's tier order."""
    order = list(state.config.tiers or ["default"])
    rank = {tier: k for k, tier in enumerate(order)}
    tiers = sorted(state.measured_noise, key=lambda t: (rank.get(t, len(order)), t))
    return [
        TierNoise(tier, state.measured_noise[tier].noise, state.measured_noise[tier].dof)
        for tier in tiers
    ]


def pending_runs(state: CampaignState) -> list[PendingRuns]:
    """The runs still out, grouped by variant, tier and why they were requested."""
    groups: dict[tuple[str, str, str], int] = {}
    for run in state.runs_out:
        key = (run.variant_id, run.tier, run.reason)
        groups[key] = groups.get(key, 0) + 1
    return [
        PendingRuns(_title(state, vid), tier, n, reason)
        for (vid, tier, reason), n in groups.items()
    ]


def recent_verdicts(state: CampaignState, limit: int = RECENT_VERDICTS) -> list[VerdictRow]:
    """The latest decision of the `limit` most recently decided variants, oldest first."""
    latest = sorted(state.decisions.values(), key=lambda d: d.ts)[-limit:]
    shown = [f.name for f in dataclasses.fields(VerdictRow) if f.name != "title"]
    return [
        VerdictRow(_title(state, d.variant_id), **{name: getattr(d, name) for name in shown})
        for d in latest
    ]


def _title(state: CampaignState, variant_id: str) -> str:
    variant = state.variants.get(variant_id)
    return variant.title if variant is not None else variant_id
