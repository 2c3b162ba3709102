"""The ledger projection: idempotency, keep rule, attempts, out-of-order events, results.tsv."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from services.contracts import (
    EVENT_TYPES,
    MAX_RUN_ATTEMPTS,
    BestUpdated,
    CampaignStopped,
    DeadLettered,
    Direction,
    Event,
    ProposerHalted,
    ResultEvaluated,
    RunRequested,
    Status,
    VariantDecided,
)
from services.contracts.ids import event_id_for, run_id_for
from services.ledger import keep, queries
from services.ledger.db import open_db
from services.ledger.projection import Pending, apply_event, apply_events, projected_types
from services.ledger.references import Unreferenced
from services.ledger.tsv import results_tsv
from tests.synthetic import SEED_SOURCE, Item, campaign_started, proposal_of, synthetic_campaign
from tests.synthetic import run_events as synthetic_run


def dump(conn: sqlite3.Connection) -> dict[str, list[tuple[Any, ...]]]:
    tables = [
        r[0]
        for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
    ]
    return {
        t: [tuple(r) for r in conn.execute(f"SELECT * FROM {t} ORDER BY rowid")] for t in tables
    }


def apply_all(conn: sqlite3.Connection, items: list[Item | list[Item]]) -> list[Event]:
    """Apply the items in order (a list in the list: a run's events, see `_result`)."""
    out: list[Event] = []
    flat = [i for item in items for i in (item if isinstance(item, list) else [item])]
    for event, source, log in flat:
        out.extend(apply_event(conn, event, source_text=source, log_text=log))
    return out


def bests(out: list[Event]) -> list[BestUpdated]:
    """The BestUpdated of an outbox (which also holds every VariantDecided)."""
    return [e for e in out if isinstance(e, BestUpdated)]


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    return open_db(tmp_path / "ledger.db")


# --- keep rule --------------------------------------------------------------------------


def _strict(candidate: list[float], best: list[float] | None, direction: str) -> str:
    return keep.strict(keep.Evidence(candidate, best, direction)).decision


def test_strict_minimize_and_maximize() -> None:
    assert _strict([1.0], None, "minimize") == "keep"
    assert _strict([0.99], [1.0], "minimize") == "keep"
    assert _strict([1.01], [1.0], "minimize") == "discard"
    assert _strict([1.01], [1.0], "maximize") == "keep"
    assert _strict([0.99], [1.0], "maximize") == "discard"
    assert _strict([], [1.0], "minimize") == "undecided"


def test_strict_ties_are_not_improvements() -> None:
    assert _strict([1.0], [1.0], "minimize") == "discard"
    assert _strict([1.0], [1.0], "maximize") == "discard"
    assert _strict([0.9, 1.1], [1.0], "minimize") == "discard"  # means tie
    assert _strict([0.9, 1.0], [1.0, 0.96], "minimize") == "keep"  # 0.95 < 0.98


def test_rule_for_unknown_falls_back_to_the_default() -> None:
    assert keep.rule_for("lax")[0] == "noise-aware"
    assert keep.failure_status(["infra", "infra"]) is None
    assert keep.failure_status(["infra", "oom"]) == "crash"


# --- dispatch ---------------------------------------------------------------------------


def test_every_stored_event_type_has_an_apply_function() -> None:
    assert projected_types() == {t for t in EVENT_TYPES if not t.lossy}


# --- idempotency ------------------------------------------------------------------------


def test_apply_twice_changes_nothing_and_returns_same_outbox(tmp_path: Path) -> None:
    items = synthetic_campaign(variants=10)
    once = open_db(tmp_path / "once.db")
    twice = open_db(tmp_path / "twice.db")
    out_once = apply_all(once, items)
    out_twice: list[Event] = []
    for event, source, log in items:
        first = apply_event(twice, event, source_text=source, log_text=log)
        again = apply_event(twice, event, source_text=source, log_text=log)
        assert first == again
        out_twice.extend(first)
    assert apply_all(twice, items) == out_once  # a full replay: the same outbox again
    assert out_once == out_twice
    assert dump(once) == dump(twice)
    assert {type(e) for e in out_once} == {BestUpdated, VariantDecided}
    top = bests(out_once)[0]
    assert isinstance(top, BestUpdated)
    assert top.event_id == event_id_for("best", "synthetic", top.variant_id)


def test_a_batch_in_one_transaction_is_the_same_as_one_event_at_a_time(tmp_path: Path) -> None:
    """apply_events (the live ledger's batches) leaves the same tables and outboxes as
    apply_event on each in turn: repeats inside a batch and across batches count once,
    and a refused event (a result of a variant never proposed) is rolled back alone."""
    items = synthetic_campaign(variants=12, seed=4)
    forged = _result("f" * 16, "ok", 0.0001)[2][0]  # names a variant no one proposed
    stream: list[Item] = []
    for i, item in enumerate(items):
        stream.append(item)
        if i % 5 == 2:
            stream.append(item)  # delivered again
        if i == len(items) // 2:
            stream.append((forged, None, None))
    one_by_one = open_db(tmp_path / "serial.db")
    serial: list[list[Event] | str] = []
    for event, source, log in stream:
        try:
            serial.append(apply_event(one_by_one, event, source_text=source, log_text=log))
        except Unreferenced as exc:
            serial.append(exc.reason)
    batched = open_db(tmp_path / "batched.db")
    together: list[list[Event] | str] = []
    for start in range(0, len(stream), 7):  # batches of 7: repeats straddle their edges
        chunk = [Pending(e, s, t) for e, s, t in stream[start : start + 7]]
        for result in apply_events(batched, chunk):
            together.append(result.reason if isinstance(result, Unreferenced) else result)  # type: ignore[arg-type]
    assert together == serial
    assert sum(isinstance(r, str) for r in serial) == 1
    assert dump(batched) == dump(one_by_one)
    assert not batched.in_transaction


def test_event_without_id_is_applied_once(conn: sqlite3.Connection) -> None:
    halt = ProposerHalted(campaign="c", reason="budget", detail="$5 spent", ts=1.0)
    apply_event(conn, halt)
    apply_event(conn, halt)
    assert conn.execute("SELECT COUNT(*) FROM proposer_halts").fetchone()[0] == 1
    assert queries.campaign(conn, "c")["halted_reason"] == "budget"  # type: ignore[index]


# --- a synthetic campaign ---------------------------------------------------------------


def test_synthetic_campaign_best_is_minimum(conn: sqlite3.Connection) -> None:
    items = synthetic_campaign(variants=10, seed=3)
    outbox = apply_all(conn, items)
    oks = [e for e, _, _ in items if isinstance(e, ResultEvaluated) and e.status == "ok"]
    best_event = min(oks, key=lambda e: e.value or 0.0)
    best = queries.best(conn, "synthetic")
    assert best is not None
    assert best["variant_id"] == best_event.variant_id
    assert best["value"] == pytest.approx(best_event.value)
    assert best["source"] is not None and "LR" in best["source"]
    assert bests(outbox)[-1].variant_id == best_event.variant_id
    # every BestUpdated improves on the one before
    values = [e.value for e in outbox if isinstance(e, BestUpdated)]
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values)

    summary = queries.campaign_summary(conn, "synthetic")
    assert summary is not None
    assert summary["status"] == "completed"
    assert summary["counts"]["proposed"] == 10
    assert summary["counts"]["results"] == {"ok": 8, "crash": 2}
    assert summary["llm"]["usd"] == pytest.approx(0.09)


