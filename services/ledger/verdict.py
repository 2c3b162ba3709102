"""Keep decisions in the ledger: after a result, measure the noise, judge, request replicates.

The rules are pure functions in `keep.py`; this module reads the values they need (the
variant's and the best's ok values on the result's tier, the tier's measured noise, the
campaign's policy) and writes the outcome. Every decision is a VariantDecided (with a
BestUpdated for a keep); an `undecided` one comes with the RunRequested of its replicates,
deterministic ids (`<variant>-<tier>-<replica>`) so a redelivered decision requests the
same runs. A keep (or a discard at the replicate cap) waits until every run already
requested of both sides is back, so the means it compares are the ones the rule asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3

import msgspec

from services import contracts
from services.contracts import (
    AnyEvent,
    BestUpdated,
    CampaignStarted,
    ContractError,
    Event,
    NoiseMeasured,
    ResultEvaluated,
    RunRequested,
    VariantDecided,
    VariantProposed,
)
from services.ledger import keep

Outbox = list[AnyEvent]


def event_key(event: Event) -> str:
    """The event's id, or a content hash for an event published without one."""
    if event.event_id:
        return event.event_id
    return "sha256:" + hashlib.sha256(contracts.encode(event)).hexdigest()


def _ok_values(conn: sqlite3.Connection, variant_id: str, tier: str | None = None) -> list[float]:
    rows = conn.execute(
        "SELECT value FROM results WHERE variant_id = ? AND status = 'ok' AND value IS NOT NULL "
        "AND (? IS NULL OR tier = ?) ORDER BY seq",
        (variant_id, tier, tier),
    )
    return [float(r["value"]) for r in rows]


def _config(camp: sqlite3.Row) -> CampaignStarted | None:
    if not camp["config"]:
        return None
    try:
        event = contracts.decode(camp["config"].encode())
    except ContractError:
        return None
    return event if isinstance(event, CampaignStarted) else None


def _policy(camp: sqlite3.Row) -> keep.Policy:
    cfg = _config(camp)
    if cfg is None:
        return keep.Policy()
    return keep.Policy(confidence=cfg.keep_confidence, max_runs=cfg.keep_max_runs)


def _campaign(conn: sqlite3.Connection, name: str) -> sqlite3.Row:
    row: sqlite3.Row = conn.execute(
        "SELECT name, config, direction, keep_rule, best_variant_id, best_value, best_runs "
        "FROM campaigns WHERE name = ?",
        (name,),
    ).fetchone()
    return row


def decide(conn: sqlite3.Connection, ev: ResultEvaluated) -> Outbox:
    """Update the variant after a result; the decisions, bests, noise and replicates to publish."""
    ok_all = _ok_values(conn, ev.variant_id)
    conn.execute(
        "UPDATE variants SET value = ?, ok_runs = ? WHERE variant_id = ?",
        (keep.mean(ok_all) if ok_all else None, len(ok_all), ev.variant_id),
    )
    out: Outbox = list(_measure_noise(conn, ev.campaign, ev.tier, ev.ts))
    camp = _campaign(conn, ev.campaign)
    if camp["best_variant_id"] == ev.variant_id:
        best_ok = _ok_values(conn, ev.variant_id, ev.tier)
        if best_ok:  # a replicate of the best refines its mean
            conn.execute(
                "UPDATE campaigns SET best_value = ?, best_runs = ? WHERE name = ?",
                (keep.mean(best_ok), len(best_ok), ev.campaign),
            )
        return out + _judge_waiting(conn, ev)
    if not _ok_values(conn, ev.variant_id, ev.tier):
        _record_failure(conn, ev, camp)
        return out
    found = _judge(conn, ev, ev.variant_id)
    if any(isinstance(e, BestUpdated) for e in found):
        found += _judge_waiting(conn, ev)
    return out + found


