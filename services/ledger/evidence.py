"""What the keep rules read from the ledger, and the runs they ask for.

The values (a variant's ok values on a tier), the campaign's policy, the tier's measured
noise (pooled over every variant run more than once there; a NoiseMeasured when it moves),
the runs still out, and the RunRequested of replicates: deterministic run ids
(`<variant>-<tier>-<replica>`), so a redelivered decision requests the same runs.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from services import contracts
from services.contracts import (
    AnyEvent,
    CampaignStarted,
    ContractError,
    NoiseMeasured,
    RunCancel,
    RunRequested,
    VariantProposed,
)
from services.ledger import keep


def ok_values(conn: sqlite3.Connection, variant_id: str, tier: str | None = None) -> list[float]:
    rows = conn.execute(
        "SELECT value FROM results WHERE variant_id = ? AND status = 'ok' AND value IS NOT NULL "
        "AND (? IS NULL OR tier = ?) ORDER BY seq",
        (variant_id, tier, tier),
    )
    return [float(r["value"]) for r in rows]


def config(camp: sqlite3.Row) -> CampaignStarted | None:
    if not camp["config"]:
        return None
    try:
        event = contracts.decode(camp["config"].encode())
    except ContractError:
        return None
    return event if isinstance(event, CampaignStarted) else None


def policy(camp: sqlite3.Row) -> keep.Policy:
    cfg = config(camp)
    if cfg is None:
        return keep.Policy()
    return keep.Policy(confidence=cfg.keep_confidence, max_runs=cfg.keep_max_runs)


def campaign_row(conn: sqlite3.Connection, name: str) -> sqlite3.Row:
    row: sqlite3.Row = conn.execute(
        "SELECT name, config, direction, keep_rule, best_variant_id, best_value, best_runs "
        "FROM campaigns WHERE name = ?",
        (name,),
    ).fetchone()
    return row


def outstanding(conn: sqlite3.Connection, variant_ids: list[str], tier: str) -> int:
    """Runs of these variants on the tier requested but without a result yet (and not
    cancelled)."""
    return len(_out(conn, variant_ids, tier))


def _out(conn: sqlite3.Connection, variant_ids: list[str], tier: str | None) -> list[str]:
    marks = ",".join("?" * len(variant_ids))
    rows = conn.execute(
        f"SELECT r.run_id FROM runs r LEFT JOIN results x ON x.run_id = r.run_id "
        f"WHERE r.variant_id IN ({marks}) AND (? IS NULL OR r.tier = ?) AND x.run_id IS NULL "
        f"AND r.cancel_requested_at IS NULL ORDER BY r.run_id",
        (*variant_ids, tier, tier),
    )
    return [r["run_id"] for r in rows]


def cancel_useless(
    conn: sqlite3.Connection, campaign: str, sides: tuple[str, str | None], decision: str, ts: float
) -> list[RunCancel]:
    """A discard makes the runs still out of the variant useless, a keep those of the best
    it replaces (the new best's own runs refine its mean): they are cancelled, so no GPU
    time goes to them."""
    variant_id, best_id = sides
    if decision == "discard":
        useless = variant_id
    elif decision == "keep" and best_id:
        useless = best_id
    else:
        return []
    reason = f"{decision} of {variant_id[:8]}: no longer needed"
    return cancel_outstanding(conn, campaign, [useless], ts, reason)


def cancel_outstanding(
    conn: sqlite3.Connection, campaign: str, variant_ids: list[str], ts: float, reason: str
) -> list[RunCancel]:
    """Cancel the runs of these variants still out (on every tier): marked in `runs`, and
    a RunCancel each (the service also marks them in the campaigns KV, so a launcher that
    has not started one never does)."""
    found = _out(conn, variant_ids, None)
    for run_id in found:
        conn.execute(
            "UPDATE runs SET cancel_requested_at = ?, cancel_reason = ?, "
            "state = CASE WHEN state = 'requested' THEN 'cancelled' ELSE state END "
            "WHERE run_id = ?",
            (ts, reason, run_id),
        )
    return [
        RunCancel(**_run_keys("cancel", campaign, run_id, ts), reason=reason) for run_id in found
    ]


def cancel_requested(conn: sqlite3.Connection, run_id: str) -> bool:
    """Did the ledger cancel this run (its result, if one comes, decides nothing)?"""
    row = conn.execute(
        "SELECT cancel_requested_at FROM runs WHERE run_id = ?", (run_id,)
    ).fetchone()
    return row is not None and row["cancel_requested_at"] is not None


def replicates(
    conn: sqlite3.Connection,
    camp: sqlite3.Row,
    variant_id: str,
    tier: str,
    want: int,
    ts: float,
    reason: str = "replicate: a close call",
) -> list[RunRequested]:
    """RunRequested for the runs that bring the variant to `want` ok runs on the tier,
    counting the ones already out; none beyond twice the cap of runs (failing replicates)."""
    ok = len(ok_values(conn, variant_id, tier))
    out = outstanding(conn, [variant_id], tier)
    row = conn.execute(
        "SELECT COUNT(*) AS n, COALESCE(MAX(replica), -1) AS top FROM runs "
        "WHERE variant_id = ? AND tier = ?",
        (variant_id, tier),
    ).fetchone()
    room = 2 * policy(camp).max_runs - int(row["n"])
    need = min(want - ok - out, room)
    first = int(row["top"]) + 1
    return request_runs(conn, camp["name"], variant_id, tier, first, need, ts, reason)


def request_runs(
    conn: sqlite3.Connection,
    campaign: str,
    variant_id: str,
    tier: str,
    first: int,
    count: int,
    ts: float,
    reason: str,
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
                **_run_keys("requested", campaign, run_id, ts),
                variant_id=variant_id,
                source_digest=var["source_digest"],
                tier=tier,
                replica=replica,
                reason=reason,
            )
        )
    return found


def _run_keys(kind: str, campaign: str, run_id: str, ts: float) -> dict[str, Any]:
    """The keys of a `kind` event about one run the ledger asks for or cancels."""
    event_id = contracts.event_id_for(kind, campaign, run_id)
    return {"campaign": campaign, "event_id": event_id, "ts": ts, "run_id": run_id}


def seed_replicates(conn: sqlite3.Connection, ev: VariantProposed) -> list[AnyEvent]:
    """The seed runs noise_runs times on every tier at the start (on the first, replicas
    1.. next to the launcher's 0): the noise of each tier, and the best's values there."""
    if ev.proposer != "seed":
        return []
    camp = campaign_row(conn, ev.campaign)
    cfg = config(camp) if camp is not None else None
    if cfg is None:
        return []
    reason = f"noise: the seed runs {cfg.noise_runs} times to measure the run-to-run spread"
    found: list[AnyEvent] = []
    for k, tier in enumerate(cfg.tiers or ["default"]):
        first = 1 if k == 0 else 0
        count = cfg.noise_runs - first
        found += request_runs(conn, ev.campaign, ev.variant_id, tier, first, count, ev.ts, reason)
    return found


def tier_order(camp: sqlite3.Row, fallback: str) -> list[str]:
    """The campaign's tiers in promotion order (its config's; `[fallback]` without one)."""
    cfg = config(camp)
    return list(cfg.tiers) if cfg is not None and cfg.tiers else [fallback]


def top_tier(conn: sqlite3.Connection, variant_id: str, tiers: list[str]) -> str | None:
    """The highest tier (in promotion order) on which the variant has an ok value."""
    found = {
        r["tier"]
        for r in conn.execute(
            "SELECT DISTINCT tier FROM results WHERE variant_id = ? AND status = 'ok' "
            "AND value IS NOT NULL",
            (variant_id,),
        )
    }
    ranked = [t for t in tiers if t in found]
    return ranked[-1] if ranked else (next(iter(sorted(found))) if found else None)


# --- noise ----------------------------------------------------------------------------


def measured_noise(conn: sqlite3.Connection, campaign: str, tier: str) -> tuple[float | None, int]:
    """The tier's measured noise and its degrees of freedom ((None, 0): not measured yet)."""
    row = conn.execute(
        "SELECT noise, dof FROM noise WHERE campaign = ? AND tier = ?", (campaign, tier)
    ).fetchone()
    return (float(row["noise"]), int(row["dof"])) if row is not None else (None, 0)


def measure_noise(
    conn: sqlite3.Connection, campaign: str, tier: str, ts: float, variant_id: str = ""
) -> list[NoiseMeasured]:
    """Pool the spread of every variant run more than once on the tier; an event when it moved.

    After a result of `variant_id`: a variant with one run on the tier is in no group,
    before its result or after, so the pool cannot have moved (and is not scanned again:
    a scan of every result per result grew with the campaign).
    """
    if variant_id:
        runs = conn.execute(
            "SELECT COUNT(*) FROM results WHERE variant_id = ? AND tier = ?", (variant_id, tier)
        ).fetchone()[0]
        if runs < 2:
            return []
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
