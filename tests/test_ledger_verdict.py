"""The noise-aware rule in the ledger: seed replicates measure the noise, a close call gets
replicates (RunRequested), every decision is a VariantDecided, a restart loses nothing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.contracts import (
    BestUpdated,
    CampaignStarted,
    CampaignStopped,
    Event,
    NoiseMeasured,
    ResultEvaluated,
    RunCancel,
    RunRequested,
    VariantDecided,
    VariantProposed,
    run_id_for,
    source_digest,
)
from services.ledger import queries
from services.ledger.api import create_app
from services.ledger.db import open_db
from services.ledger.projection import apply_event
from tests.synthetic import SEED_SOURCE, proposal_of, result_of, run_events

CAMPAIGN = "na"


def started(**overrides: object) -> CampaignStarted:
    fields: dict[str, object] = {
        "campaign": CAMPAIGN,
        "event_id": "cs",
        "ts": 1.0,
        "seed_digest": source_digest(SEED_SOURCE),
        "harness_key": "h",
        "keep_rule": "noise-aware",
        "keep_confidence": 0.99,
        "keep_max_runs": 5,
        "noise_runs": 3,
    }
    fields.update(overrides)
    return CampaignStarted(**fields)  # type: ignore[arg-type]


def proposal(i: int) -> tuple[VariantProposed, str]:
    source = SEED_SOURCE if i == 0 else SEED_SOURCE + f"X = {i}\n"
    title, proposer = ("baseline", "seed") if i == 0 else (f"v{i}", "grid")
    return proposal_of(CAMPAIGN, source, 2.0 + i, title, proposer=proposer), source


def result(
    vid: str, value: float, replica: int = 0, ts: float = 10.0, tier: str = "default"
) -> ResultEvaluated:
    return result_of(CAMPAIGN, vid, value, replica=replica, ts=ts, tier=tier)


def apply_result(conn: sqlite3.Connection, ev: ResultEvaluated) -> list[Event]:
    """A result as the ledger gets it: after its run's RunStarted and RunFinished (the
    ledger counts a result only for a run a launcher started and finished)."""
    t = ev.ts - 2.0
    run = run_events(ev.campaign, ev.variant_id, ev.status, ev.value, t, ev.replica, tier=ev.tier)
    for event, _, log in run[:2]:  # its RunStarted and RunFinished; the result is `ev`
        apply_event(conn, event, log_text=log)
    return list(apply_event(conn, ev))


def of(kind: type[Event], out: list[Event]) -> list[Event]:
    return [e for e in out if isinstance(e, kind)]


def seeded(conn: sqlite3.Connection, **campaign: object) -> tuple[str, list[Event]]:
    """A noise-aware campaign whose seed ran 3 times: 1.00, 1.01, 0.99 (std 0.01)."""
    out: list[Event] = list(apply_event(conn, started(**campaign)))
    seed, source = proposal(0)
    out += apply_event(conn, seed, source_text=source)
    for k, value in enumerate([1.0, 1.01, 0.99]):
        out += apply_result(conn, result(seed.variant_id, value, replica=k, ts=10.0 + k))
    return seed.variant_id, out


def with_candidate(conn: sqlite3.Connection, **campaign: object) -> tuple[str, str]:
    """The seeded campaign with candidate 1 proposed: (seed id, candidate id)."""
    seed, _ = seeded(conn, **campaign)
    cand, source = proposal(1)
    apply_event(conn, cand, source_text=source)
    return seed, cand.variant_id


def replicates_back(conn: sqlite3.Connection, vid: str, seed: str) -> list[Event]:
    """The runs the rule asks for after a first 0.95: the candidate's 1-3, the seed's 3."""
    out: list[Event] = []
    for k, value in ((1, 0.949), (2, 0.951), (3, 0.95)):
        out += apply_result(conn, result(vid, value, k, 20.0 + k))
    return out + apply_result(conn, result(seed, 1.0, replica=3, ts=25.0))


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    return open_db(tmp_path / "ledger.db")


def test_the_seed_runs_noise_runs_times_and_measures_the_noise(conn: sqlite3.Connection) -> None:
    seed, out = seeded(conn)
    requested = of(RunRequested, out)
    assert [(r.run_id, r.replica) for r in requested] == [  # type: ignore[attr-defined]
        (run_id_for(seed, "default", 1), 1),
        (run_id_for(seed, "default", 2), 2),
    ]
    noise = of(NoiseMeasured, out)
    assert len(noise) == 1
    assert noise[0].noise == pytest.approx(0.01)  # type: ignore[attr-defined]
    assert noise[0].dof == 2  # type: ignore[attr-defined]
    best = queries.best(conn, CAMPAIGN)
    assert best is not None and best["runs"] == 3 and best["value"] == pytest.approx(1.0)


def test_a_close_call_is_replicated_then_kept(conn: sqlite3.Connection) -> None:
    seed, vid = with_candidate(conn)
    # 0.95 vs 1.00 (3 runs), noise 0.01 from 2 degrees of freedom (t = 6.96 at 0.99):
    # margin 6.96 * 0.01 * sqrt(1 + 1/3) = 0.080 > 0.05; 4 runs a side would separate 0.05
    out = apply_result(conn, result(vid, 0.95, ts=20.0))
    [decided] = of(VariantDecided, out)
    assert decided.decision == "undecided"  # type: ignore[attr-defined]
    assert decided.n_candidate == 1 and decided.n_best == 3  # type: ignore[attr-defined]
    assert decided.margin == pytest.approx(0.0804, abs=1e-4)  # type: ignore[attr-defined]
    requested = [r.run_id for r in of(RunRequested, out)]  # type: ignore[attr-defined]
    assert requested == [run_id_for(vid, "default", k) for k in (1, 2, 3)] + [
        run_id_for(seed, "default", 3)
    ]
    assert not of(BestUpdated, out)
    assert queries.variant(conn, vid)["status"] == "pending"  # type: ignore[index]
    # a keep waits for every run the rule asked for, the best's replicate (last) included
    out = replicates_back(conn, vid, seed)
    [best] = of(BestUpdated, out)
    assert isinstance(out[-1], BestUpdated)
    assert best.variant_id == vid and best.runs == 4  # type: ignore[attr-defined]
    assert best.previous_variant_id == seed and best.previous_runs == 4  # type: ignore[attr-defined]
    assert best.margin is not None and best.margin < 0.05  # type: ignore[attr-defined]
    assert queries.variant(conn, vid)["status"] == "keep"  # type: ignore[index]


def test_a_clear_loss_is_discarded_without_replicates(conn: sqlite3.Connection) -> None:
    _, vid = with_candidate(conn)
    out = apply_result(conn, result(vid, 1.03, ts=20.0))
    assert not of(RunRequested, out)
    [decided] = of(VariantDecided, out)
    assert decided.decision == "discard"  # type: ignore[attr-defined]
    assert queries.variant(conn, vid)["status"] == "discard"  # type: ignore[index]


def test_a_lucky_first_run_that_regresses_is_never_kept(conn: sqlite3.Connection) -> None:
    seed, vid = with_candidate(conn)
    out = apply_result(conn, result(vid, 0.985, ts=20.0))  # strict would keep this
    requested = [(r.variant_id, r.replica) for r in of(RunRequested, out)]  # type: ignore[attr-defined]
    assert requested == [(vid, k) for k in (1, 2, 3, 4)] + [(seed, 3), (seed, 4)]  # to the cap
    out = []
    for k in range(1, 5):
        out += apply_result(conn, result(vid, 1.0 + (0.003 if k % 2 else -0.002), k, 20.0 + k))
    assert queries.variant(conn, vid)["status"] == "pending"  # the best's replicates are out
    for k, value in ((3, 1.0), (4, 1.002)):
        out += apply_result(conn, result(seed, value, k, 30.0 + k))
    assert not of(BestUpdated, out)
    assert queries.variant(conn, vid)["status"] == "discard"  # type: ignore[index]
    assert of(VariantDecided, out)[-1].reason == "replicate cap reached inside the margin"  # type: ignore[attr-defined]


def test_nothing_is_lost_when_the_ledger_restarts_mid_replicate(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    conn = open_db(path)
    seed, vid = with_candidate(conn)
    first = apply_result(conn, result(vid, 0.95, ts=20.0))
    conn.close()  # the ledger stops between the replicate request and its result
    conn = open_db(path)
    # the redelivered result republishes the same requests (same ids: JetStream dedups)
    assert apply_event(conn, result(vid, 0.95, ts=20.0)) == first
    out = replicates_back(conn, vid, seed)
    assert [b.variant_id for b in of(BestUpdated, out)] == [vid]  # type: ignore[attr-defined]


def test_strict_keeps_the_same_close_call_at_once(conn: sqlite3.Connection) -> None:
    _, vid = with_candidate(conn, keep_rule="strict")
    out = apply_result(conn, result(vid, 0.995, ts=20.0))
    assert not of(RunRequested, out)
    assert [d.rule for d in of(VariantDecided, out)] == ["strict"]  # type: ignore[attr-defined]
    assert len(of(BestUpdated, out)) == 1


def test_the_api_shows_each_decision_and_the_noise(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    conn = open_db(path)
    seed, vid = with_candidate(conn)
    apply_result(conn, result(vid, 0.95, ts=20.0))
    replicates_back(conn, vid, seed)
    conn.close()
    with TestClient(create_app(path)) as client:
        body = client.get(f"/variants/{vid}").json()
        summary = client.get(f"/campaigns/{CAMPAIGN}").json()
        tsv = client.get(f"/campaigns/{CAMPAIGN}/results.tsv").text
    assert body["status"] == "keep" and body["verdict"] == "keep"
    first, last = body["decisions"][0], body["decisions"][-1]
    assert first["decision"] == "undecided" and first["replicates_requested"] == 4
    assert (first["n_candidate"], first["n_best"]) == (1, 3)
    assert last["decision"] == "keep" and last["rule"] == "noise-aware"
    assert (last["n_candidate"], last["n_best"]) == (4, 4)
    assert last["mean_candidate"] == pytest.approx(0.95)
    assert last["mean_best"] == pytest.approx(1.0)
    assert last["margin"] < 0.05 < first["margin"]
    # pooled over the seed (1.00, 1.01, 0.99, 1.00) and the candidate (0.95, 0.949, 0.951,
    # 0.95): squares 2e-4 + 2e-6 over 3 + 3 degrees of freedom
    noise = summary["noise"]["default"]
    assert noise["dof"] == 6 and noise["variants"] == 2
    assert noise["noise"] == pytest.approx((2.02e-4 / 6) ** 0.5)
    assert [line.split("\t")[3] for line in tsv.splitlines()[1:]] == ["keep", "keep"]


def test_the_first_best_is_the_seed_not_the_first_variant_to_finish(
    conn: sqlite3.Connection,
) -> None:
    apply_event(conn, started())
    seed, seed_source = proposal(0)
    cand, source = proposal(1)
    apply_event(conn, seed, source_text=seed_source)
    apply_event(conn, cand, source_text=source)
    out = apply_result(conn, result(cand.variant_id, 1.05, ts=9.0))  # before the seed's
    assert not of(BestUpdated, out)
    [waiting] = of(VariantDecided, out)
    assert waiting.decision == "undecided" and "seed" in waiting.reason  # type: ignore[attr-defined]
    out = apply_result(conn, result(seed.variant_id, 1.0, ts=10.0))
    assert [b.variant_id for b in of(BestUpdated, out)] == [seed.variant_id]  # type: ignore[attr-defined]
    verdicts = {d.variant_id: d.decision for d in of(VariantDecided, out)}  # type: ignore[attr-defined]
    assert verdicts == {seed.variant_id: "keep", cand.variant_id: "discard"}


def feed(conn: sqlite3.Connection, runs: list[tuple[str, str, int, float]]) -> list[Event]:
    """Results (variant, tier, replica, value) in this order; the outbox of them all."""
    out: list[Event] = []
    for i, (vid, tier, replica, value) in enumerate(runs):
        out += apply_result(conn, result(vid, value, replica, 100.0 + i, tier))
    return out


def test_a_win_on_the_screen_tier_is_promoted_and_decided_on_validate(
    conn: sqlite3.Connection,
) -> None:
    apply_event(conn, started(tiers=["screen", "validate"]))
    seed, seed_source = proposal(0)
    out = apply_event(conn, seed, source_text=seed_source)
    s = seed.variant_id
    assert [(r.tier, r.replica) for r in of(RunRequested, out)] == [  # type: ignore[attr-defined]
        ("screen", 1),
        ("screen", 2),
        ("validate", 0),
        ("validate", 1),
        ("validate", 2),
    ]
    out = feed(conn, [(s, "screen", k, v) for k, v in enumerate([1.0, 1.01, 0.99])])
    assert not of(BestUpdated, out)  # the first best is decided on the last tier too
    out = feed(conn, [(s, "validate", k, v) for k, v in enumerate([0.99, 1.0, 0.98])])
    [first] = of(BestUpdated, out)
    assert first.tier == "validate" and first.value == pytest.approx(0.99)  # type: ignore[attr-defined]

    win, win_source = proposal(1)
    apply_event(conn, win, source_text=win_source)
    w = win.variant_id
    out = feed(conn, [(w, "screen", 0, 0.95)])  # inside the screen margin: replicates
    out = feed(conn, [(w, "screen", 1, 0.949), (w, "screen", 2, 0.951), (w, "screen", 3, 0.95)])
    out += feed(conn, [(s, "screen", 3, 1.0)])
    assert not of(BestUpdated, out)
    promoted = [d for d in of(VariantDecided, out) if "promoted" in d.reason]  # type: ignore[attr-defined]
    assert promoted and promoted[-1].tier == "screen"  # type: ignore[attr-defined]
    assert [(r.variant_id, r.tier) for r in of(RunRequested, out)] == [(w, "validate")]  # type: ignore[attr-defined]
    out = feed(conn, [(w, "validate", 0, 0.94)])
    out += feed(conn, [(w, "validate", k, v) for k, v in ((1, 0.941), (2, 0.939), (3, 0.94))])
    out += feed(conn, [(s, "validate", 3, 0.99)])
    [best] = of(BestUpdated, out)
    assert best.variant_id == w and best.tier == "validate"  # type: ignore[attr-defined]
    assert best.value == pytest.approx(0.94)  # type: ignore[attr-defined]
    assert queries.best(conn, CAMPAIGN)["value"] == pytest.approx(0.94)  # type: ignore[index]


def test_a_screen_winner_that_loses_on_validate_is_discarded(conn: sqlite3.Connection) -> None:
    apply_event(conn, started(tiers=["screen", "validate"], keep_rule="strict", noise_runs=1))
    seed, seed_source = proposal(0)
    apply_event(conn, seed, source_text=seed_source)
    s = seed.variant_id
    feed(conn, [(s, "screen", 0, 1.0), (s, "validate", 0, 0.99)])
    lucky, source = proposal(1)
    apply_event(conn, lucky, source_text=source)
    out = feed(conn, [(lucky.variant_id, "screen", 0, 0.98)])  # strict: a win on screen
    assert [r.tier for r in of(RunRequested, out)] == ["validate"]  # type: ignore[attr-defined]
    out = feed(conn, [(lucky.variant_id, "validate", 0, 0.995)])  # not better there
    assert not of(BestUpdated, out)
    assert queries.variant(conn, lucky.variant_id)["status"] == "discard"  # type: ignore[index]


def test_a_win_that_waited_for_the_bests_runs_is_judged_once_they_are_back(
    conn: sqlite3.Connection,
) -> None:
    """A clear win whose judging waits for runs of the best still out (no verdict recorded
    yet) is judged when they come back; found stalling a campaign for good."""
    seed, _ = seeded(conn)
    (close, close_source), (clear, clear_source) = proposal(1), proposal(2)
    apply_event(conn, close, source_text=close_source)
    apply_event(conn, clear, source_text=clear_source)
    out = apply_result(conn, result(close.variant_id, 0.95, ts=20.0))  # a close call
    asked = {(e.variant_id, e.replica) for e in of(RunRequested, out)}  # type: ignore[attr-defined]
    assert (seed, 3) in asked  # ... asks for another run of the best too
    out = apply_result(conn, result(clear.variant_id, 0.80, ts=21.0))
    # separated on its one run, but with the noise measured on 2 degrees of freedom a
    # single run is not enough: one replicate first
    asked = {(e.variant_id, e.replica) for e in of(RunRequested, out)}  # type: ignore[attr-defined]
    assert asked == {(clear.variant_id, 1)} and not of(BestUpdated, out)
    out = apply_result(conn, result(clear.variant_id, 0.81, replica=1, ts=22.0))
    assert not of(BestUpdated, out)  # the best's run the close call asked for is still out
    assert queries.variant(conn, clear.variant_id)["status"] == "pending"  # type: ignore[index]
    out = apply_result(conn, result(seed, 1.0, replica=3, ts=23.0))
    assert [e.variant_id for e in of(BestUpdated, out)] == [clear.variant_id]  # type: ignore[attr-defined]


def test_a_discard_cancels_the_replicates_still_out(conn: sqlite3.Connection) -> None:
    seed, vid = with_candidate(conn)
    first = apply_result(conn, result(vid, 0.95, ts=20.0))
    asked = {r.run_id for r in of(RunRequested, first)}  # type: ignore[attr-defined]
    assert run_id_for(vid, "default", 3) in asked
    # Its first replicate says it is no better after all: discarded at once, and the
    # replicates still out (2 and 3; not the seed's, which refines the best) cancelled.
    out = apply_result(conn, result(vid, 1.2, replica=1, ts=21.0))
    [decided] = of(VariantDecided, out)
    assert decided.decision == "discard"  # type: ignore[attr-defined]
    cancelled = [run_id_for(vid, "default", k) for k in (2, 3)]
    assert decided.cancelled_runs == cancelled  # type: ignore[attr-defined]
    assert [c.run_id for c in of(RunCancel, out)] == cancelled  # type: ignore[attr-defined]
    states = conn.execute(
        "SELECT state FROM runs WHERE run_id IN (?, ?)", (cancelled[0], cancelled[1])
    ).fetchall()
    assert [s["state"] for s in states] == ["cancelled", "cancelled"]  # never started
    # A cancelled run that finished anyway decides nothing more.
    late = apply_result(conn, result(vid, 0.9, replica=2, ts=22.0))
    assert not of(VariantDecided, late) and not of(BestUpdated, late)
    detail = queries.decisions(conn, vid)
    assert detail[-1]["decision"] == "discard" and detail[-1]["runs_cancelled"] == 2
    # The seed's replicate the close call asked for is still out, not cancelled.
    row = conn.execute(
        "SELECT cancel_requested_at FROM runs WHERE run_id = ?", (run_id_for(seed, "default", 3),)
    ).fetchone()
    assert row is not None and row["cancel_requested_at"] is None


def test_a_stop_cancels_the_runs_not_started(conn: sqlite3.Connection) -> None:
    """Launchers skip a stopped campaign's runs: the replicates not started never will be."""
    _, vid = with_candidate(conn)
    asked = [r.run_id for r in of(RunRequested, apply_result(conn, result(vid, 0.95, ts=20.0)))]  # type: ignore[attr-defined]
    apply_event(conn, CampaignStopped(campaign=CAMPAIGN, event_id="stop", ts=21.0, reason="user"))
    states = {
        r["run_id"]: r["state"]
        for r in conn.execute("SELECT run_id, state FROM runs WHERE cancel_reason IS NOT NULL")
    }
    assert states == dict.fromkeys(asked, "cancelled")
