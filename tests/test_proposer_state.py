"""The proposer's projection of the history, from hand-built events (no broker)."""

from __future__ import annotations

from services.contracts import (
    MAX_RUN_ATTEMPTS,
    BestUpdated,
    CampaignStarted,
    CampaignStopped,
    FleetStatus,
    LlmCost,
    ProposerConfig,
    ProposerHalted,
    ResultEvaluated,
    Status,
    VariantProposed,
)
from services.proposer.fleet import Fleet
from services.proposer.state import History, completion, to_propose
from tests.synthetic import result_of


def started(max_experiments: int = 0, lookahead: int = 2, ts: float = 1.0) -> CampaignStarted:
    return CampaignStarted(
        campaign="c",
        event_id=f"started-{ts}",
        ts=ts,
        seed_digest="d0",
        harness_key="h",
        max_experiments=max_experiments,
        proposer=ProposerConfig(lookahead=lookahead),
        keep_rule="strict",  # a result is decided at once: completion needs no verdicts
    )


def proposed(vid: str, wave: int = 1, usd: float | None = None) -> VariantProposed:
    cost = LlmCost(model="m", usd=usd) if usd is not None else None
    return VariantProposed(
        campaign="c",
        event_id=f"p-{vid}",
        variant_id=vid,
        parent_id="v0",
        source_digest=f"d-{vid}",
        diff="",
        title=f"T {vid}",
        wave=wave,
        llm_cost=cost,
    )


def result(
    vid: str,
    status: Status = "ok",
    value: float | None = 1.0,
    replica: int = 0,
    attempt: int = 1,
    ts: float = 10.0,
    tier: str = "default",
) -> ResultEvaluated:
    return result_of("c", vid, value, status, replica=replica, attempt=attempt, ts=ts, tier=tier)


def test_in_flight_is_proposed_minus_finished() -> None:
    h = History()
    h.apply_campaign_started(started())
    for vid in ("v0", "v1", "v2", "v3"):
        h.apply_variant_proposed(proposed(vid))
    h.apply_result_evaluated(result("v1"))
    h.apply_result_evaluated(result("v2", status="infra"))  # tried again: still in flight
    state = h.campaigns["c"]
    assert state.in_flight == ["v0", "v2", "v3"]
    h.apply_result_evaluated(result("v2", status="infra", attempt=MAX_RUN_ATTEMPTS))  # given up
    assert state.in_flight == ["v0", "v3"]
    # Applying everything again (fast path + replay) changes nothing.
    h.apply_variant_proposed(proposed("v1"))
    h.apply_result_evaluated(result("v1"))
    assert state.in_flight == ["v0", "v3"]
    assert len(state.variants) == 4
    assert state.next_wave == 2


def test_replica0_decides_status_and_value_is_mean_of_ok_runs() -> None:
    h = History()
    h.apply_campaign_started(started())
    h.apply_variant_proposed(proposed("v1"))
    h.apply_result_evaluated(result("v1", status="infra", attempt=1, ts=5))
    state = h.campaigns["c"]
    row = state.row("v1")
    assert row is not None and row.status == "infra" and row.value is None
    h.apply_result_evaluated(result("v1", value=0.99, attempt=2, ts=6))
    h.apply_result_evaluated(result("v1", value=0.97, replica=1, ts=7))
    h.apply_result_evaluated(
        result("v1", value=0.5, replica=2, ts=8, tier="validate")
    )  # another tier
    row = state.row("v1")
    assert row is not None and row.status == "ok"
    assert row.value is not None and abs(row.value - 0.98) < 1e-12
    assert row.title == "T v1" and row.parent_id == "v0" and row.finished_at == 8
    assert abs((state.noise() or 0) - 0.0141421356) < 1e-6  # std of (0.99, 0.97)
    h.apply_variant_proposed(proposed("v2"))
    h.apply_result_evaluated(result("v2", status="crash", ts=4))
    assert [r.variant_id for r in state.rows()] == ["v2", "v1"]  # oldest result first


