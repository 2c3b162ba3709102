"""A stopped campaign started again: the ledger requests every run the stop left undone,
and nothing that already has its result."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from services.contracts import CampaignStopped, RunRequested, run_id_for
from services.ledger.db import open_db
from services.ledger.projection import apply_event
from services.ledger.resume import RESUME_REASON
from tests.synthetic import run_events
from tests.test_ledger_verdict import (
    CAMPAIGN,
    apply_result,
    proposal,
    result,
    started,
    with_candidate,
)


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    return open_db(tmp_path / "ledger.db")


def stopped_mid_wave(conn: sqlite3.Connection) -> list[str]:
    """Variants 0-3 of a strict campaign, stopped with: 0 evaluated, 1 set aside (an
    infrastructure failure), 2 never started (skipped), 3 started and never reported."""
    apply_event(conn, started(keep_rule="strict", noise_runs=1))
    ids = []
    for i in range(4):
        event, source = proposal(i)
        apply_event(conn, event, source_text=source)
        ids.append(event.variant_id)
    for event, _, log in run_events(CAMPAIGN, ids[0], "ok", 1.0, 10.0):
        apply_event(conn, event, log_text=log)
    for event, _, log in run_events(CAMPAIGN, ids[1], "infra", None, 20.0):
        apply_event(conn, event, log_text=log)
    apply_event(conn, run_events(CAMPAIGN, ids[3], "ok", 0.9, 30.0)[0][0])  # its RunStarted
    apply_event(
        conn, CampaignStopped(campaign=CAMPAIGN, event_id="stop", ts=40.0, reason="stopped")
    )
    return ids


def test_a_resume_requests_each_run_left_undone_once(conn: sqlite3.Connection) -> None:
    ids = stopped_mid_wave(conn)
    out = apply_event(conn, started(keep_rule="strict", noise_runs=1, event_id="cs2", ts=50.0))
    requested = [e for e in out if isinstance(e, RunRequested)]
    assert len(requested) == len(out) == 3
    assert {(r.run_id, r.replica, r.attempt_base) for r in requested} == {
        (run_id_for(ids[1], "default", 0), 0, 1),  # after its set-aside attempt
        (run_id_for(ids[2], "default", 0), 0, 0),
        (run_id_for(ids[3], "default", 0), 0, 1),
    }
    assert all(r.reason == RESUME_REASON and r.tier == "default" for r in requested)
    assert len({r.event_id for r in requested}) == 3
    # The same restart seen again asks for nothing new; a later resume asks with new ids.
    assert (
        apply_event(conn, started(keep_rule="strict", noise_runs=1, event_id="cs2", ts=50.0)) == out
    )
    for event in requested:
        apply_event(conn, event)
    apply_event(
        conn, CampaignStopped(campaign=CAMPAIGN, event_id="stop2", ts=60.0, reason="stopped")
    )
    later = apply_event(conn, started(keep_rule="strict", noise_runs=1, event_id="cs3", ts=70.0))
    assert {e.run_id for e in later} == {r.run_id for r in requested}  # type: ignore[attr-defined]
    assert not {e.event_id for e in later} & {r.event_id for r in requested}


def test_a_first_start_and_a_running_campaign_request_nothing(conn: sqlite3.Connection) -> None:
    assert apply_event(conn, started(keep_rule="strict", noise_runs=1)) == []
    event, source = proposal(1)
    apply_event(conn, event, source_text=source)
    # Started again without a stop (new limits while it runs): its runs are still queued.
    assert apply_event(conn, started(keep_rule="strict", noise_runs=1, event_id="cs2", ts=9)) == []


def test_a_resume_asks_again_for_a_close_calls_replicates_but_not_cancelled_ones(
    conn: sqlite3.Connection,
) -> None:
    seed, vid = with_candidate(conn)
    asked = {
        e.run_id  # type: ignore[attr-defined]
        for e in apply_result(conn, result(vid, 0.95, ts=20.0))
        if isinstance(e, RunRequested)
    }
    stop = CampaignStopped(campaign=CAMPAIGN, event_id="stop", ts=30.0, reason="stopped")
    apply_event(conn, stop)
    again = apply_event(conn, started(event_id="cs2", ts=40.0))
    assert {e.run_id for e in again} == asked  # type: ignore[attr-defined]
    states = {
        r[0] for r in conn.execute("SELECT state FROM runs WHERE run_id LIKE ?", (vid + "%",))
    }
    assert "cancelled" not in states  # requested again
    # Its first replicate discards it: the ones still out are cancelled, and a later stop
    # and resume leaves them be.
    apply_result(conn, result(vid, 1.2, replica=1, ts=50.0))
    apply_event(conn, CampaignStopped(campaign=CAMPAIGN, event_id="stop2", ts=60.0, reason="x"))
    later = apply_event(conn, started(event_id="cs3", ts=70.0))
    assert not {e.run_id for e in later} & {run_id_for(vid, "default", k) for k in (2, 3)}  # type: ignore[attr-defined]
    assert run_id_for(seed, "default", 3) in {e.run_id for e in later}  # type: ignore[attr-defined]


def test_a_run_requested_after_the_stop_waits_for_the_resume(conn: sqlite3.Connection) -> None:
    _, vid = with_candidate(conn)
    apply_event(conn, CampaignStopped(campaign=CAMPAIGN, event_id="stop", ts=15.0, reason="x"))
    late = [
        e for e in apply_result(conn, result(vid, 0.95, ts=20.0)) if isinstance(e, RunRequested)
    ]
    for event in late:  # the replicates the late result asks for come back to the ledger
        apply_event(conn, event)
    states = {
        r["state"]
        for r in conn.execute("SELECT state FROM runs WHERE run_id LIKE ?", (vid + "-%",))
    }
    assert late and "requested" not in states  # the dashboard's stopped campaign settles
    again = apply_event(conn, started(event_id="cs2", ts=30.0))
    assert {e.run_id for e in late} <= {e.run_id for e in again}  # type: ignore[attr-defined]