def test_results_tsv_agrees_with_variants(conn: sqlite3.Connection) -> None:
    apply_all(conn, synthetic_campaign(variants=10, seed=5))
    tsv = results_tsv(conn, "synthetic")
    assert tsv is not None
    lines = tsv.splitlines()
    assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    variants = {v["variant_id"]: v for v in queries.list_variants(conn, "synthetic", limit=1000)}
    assert len(lines) == 1 + len(variants)
    assert lines[1].split("\t")[4] == "baseline" and lines[1].split("\t")[3] == "keep"
    for line in lines[1:]:
        commit, value, memory, status, title = line.split("\t")
        v = variants[commit]
        assert status == v["status"] and title == v["title"]
        if status == "crash":
            assert (value, memory) == ("0.000000", "0.0")
        else:
            assert value == f"{v['value']:.6f}" and memory == "2.0"
    assert sum(1 for line in lines if line.endswith("\tkeep\t") or "\tkeep\t" in line) >= 1


def test_list_variants_sort_filter_page(conn: sqlite3.Connection) -> None:
    apply_all(conn, synthetic_campaign(variants=10, seed=1))
    by_value = queries.list_variants(conn, "synthetic", limit=1000)
    values = [v["value"] for v in by_value if v["value"] is not None]
    assert values == sorted(values)
    assert by_value[-1]["value"] is None  # unmeasured (crashed) last
    desc = queries.list_variants(conn, "synthetic", sort="time", order="desc", limit=3)
    assert [v["proposed_at"] for v in desc] == sorted(
        [v["proposed_at"] for v in desc], reverse=True
    )
    page = queries.list_variants(conn, "synthetic", sort="time", limit=3, offset=3)
    assert len(page) == 3 and page[0]["wave"] >= 1
    assert {v["status"] for v in queries.list_variants(conn, "synthetic", status="crash")} == {
        "crash"
    }