def test_best_spend_halt_stop_and_restart() -> None:
    h = History()
    h.apply_campaign_started(started())
    h.apply_variant_proposed(proposed("v1", wave=1, usd=0.5))
    h.apply_variant_proposed(proposed("v2", wave=1, usd=0.25))
    h.apply_variant_proposed(proposed("v3", wave=2, usd=0.1))
    h.apply_variant_proposed(proposed("v4", wave=3))
    state = h.campaigns["c"]
    assert abs(state.spent_usd - 0.85) < 1e-12 and state.spent_requests == 2
    newer = BestUpdated(
        campaign="c", event_id="b2", ts=20, variant_id="v2", source_digest="d-v2", value=0.9, runs=1
    )
    older = BestUpdated(
        campaign="c",
        event_id="b1",
        ts=10,
        variant_id="v1",
        source_digest="d-v1",
        value=0.95,
        runs=1,
    )
    h.apply_best_updated(newer)
    h.apply_best_updated(older)  # the replay brings an older best after the fast path: ignored
    assert state.best is not None and state.best.variant_id == "v2"
    h.apply_proposer_halted(ProposerHalted(campaign="c", event_id="h", reason="budget"))
    assert state.halted and state.running
    stop = CampaignStopped(campaign="c", event_id="stopped:c", ts=30, reason="stopped")
    h.apply_campaign_stopped(stop)
    assert not state.running and h.running() == []
    h.apply_campaign_started(started(ts=40))  # started again: same history, proposing again
    assert state.running and not state.halted and state.generation == 2
    h.apply_campaign_stopped(stop)  # the same stop event once more (replay): not a new stop
    assert state.running
    assert len(state.variants) == 4


def test_events_of_unknown_campaigns_are_ignored() -> None:
    h = History()
    assert h.apply_variant_proposed(proposed("v1")) is None
    assert h.campaigns == {}


def test_to_propose_keeps_slots_plus_lookahead_in_flight() -> None:
    h = History()
    h.apply_campaign_started(started(max_experiments=10, lookahead=2))
    state = h.campaigns["c"]
    assert to_propose(state, slots=4, default_lookahead=5) == 6
    for i in range(6):
        h.apply_variant_proposed(proposed(f"v{i}"))
    assert to_propose(state, slots=4, default_lookahead=5) == 0
    h.apply_result_evaluated(result("v0"))
    assert to_propose(state, slots=4, default_lookahead=5) == 1
    for i in range(6, 10):
        h.apply_variant_proposed(proposed(f"v{i}"))
    for i in range(1, 10):
        h.apply_result_evaluated(result(f"v{i}"))
    assert to_propose(state, slots=4, default_lookahead=5) == 0  # max_experiments reached
    assert completion(state) is not None


def test_completion_needs_everything_finished() -> None:
    h = History()
    h.apply_campaign_started(started(max_experiments=2))
    state = h.campaigns["c"]
    assert completion(state) is None
    h.apply_variant_proposed(proposed("v0"))
    h.apply_variant_proposed(proposed("v1"))
    h.apply_result_evaluated(result("v0"))
    assert completion(state) is None
    h.apply_result_evaluated(result("v1", status="crash"))
    assert "2 experiments" in (completion(state) or "")

    h2 = History()
    h2.apply_campaign_started(started())
    state2 = h2.campaigns["c"]
    h2.apply_variant_proposed(proposed("v0"))
    h2.apply_proposer_halted(ProposerHalted(campaign="c", event_id="h", reason="exhausted"))
    assert completion(state2) is None
    h2.apply_result_evaluated(result("v0"))
    assert "halted (exhausted)" in (completion(state2) or "")


def test_fleet_sums_launchers_and_forgets_quiet_ones() -> None:
    fleet = Fleet(expiry_s=10.0)
    a = FleetStatus(campaign="*", launcher_id="a", slots={"h100": 2}, busy={"h100": 1})
    b = FleetStatus(campaign="*", launcher_id="b", slots={"h100": 1, "h200": 3}, busy={})
    assert fleet.update(a, now=0.0)
    assert fleet.update(b, now=5.0)
    assert not fleet.update(a, now=6.0)  # same slots: nothing changed
    assert fleet.slots(now=7.0) == {"h100": 3, "h200": 3}
    assert fleet.free(now=7.0) == {"h100": 2, "h200": 3}
    assert fleet.slots(now=15.5) == {"h100": 2}  # b last heard at 5.0: expired
    assert fleet.slots(now=30.0) == {}


def test_a_stop_seen_before_its_start_still_stops_it() -> None:
    """The fast path may bring a stop before the replay brings the campaign's start."""
    h = History()
    stop = CampaignStopped(campaign="c", event_id="stopped:c", ts=30, reason="stopped")
    assert h.apply_campaign_stopped(stop) is None
    h.apply_campaign_started(started())
    assert h.apply_campaign_stopped(stop) is not None
    assert h.running() == []