def _record_failure(conn: sqlite3.Connection, ev: ResultEvaluated, camp: sqlite3.Row) -> None:
    statuses = [
        r["status"]
        for r in conn.execute("SELECT status FROM results WHERE variant_id = ?", (ev.variant_id,))
    ]
    var = conn.execute("SELECT status FROM variants WHERE variant_id = ?", (ev.variant_id,))
    if keep.failure_status(statuses) and var.fetchone()["status"] == "pending":
        conn.execute(
            "UPDATE variants SET status = 'crash', verdict = 'crash', decided_at = ? "
            "WHERE variant_id = ?",
            (ev.ts, ev.variant_id),
        )
        conn.execute(
            "INSERT OR REPLACE INTO keep_decisions(event_id, campaign, variant_id, run_id, "
            "status, value, runs, rule, best_before_variant_id, best_before_value, tier, "
            "decided_at) VALUES (?, ?, ?, ?, 'crash', NULL, 0, ?, ?, ?, ?, ?)",
            (
                event_key(ev),
                ev.campaign,
                ev.variant_id,
                ev.run_id,
                keep.rule_for(camp["keep_rule"])[0],
                camp["best_variant_id"],
                camp["best_value"],
                ev.tier,
                ev.ts,
            ),
        )


def _judge_waiting(conn: sqlite3.Connection, ev: ResultEvaluated) -> Outbox:
    """Judge again the variants still undecided on the tier (the best changed or got a run)."""
    out: Outbox = []
    rows = conn.execute(
        "SELECT variant_id FROM variants WHERE campaign = ? AND verdict = 'undecided' "
        "AND status = 'pending' ORDER BY evaluated_seq",
        (ev.campaign,),
    ).fetchall()
    for row in rows:
        if row["variant_id"] != _campaign(conn, ev.campaign)["best_variant_id"]:
            out += _judge(conn, ev, row["variant_id"])
    return out


def _judge(conn: sqlite3.Connection, ev: ResultEvaluated, variant_id: str) -> Outbox:
    """Apply the campaign's rule to one variant on the result's tier."""
    camp = _campaign(conn, ev.campaign)
    _, rule = keep.rule_for(camp["keep_rule"])
    best_id = camp["best_variant_id"]
    noise, dof = _noise(conn, ev.campaign, ev.tier)
    evidence = keep.Evidence(
        candidate=_ok_values(conn, variant_id, ev.tier),
        best=_ok_values(conn, best_id, ev.tier) if best_id else None,
        direction=camp["direction"],
        noise=noise,
        policy=_policy(camp),
        noise_dof=dof,
    )
    verdict = rule(evidence)
    sides = [v for v in (variant_id, best_id) if v]
    if verdict.wait_for_runs and _outstanding(conn, sides, ev.tier):
        return []  # requested runs are still out: decide on the means the rule asked for
    requests: list[RunRequested] = []
    if verdict.decision == "undecided":
        requests = _replicates(conn, camp, variant_id, ev.tier, verdict.want_candidate, ev.ts)
        if best_id:
            requests += _replicates(conn, camp, best_id, ev.tier, verdict.want_best, ev.ts)
        if not requests and verdict.want_candidate:
            if _outstanding(conn, sides, ev.tier) or verdict.n_candidate == 0:
                return []  # waiting for the replicates already requested
            verdict = _give_up(verdict)  # replicates that keep failing: no more evidence
    decided = _decided_event(ev, variant_id, best_id, verdict, len(requests))
    _record(conn, ev, decided)
    out: Outbox = [decided, *requests]
    if verdict.decision == "keep":
        out.append(_keep(conn, ev, variant_id, verdict, camp))
    return out


def _give_up(verdict: keep.Verdict) -> keep.Verdict:
    return dataclasses.replace(
        verdict,
        decision="discard",
        reason="replicates failed: no further evidence",
        want_candidate=0,
        want_best=0,
    )


def _decided_event(
    ev: ResultEvaluated, variant_id: str, best_id: str | None, v: keep.Verdict, requested: int
) -> VariantDecided:
    return VariantDecided(
        campaign=ev.campaign,
        event_id=contracts.event_id_for(
            "decided", ev.campaign, variant_id, ev.tier, v.decision, v.n_candidate, v.n_best
        ),
        ts=ev.ts,
        variant_id=variant_id,
        decision=v.decision,
        rule=v.rule,
        tier=ev.tier,
        reason=v.reason,
        n_candidate=v.n_candidate,
        n_best=v.n_best,
        mean_candidate=v.mean_candidate,
        mean_best=v.mean_best,
        best_variant_id=best_id,
        noise=v.noise,
        margin=v.margin,
        replicates_requested=requested,
    )