def test_lineage_and_diff(conn: sqlite3.Connection) -> None:
    apply_all(conn, synthetic_campaign(variants=3))
    child = queries.list_variants(conn, "synthetic", sort="time")[2]
    chain = queries.lineage(conn, child["variant_id"])
    assert chain is not None
    assert [c["title"] for c in chain] == ["baseline", child["title"]]
    diff = queries.variant_diff(conn, child["variant_id"])
    assert diff is not None and "-LR = 0.04\n" in diff and "+LR = 0.042\n" in diff
    root = queries.variant_diff(conn, chain[0]["variant_id"])
    assert root is not None and root.startswith("--- /dev/null")
    assert queries.lineage(conn, "nope") is None


# --- attempts, infra, out of order ------------------------------------------------------


def _campaign(name: str = "c", direction: Direction = "minimize") -> Item:
    # keep_rule: these tests assert the single-run rule's decisions
    return (campaign_started(name, direction=direction, keep_rule="strict"), None, None)


def _proposal(i: int, name: str = "c") -> tuple[Item, str]:
    source = SEED_SOURCE + f"X = {i}\n"
    proposed = proposal_of(name, source, 2.0 + i, f"v{i}")
    return (proposed, source, None), proposed.variant_id


def _result(
    vid: str,
    status: Status,
    value: float | None,
    replica: int = 0,
    attempt: int = 1,
    ts: float = 10.0,
) -> list[Item]:
    """A run of `vid` as the launcher and evaluator report it: started, finished, result."""
    return synthetic_run("c", vid, status, value, ts - 2, replica=replica, attempt=attempt)


def test_later_attempt_replaces_result_and_infra_is_no_verdict(conn: sqlite3.Connection) -> None:
    (prop, vid) = _proposal(0)
    apply_all(conn, [_campaign(), prop, _result(vid, "infra", None)])
    assert queries.variant(conn, vid)["status"] == "pending"  # type: ignore[index]
    tsv = results_tsv(conn, "c") or ""
    assert len(tsv.splitlines()) == 1  # not a crash: its run is tried again
    out = apply_all(conn, [_result(vid, "ok", 1.0, attempt=2)])
    assert [e.variant_id for e in bests(out)] == [vid]
    rows = conn.execute("SELECT attempt, status FROM results").fetchall()
    assert [tuple(r) for r in rows] == [(2, "ok")]
    # a late message about attempt 1 changes nothing
    assert apply_all(conn, [_result(vid, "crash", None, attempt=1, ts=11.0)]) == []
    assert conn.execute("SELECT status FROM results").fetchone()[0] == "ok"
    assert queries.variant(conn, vid)["status"] == "keep"  # type: ignore[index]


def test_a_variant_whose_attempts_all_failed_on_infrastructure_is_a_crash(
    conn: sqlite3.Connection,
) -> None:
    (prop, vid) = _proposal(0)
    apply_all(conn, [_campaign(), prop, _result(vid, "infra", None, attempt=MAX_RUN_ATTEMPTS)])
    tsv = results_tsv(conn, "c") or ""
    assert tsv.splitlines()[1].split("\t")[3] == "crash"


