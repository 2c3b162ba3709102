"""What the proposer makes of the ledger's decisions: the measured noise replaces the
constant, an undecided variant is not built on, its replicates hold their slots, and it
keeps the campaign open."""

from __future__ import annotations

import msgspec

from services.contracts import (
    CampaignStarted,
    NoiseMeasured,
    ProposerHalted,
    RunRequested,
    VariantDecided,
    run_id_for,
)
from services.proposer.state import History, completion, to_propose
from tests.test_proposer_state import proposed, result
from tests.test_proposer_state import started as strict_started


def started(lookahead: int = 2) -> CampaignStarted:
    return msgspec.structs.replace(strict_started(lookahead=lookahead), keep_rule="noise-aware")


def decided(vid: str, decision: str, ts: float, n: int = 1) -> VariantDecided:
    return VariantDecided(
        campaign="c",
        event_id=f"d-{vid}-{decision}-{n}",
        ts=ts,
        variant_id=vid,
        decision=decision,  # type: ignore[arg-type]
        rule="noise-aware",
        tier="default",
        reason="test",
        n_candidate=n,
        n_best=3,
        mean_candidate=0.99,
        mean_best=1.0,
        best_variant_id="v0",
        noise=0.01,
        margin=0.027,
        replicates_requested=2 if decision == "undecided" else 0,
    )


def history_with(*events: object) -> History:
    h = History()
    folds = h.folds()
    for event in events:
        folds[type(event)](event)  # type: ignore[index]
    return h


def test_the_measured_noise_replaces_the_fallback() -> None:
    h = history_with(started(), proposed("v1"), result("v1", value=1.0))
    assert h.campaigns["c"].noise() is None  # nothing measured: the caller's constant
    h = history_with(
        started(),
        NoiseMeasured(campaign="c", event_id="n2", tier="default", noise=0.012, dof=2, variants=1),
        NoiseMeasured(campaign="c", event_id="n1", tier="default", noise=0.5, dof=1, variants=1),
    )
    assert h.campaigns["c"].noise() == 0.012  # the one with more degrees of freedom


def replicate(vid: str, replica: int) -> RunRequested:
    run_id = run_id_for(vid, "default", replica)  # the id result() gives the same replica
    return RunRequested(
        campaign="c",
        event_id=f"rr-{run_id}",
        run_id=run_id,
        variant_id=vid,
        source_digest="d",
        tier="default",
        replica=replica,
        reason="replicate: a close call",
    )


def test_an_undecided_variant_is_not_built_on_and_its_replicates_hold_their_slots() -> None:
    h = history_with(
        started(lookahead=2),
        proposed("v1"),
        proposed("v2"),
        result("v1", value=0.99),
        result("v2", value=1.02),
        decided("v1", "undecided", ts=10.0),
        replicate("v1", 1),
        replicate("v1", 2),
        decided("v2", "discard", ts=10.0),
    )
    state = h.campaigns["c"]
    assert [r.variant_id for r in state.rows()] == ["v2"]
    assert state.undecided == ["v1"]
    # each replicate still to run holds a slot, like a variant in flight
    assert to_propose(state, slots=4, default_lookahead=2) == 4 + 2 - 2
    h.apply_result_evaluated(result("v1", value=0.98, replica=1))
    assert to_propose(state, slots=4, default_lookahead=2) == 4 + 2 - 1
    # the campaign is not complete while v1's replicates run
    h.apply_proposer_halted(ProposerHalted(campaign="c", event_id="halt", reason="exhausted"))
    assert completion(state) is None
    assert state.awaiting_verdict == ["v1"]
    kept = msgspec.structs.replace(
        decided("v1", "keep", ts=12.0, n=3), cancelled_runs=[run_id_for("v1", "default", 2)]
    )
    h.apply_variant_decided(kept)
    assert state.runs_out == []  # the replicate its decision cancelled no longer holds a slot
    assert state.undecided == []
    assert {r.variant_id for r in state.rows()} == {"v1", "v2"}
    assert completion(state) is not None


def test_a_late_undecided_does_not_reopen_a_decided_variant() -> None:
    h = history_with(started(), proposed("v1"), decided("v1", "keep", ts=12.0, n=3))
    h.apply_variant_decided(decided("v1", "undecided", ts=10.0))  # replayed out of order
    assert h.campaigns["c"].undecided == []


def test_completion_waits_for_the_ledger_to_decide_an_ok_result() -> None:
    h = history_with(started(), proposed("v1"), result("v1", value=0.99))
    state = h.campaigns["c"]
    h.apply_proposer_halted(ProposerHalted(campaign="c", event_id="halt", reason="exhausted"))
    assert state.awaiting_verdict == ["v1"] and completion(state) is None
    h.apply_variant_decided(decided("v1", "discard", ts=11.0))
    assert completion(state) is not None


def test_runs_out_on_a_later_tier_do_not_hold_the_first_tiers_slots() -> None:
    tiered = msgspec.structs.replace(started(lookahead=2), tiers=["screen", "validate"])
    on_screen = msgspec.structs.replace(replicate("v1", 1), tier="screen", run_id="v1-s-1")
    promoted = msgspec.structs.replace(replicate("v1", 0), tier="validate", run_id="v1-v-0")
    h = history_with(tiered, proposed("v1"), on_screen, promoted)
    state = h.campaigns["c"]
    # v1 (in flight) and its screen replicate count; its run on validate does not
    assert state.first_tier == "screen" and len(state.runs_out) == 2
    assert to_propose(state, slots=4, default_lookahead=2) == 4 + 2 - 1 - 1