def _record(conn: sqlite3.Connection, ev: ResultEvaluated, d: VariantDecided) -> None:
    """The decision in keep_decisions, and on the variant (`keep` stays `keep` in history)."""
    conn.execute(
        "UPDATE variants SET verdict = :decision, "
        "status = CASE WHEN :decision = 'undecided' OR status = 'keep' THEN status "
        "ELSE :decision END, decided_at = :ts WHERE variant_id = :variant_id",
        {"decision": d.decision, "ts": d.ts, "variant_id": d.variant_id},
    )
    conn.execute(
        "INSERT OR REPLACE INTO keep_decisions(event_id, campaign, variant_id, run_id, status, "
        "value, runs, rule, best_before_variant_id, best_before_value, best_before_runs, tier, "
        "noise, margin, reason, replicates_requested, decided_at) VALUES (:event_id, "
        ":campaign, :variant_id, :run_id, :decision, :mean_candidate, :n_candidate, :rule, "
        ":best_variant_id, :mean_best, :n_best, :tier, :noise, :margin, :reason, "
        ":replicates_requested, :ts)",
        msgspec.structs.asdict(d) | {"run_id": ev.run_id},
    )


def _keep(
    conn: sqlite3.Connection,
    ev: ResultEvaluated,
    variant_id: str,
    v: keep.Verdict,
    camp: sqlite3.Row,
) -> BestUpdated:
    """Make the variant the campaign's best; the BestUpdated to publish."""
    value, best_id = v.mean_candidate or 0.0, camp["best_variant_id"]
    conn.execute(
        "UPDATE campaigns SET best_variant_id = ?, best_value = ?, best_runs = ? WHERE name = ?",
        (variant_id, value, v.n_candidate, ev.campaign),
    )
    conn.execute(
        "INSERT INTO best_history(campaign, variant_id, value, previous_variant_id, "
        "previous_value, ts) VALUES (?, ?, ?, ?, ?, ?)",
        (ev.campaign, variant_id, value, best_id, camp["best_value"], ev.ts),
    )
    digest = conn.execute(
        "SELECT source_digest FROM variants WHERE variant_id = ?", (variant_id,)
    ).fetchone()["source_digest"]
    return BestUpdated(
        campaign=ev.campaign,
        event_id=contracts.event_id_for("best", ev.campaign, variant_id),
        ts=ev.ts,
        variant_id=variant_id,
        source_digest=digest or "",
        value=value,
        runs=v.n_candidate,
        previous_variant_id=best_id,
        previous_value=v.mean_best if best_id else None,
        previous_runs=v.n_best,
        rule=v.rule,
        tier=ev.tier,
        noise=v.noise,
        margin=v.margin,
    )


# --- replicates -----------------------------------------------------------------------


def _outstanding(conn: sqlite3.Connection, variant_ids: list[str], tier: str) -> int:
    """Runs of these variants on the tier requested but without a result yet."""
    marks = ",".join("?" * len(variant_ids))
    row = conn.execute(
        f"SELECT COUNT(*) FROM runs r LEFT JOIN results x ON x.run_id = r.run_id "
        f"WHERE r.variant_id IN ({marks}) AND r.tier = ? AND x.run_id IS NULL",
        (*variant_ids, tier),
    ).fetchone()
    return int(row[0])


def _replicates(
    conn: sqlite3.Connection, camp: sqlite3.Row, variant_id: str, tier: str, want: int, ts: float
) -> list[RunRequested]:
    """RunRequested for the runs that bring the variant to `want` ok runs on the tier,
    counting the ones already out; none beyond twice the cap of runs (failing replicates)."""
    ok = len(_ok_values(conn, variant_id, tier))
    out = _outstanding(conn, [variant_id], tier)
    row = conn.execute(
        "SELECT COUNT(*) AS n, COALESCE(MAX(replica), -1) AS top FROM runs "
        "WHERE variant_id = ? AND tier = ?",
        (variant_id, tier),
    ).fetchone()
    room = 2 * _policy(camp).max_runs - int(row["n"])
    need = min(want - ok - out, room)
    return request_runs(conn, camp["name"], variant_id, tier, int(row["top"]) + 1, need, ts)