def test_crash_then_replicate_mean_and_ties(conn: sqlite3.Connection) -> None:
    (p0, v0), (p1, v1), (p2, v2) = (_proposal(i) for i in range(3))
    out = apply_all(
        conn,
        [
            _campaign(),
            p0,
            p1,
            p2,
            _result(v0, "ok", 1.0),
            _result(v1, "oom", None),
            _result(v2, "ok", 1.0),
        ],
    )
    assert len(bests(out)) == 1
    statuses = {v["variant_id"]: v["status"] for v in queries.list_variants(conn, "c")}
    assert statuses == {v0: "keep", v1: "crash", v2: "discard"}  # a tie is not kept
    # a replicate of the best refines its mean without a new BestUpdated
    assert apply_all(conn, [_result(v0, "ok", 1.02, replica=1)]) == []
    assert queries.best(conn, "c")["value"] == pytest.approx(1.01)  # type: ignore[index]
    # v1 crashed once, then an ok replicate beats the best's mean
    out = bests(apply_all(conn, [_result(v1, "ok", 1.005, replica=1)]))
    assert [e.previous_variant_id for e in out] == [v0]
    assert out[0].previous_value == pytest.approx(1.01)
    history = queries.best_history(conn, "c")
    assert [h["variant_id"] for h in history] == [v0, v1]


def test_maximize_campaign(conn: sqlite3.Connection) -> None:
    (p0, v0), (p1, v1) = (_proposal(i) for i in range(2))
    apply_all(
        conn,
        [_campaign(direction="maximize"), p0, p1, _result(v0, "ok", 0.5), _result(v1, "ok", 0.7)],
    )
    assert queries.best(conn, "c")["variant_id"] == v1  # type: ignore[index]


def test_a_result_before_its_proposal_waits_instead_of_a_placeholder(
    conn: sqlite3.Connection,
) -> None:
    (prop, vid) = _proposal(0)
    run_id = run_id_for(vid, "default", 0)
    started, finished, result = _result(vid, "ok", 1.0)
    for early in (result, started, finished):  # before the campaign and the proposal
        with pytest.raises(Unreferenced, match="never proposed") as raised:
            apply_all(conn, [early])
        assert not raised.value.definitive  # the service decides: wait, or dead-letter
    assert queries.variant(conn, vid) is None and queries.run(conn, run_id) is None
    with pytest.raises(Unreferenced, match="no launcher started"):
        apply_all(conn, [_campaign(), prop, result])  # proposed, but the run never started
    with pytest.raises(Unreferenced, match="no launcher reported finished"):
        apply_all(conn, [started, result])
    request = RunRequested(
        campaign="c",
        event_id="rr",
        ts=3.0,
        run_id=run_id,
        variant_id=vid,
        source_digest="d",
        tier="default",
        replica=0,
        reason="replicate",
    )
    apply_all(conn, [(request, None, None), finished, result])
    found = queries.variant(conn, vid)
    assert found is not None and found["title"] == "v0" and found["status"] == "keep"
    assert queries.variant_source(conn, vid) is not None
    assert queries.run(conn, run_id)["request_reason"] == "replicate"  # type: ignore[index]
    assert queries.campaign(conn, "c")["config"]["direction"] == "minimize"  # type: ignore[index]


def test_a_result_naming_another_variants_run_is_refused_at_once(conn: sqlite3.Connection) -> None:
    (p0, v0), (p1, v1) = (_proposal(i) for i in range(2))
    apply_all(conn, [_campaign(), p0, p1, _result(v0, "ok", 1.0)])
    forged = ResultEvaluated(
        campaign="c",
        event_id="forged",
        run_id=run_id_for(v0, "default", 0),
        variant_id=v1,
        tier="default",
        status="ok",
        value=0.0001,
    )
    with pytest.raises(Unreferenced, match="launcher ran it for variant") as raised:
        apply_all(conn, [(forged, None, None)])
    assert raised.value.definitive
    assert queries.best(conn, "c")["variant_id"] == v0  # type: ignore[index]


def test_dead_letters_recorded(conn: sqlite3.Connection) -> None:
    dead = DeadLettered(
        campaign="c",
        event_id="dead:ledger:7",
        subject_name="ns.run.finished",
        stream_seq=7,
        consumer="ledger",
        error="boom",
    )
    apply_all(conn, [_campaign(), (dead, None, None), (dead, None, None)])
    assert [d["stream_seq"] for d in queries.dead_letters(conn, "c")] == [7]
    assert queries.campaign_summary(conn, "c")["counts"]["dead_letters"] == 1  # type: ignore[index]


