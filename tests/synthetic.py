"""A synthetic campaign as a list of events, for the ledger's tests.

Each item is `(event, source_text, log_text)`: what the ledger's handler would have fetched
from the object stores alongside the event. Values are deterministic from `seed`.
"""

from __future__ import annotations

import random
from typing import Any

from services.contracts import (
    CampaignStarted,
    CampaignStopped,
    Event,
    LlmCost,
    ResultEvaluated,
    RunFinished,
    RunStarted,
    Status,
    VariantProposed,
    event_id_for,
    run_id_for,
    run_keys,
    source_digest,
    variant_id_for,
)

Item = tuple[Event, str | None, str | None]

SEED_SOURCE = "DEPTH = 8\nLR = 0.04\nWARMUP = 0.1\n\nprint('training')\n"


def _source(i: int) -> str:
    return SEED_SOURCE if i == 0 else SEED_SOURCE.replace("LR = 0.04", f"LR = {0.04 + i / 1000:g}")


def _summary(value: float | None) -> str:
    if value is None:
        return ""
    return f"---\nval_bpb:          {value:.6f}\npeak_vram_mb:     2048.0\n"


def run_events(
    campaign: str,
    variant_id: str,
    status: Status,
    value: float | None,
    t: float,
    replica: int = 0,
    attempt: int = 1,
    tier: str = "default",
) -> list[Item]:
    """A run's RunStarted, RunFinished (with its log) and ResultEvaluated."""
    run_id = run_id_for(variant_id, tier, replica)
    log = f"step 0 (0.0%) | loss: 9.0 | tok/sec: 1,000\n{_summary(value)}"
    ids: dict[str, Any] = {  # what the three events of a run share
        "campaign": campaign,
        "run_id": run_id,
        "variant_id": variant_id,
        "tier": tier,
        "replica": replica,
        "attempt": attempt,
    }
    started = RunStarted(
        **ids,
        event_id=event_id_for("started", run_id, attempt),
        ts=t,
        backend="sim",
        host="localhost",
        accelerator="cpu",
    )
    finished = RunFinished(
        **ids,
        event_id=event_id_for("finished", run_id, attempt),
        ts=t + 1,
        exit_code=0 if value is not None else 1,
        started_at=t,
        finished_at=t + 1,
        log_key=run_id,
        log_tail=log[-200:],
        infra_failure=status == "infra",
    )
    result = ResultEvaluated(
        **ids,
        event_id=event_id_for("result", run_id, attempt),
        ts=t + 2,
        status=status,
        value=value,
        metrics={} if value is None else {"val_bpb": value, "peak_vram_mb": 2048.0},
        crash_reason="" if status == "ok" else f"synthetic {status}",
    )
    return [(started, None, None), (finished, None, log), (result, None, None)]


def campaign_started(campaign: str = "c", **fields: Any) -> CampaignStarted:
    """A CampaignStarted with placeholder seed and harness keys at ts 1.0; `fields` win."""
    defaults = {"event_id": f"cs-{campaign}", "ts": 1.0, "seed_digest": "d", "harness_key": "h"}
    return CampaignStarted(campaign=campaign, **(defaults | fields))


def proposal_of(
    campaign: str, source: str, ts: float, title: str, **fields: Any
) -> VariantProposed:
    """The proposal of `source` (its variant id from it), with no parent unless `fields`
    name one; `fields` win."""
    vid = variant_id_for(campaign, source)
    defaults = {"event_id": f"vp-{vid}", "parent_id": None, "diff": ""}
    return VariantProposed(
        campaign=campaign,
        ts=ts,
        variant_id=vid,
        source_digest=source_digest(source),
        title=title,
        **(defaults | fields),
    )


def result_of(
    campaign: str,
    variant_id: str,
    value: float | None,
    status: Status = "ok",
    *,
    replica: int = 0,
    attempt: int = 1,
    ts: float = 10.0,
    tier: str = "default",
) -> ResultEvaluated:
    """The ResultEvaluated of one attempt of a run of `variant_id` (its value only if ok)."""
    run_id = run_id_for(variant_id, tier, replica)
    keys = run_keys("result", campaign, run_id, variant_id, tier, replica, attempt)
    return ResultEvaluated(**keys, ts=ts, status=status, value=value if status == "ok" else None)


def _proposal(name: str, i: int, t: float) -> Item:
    """The i-th proposal: the baseline (the seed source), then one LR change each."""
    source = _source(i)
    vid = variant_id_for(name, source)
    proposed = VariantProposed(
        campaign=name,
        event_id=event_id_for("proposed", vid),
        ts=t,
        variant_id=vid,
        parent_id=None if i == 0 else variant_id_for(name, SEED_SOURCE),
        source_digest=source_digest(source),
        diff="",
        title="baseline" if i == 0 else f"LR = {0.04 + i / 1000:g}",
        rationale="synthetic",
        proposer="grid",
        wave=0 if i == 0 else 1 + (i - 1) // 4,
        llm_cost=None if i == 0 else LlmCost(model="test", input_tokens=100.0, usd=0.01),
    )
    return (proposed, source, None)


def synthetic_campaign(
    name: str = "synthetic",
    variants: int = 10,
    seed: int = 0,
    crash_every: int = 4,
    t0: float = 1_700_000_000.0,
    stop: bool = True,
) -> list[Item]:
    """CampaignStarted, `variants` proposals (the first is the baseline), one run each
    (every `crash_every`-th crashes), and a CampaignStopped(completed) at the end."""
    rng = random.Random(seed)
    started = CampaignStarted(
        campaign=name,
        event_id=event_id_for("campaign", name),
        ts=t0,
        seed_digest=source_digest(SEED_SOURCE),
        harness_key="harness-0",
        keep_rule="strict",  # these tests assert the single-run rule's decisions
    )
    items: list[Item] = [(started, None, None)]
    for i in range(variants):
        t = t0 + 10 * (i + 1)
        proposal = _proposal(name, i, t)
        items.append(proposal)
        vid = variant_id_for(name, _source(i))
        if i and crash_every and i % crash_every == 0:
            items.extend(run_events(name, vid, "crash", None, t + 3))
        else:
            items.extend(run_events(name, vid, "ok", round(1.0 + rng.gauss(0, 0.01), 6), t + 3))
    if stop:
        stopped = CampaignStopped(
            campaign=name,
            event_id=event_id_for("stopped", name),
            ts=t0 + 10 * (variants + 2),
            reason="completed",
        )
        items.append((stopped, None, None))
    return items