def request_runs(
    conn: sqlite3.Connection,
    campaign: str,
    variant_id: str,
    tier: str,
    first: int,
    count: int,
    ts: float,
    reason: str = "replicate: a close call",
) -> list[RunRequested]:
    """Replicas first..first+count-1 of a variant: their rows (requested) and events."""
    var = conn.execute(
        "SELECT source_digest FROM variants WHERE variant_id = ?", (variant_id,)
    ).fetchone()
    if var is None or not var["source_digest"] or count <= 0:
        return []
    found: list[RunRequested] = []
    for replica in range(first, first + count):
        run_id = contracts.run_id_for(variant_id, tier, replica)
        conn.execute(
            "INSERT OR IGNORE INTO runs(run_id, campaign, variant_id, tier, replica, "
            "requested_at, request_reason) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (run_id, campaign, variant_id, tier, replica, ts, reason),
        )
        found.append(
            RunRequested(
                campaign=campaign,
                event_id=contracts.event_id_for("requested", campaign, run_id),
                ts=ts,
                run_id=run_id,
                variant_id=variant_id,
                source_digest=var["source_digest"],
                tier=tier,
                replica=replica,
                reason=reason,
            )
        )
    return found


def seed_replicates(conn: sqlite3.Connection, ev: VariantProposed) -> Outbox:
    """The seed runs noise_runs times at the start: replicas 1.. next to the launcher's 0."""
    if ev.proposer != "seed":
        return []
    camp = _campaign(conn, ev.campaign)
    cfg = _config(camp) if camp is not None else None
    if cfg is None or cfg.noise_runs <= 1:
        return []
    tier = (cfg.tiers or ["default"])[0]
    reason = f"noise: the seed runs {cfg.noise_runs} times to measure the run-to-run spread"
    found = request_runs(
        conn, ev.campaign, ev.variant_id, tier, 1, cfg.noise_runs - 1, ev.ts, reason
    )
    return list(found)


# --- noise ----------------------------------------------------------------------------


def _noise(conn: sqlite3.Connection, campaign: str, tier: str) -> tuple[float | None, int]:
    """The tier's measured noise and its degrees of freedom ((None, 0): not measured yet)."""
    row = conn.execute(
        "SELECT noise, dof FROM noise WHERE campaign = ? AND tier = ?", (campaign, tier)
    ).fetchone()
    return (float(row["noise"]), int(row["dof"])) if row is not None else (None, 0)


def _measure_noise(
    conn: sqlite3.Connection, campaign: str, tier: str, ts: float
) -> list[NoiseMeasured]:
    """Pool the spread of every variant run more than once on the tier; an event when it moved."""
    rows = conn.execute(
        "SELECT variant_id, value FROM results WHERE campaign = ? AND tier = ? AND status = 'ok' "
        "AND value IS NOT NULL AND variant_id IN (SELECT variant_id FROM results "
        "WHERE campaign = ? AND tier = ? AND status = 'ok' AND value IS NOT NULL "
        "GROUP BY variant_id HAVING COUNT(*) >= 2)",
        (campaign, tier, campaign, tier),
    ).fetchall()
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(r["variant_id"], []).append(float(r["value"]))
    noise, dof = keep.pooled_noise(list(groups.values()))
    previous = conn.execute(
        "SELECT dof FROM noise WHERE campaign = ? AND tier = ?", (campaign, tier)
    ).fetchone()
    if noise is None or (previous is not None and int(previous["dof"]) == dof):
        return []
    conn.execute(
        "INSERT OR REPLACE INTO noise(campaign, tier, noise, dof, variants, measured_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (campaign, tier, noise, dof, len(groups), ts),
    )
    return [
        NoiseMeasured(
            campaign=campaign,
            event_id=contracts.event_id_for("noise", campaign, tier, dof),
            ts=ts,
            tier=tier,
            noise=noise,
            dof=dof,
            variants=len(groups),
        )
    ]