def test_long_campaign_projects_every_event(tmp_path: Path) -> None:
    """A fleet-sized history applies completely (its speed is `nightshift bench fleet`'s
    events_per_s, a benchmark figure, not a test)."""
    conn = open_db(tmp_path / "long.db")
    items = synthetic_campaign(variants=400, stop=False)
    apply_all(conn, items)
    assert queries.events_applied(conn) == len(items)
    summary = queries.campaign_summary(conn, "synthetic")
    assert summary is not None and summary["counts"]["proposed"] == 400


def test_restarted_campaign_runs_again_but_a_late_start_does_not_reopen(
    conn: sqlite3.Connection,
) -> None:
    stop = CampaignStopped(campaign="c", event_id="stop-1", ts=5.0, reason="stopped")
    apply_all(conn, [(stop, None, None), _campaign()])  # the start (ts 1) arrives late
    assert queries.campaign(conn, "c")["status"] == "stopped"  # type: ignore[index]
    restart = campaign_started(event_id="cs-2", ts=9.0)
    apply_all(conn, [(restart, None, None)])
    found = queries.campaign(conn, "c")
    assert found is not None and found["status"] == "running" and found["stop_reason"] is None
    assert found["started_at"] == 1.0


# --- a jump past the best must be confirmed ----------------------------------------------


def _jump_campaign() -> Item:
    started = campaign_started(
        event_id="cs-jump", confirm_jump=0.1, keep_rule="strict", noise_runs=1
    )
    return (started, None, None)


def published(out: list[Any]) -> list[Any]:
    """The new bests and the runs a decision asks for (not its records: VariantDecided,
    NoiseMeasured)."""
    return [e for e in out if type(e).__name__ in ("BestUpdated", "RunRequested")]


def test_an_improbable_jump_is_kept_only_once_a_replicate_agrees(conn: sqlite3.Connection) -> None:
    (p0, v0), (p1, v1), (p2, v2) = (_proposal(i) for i in range(3))
    apply_all(conn, [_jump_campaign(), p0, p1, p2, _result(v0, "ok", 1.0)])
    # 0.5 is 50% past the best: not kept yet, a replicate is requested (once)
    out = published(apply_all(conn, [_result(v1, "ok", 0.5, ts=20.0)]))
    assert [type(e).__name__ for e in out] == ["RunRequested"]
    request = out[0]
    assert isinstance(request, RunRequested)
    assert (request.variant_id, request.replica) == (v1, 1) and "confirm" in request.reason
    assert queries.best(conn, "c")["variant_id"] == v0  # type: ignore[index]
    assert queries.variant(conn, v1)["status"] == "pending"  # type: ignore[index]
    apply_all(conn, [(request, None, None)])
    # the replicate disagrees (no better than the best): discarded, the best stays
    assert published(apply_all(conn, [_result(v1, "ok", 1.01, replica=1, ts=30.0)])) == []
    assert queries.variant(conn, v1)["status"] == "discard"  # type: ignore[index]
    assert queries.best(conn, "c")["variant_id"] == v0  # type: ignore[index]
    # another jump whose replicate agrees becomes the best
    [request2] = published(apply_all(conn, [_result(v2, "ok", 0.6, ts=40.0)]))
    apply_all(conn, [(request2, None, None)])
    out = published(apply_all(conn, [_result(v2, "ok", 0.62, replica=1, ts=50.0)]))
    assert [type(e).__name__ for e in out] == ["BestUpdated"]
    assert queries.best(conn, "c")["value"] == pytest.approx(0.61)  # type: ignore[index]


def test_a_small_step_needs_no_replicate(conn: sqlite3.Connection) -> None:
    (p0, v0), (p1, v1) = (_proposal(i) for i in range(2))
    out = apply_all(
        conn, [_jump_campaign(), p0, p1, _result(v0, "ok", 1.0), _result(v1, "ok", 0.95)]
    )
    assert [type(e).__name__ for e in published(out)] == ["BestUpdated", "BestUpdated"]
