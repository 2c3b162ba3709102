"""Keep decisions in the ledger: after a result, update the variant's verdict and the best.

The rule itself (strict, later noise-aware) is a pure function in `keep.py`; this module
reads the runs it needs and writes the outcome.
"""

from __future__ import annotations

import hashlib
import sqlite3

from services import contracts
from services.contracts import BestUpdated, Event, ResultEvaluated, RunRequested
from services.ledger import keep

# What a decision publishes: a new best, or a replicate run of a result to be confirmed.
Published = BestUpdated | RunRequested


def event_key(event: Event) -> str:
    """The event's id, or a content hash for an event published without one."""
    if event.event_id:
        return event.event_id
    return "sha256:" + hashlib.sha256(contracts.encode(event)).hexdigest()


def _ok_values(conn: sqlite3.Connection, variant_id: str) -> list[float]:
    rows = conn.execute(
        "SELECT value FROM results WHERE variant_id = ? AND status = 'ok' AND value IS NOT NULL "
        "ORDER BY seq",
        (variant_id,),
    )
    return [float(r["value"]) for r in rows]


def decide(conn: sqlite3.Connection, ev: ResultEvaluated) -> list[Published]:
    """Update the variant's verdict after a result; return a BestUpdated when it is kept."""
    camp = conn.execute(
        "SELECT direction, keep_rule, best_variant_id, best_value, config FROM campaigns "
        "WHERE name = ?",
        (ev.campaign,),
    ).fetchone()
    var = conn.execute(
        "SELECT status, source_digest FROM variants WHERE variant_id = ?", (ev.variant_id,)
    ).fetchone()
    ok = _ok_values(conn, ev.variant_id)
    value = keep.mean(ok) if ok else None
    conn.execute(
        "UPDATE variants SET value = ?, ok_runs = ? WHERE variant_id = ?",
        (value, len(ok), ev.variant_id),
    )
    if camp["best_variant_id"] == ev.variant_id:
        if value is not None:  # a replicate of the best refines its mean
            conn.execute(
                "UPDATE campaigns SET best_value = ?, best_runs = ? WHERE name = ?",
                (value, len(ok), ev.campaign),
            )
        return []
    rule_name, rule = keep.rule_for(camp["keep_rule"])
    if not ok:
        statuses = [
            r["status"]
            for r in conn.execute(
                "SELECT status FROM results WHERE variant_id = ?", (ev.variant_id,)
            )
        ]
        if keep.failure_status(statuses) and var["status"] == "pending":
            _set_status(conn, ev, "crash", None, 0, rule_name, camp)
        return []
    best_id = camp["best_variant_id"]
    best_ok = _ok_values(conn, best_id) if best_id else None
    decision = rule(ok, best_ok, camp["direction"])
    if decision == "keep" and best_ok and _jumps(camp, keep.mean(ok)):
        if len(ok) < 2:  # improbably far past the best: a replicate must agree first
            return _request_replicate(conn, ev, camp)
        if not all(rule([v], best_ok, camp["direction"]) == "keep" for v in ok):
            decision = "discard"  # the replicate did not agree
    if decision == "undecided":
        return []
    if decision == "discard":
        if var["status"] != "keep":  # a variant once kept stays `keep` in the history
            _set_status(conn, ev, "discard", value, len(ok), rule_name, camp)
        return []
    return [_keep(conn, ev, ok, rule_name, camp, var["source_digest"] or "")]


def _jumps(camp: sqlite3.Row, value: float) -> bool:
    """Is `value` better than the best by more than the campaign's `confirm_jump` share?"""
    share = _confirm_jump(camp["config"])
    if share <= 0 or camp["best_value"] is None:
        return False
    best = float(camp["best_value"])
    return abs(value - best) > share * abs(best)


def _confirm_jump(config: str | None) -> float:
    if not config:
        return 0.0
    try:
        started = contracts.decode(config.encode())
    except contracts.ContractError:
        return 0.0
    return started.confirm_jump if isinstance(started, contracts.CampaignStarted) else 0.0


def _request_replicate(
    conn: sqlite3.Connection, ev: ResultEvaluated, camp: sqlite3.Row
) -> list[Published]:
    """Ask the launchers for one more run of the variant (once); it stays pending meanwhile."""
    row = conn.execute(
        "SELECT MAX(replica) AS top, COUNT(*) AS n FROM runs WHERE variant_id = ?", (ev.variant_id,)
    ).fetchone()
    if int(row["n"]) > 1:
        return []  # a replicate is already asked for or running
    var = conn.execute(
        "SELECT source_digest FROM variants WHERE variant_id = ?", (ev.variant_id,)
    ).fetchone()
    replica = int(row["top"] or 0) + 1
    run_id = contracts.run_id_for(ev.variant_id, ev.tier, replica)
    return [
        RunRequested(
            campaign=ev.campaign,
            event_id=contracts.event_id_for("requested", ev.campaign, run_id),
            ts=ev.ts,
            run_id=run_id,
            variant_id=ev.variant_id,
            source_digest=var["source_digest"] or "",
            tier=ev.tier,
            replica=replica,
            reason=(
                f"confirm: {ev.value!r} is improbably far past the best {camp['best_value']!r} "
                f"(more than confirm_jump of it); kept only if this replicate agrees"
            ),
        )
    ]


def _keep(
    conn: sqlite3.Connection,
    ev: ResultEvaluated,
    ok: list[float],
    rule: str,
    camp: sqlite3.Row,
    source_digest: str,
) -> BestUpdated:
    """Make the variant the campaign's best; the BestUpdated to publish."""
    value, best_id = keep.mean(ok), camp["best_variant_id"]
    _set_status(conn, ev, "keep", value, len(ok), rule, camp)
    conn.execute(
        "UPDATE campaigns SET best_variant_id = ?, best_value = ?, best_runs = ? WHERE name = ?",
        (ev.variant_id, value, len(ok), ev.campaign),
    )
    conn.execute(
        "INSERT INTO best_history(campaign, variant_id, value, previous_variant_id, "
        "previous_value, ts) VALUES (?, ?, ?, ?, ?, ?)",
        (ev.campaign, ev.variant_id, value, best_id, camp["best_value"], ev.ts),
    )
    return BestUpdated(
        campaign=ev.campaign,
        event_id=contracts.event_id_for("best", ev.campaign, ev.variant_id),
        ts=ev.ts,
        variant_id=ev.variant_id,
        source_digest=source_digest,
        value=value,
        runs=len(ok),
        previous_variant_id=best_id,
        previous_value=camp["best_value"],
        rule=rule,
    )


def _set_status(
    conn: sqlite3.Connection,
    ev: ResultEvaluated,
    status: str,
    value: float | None,
    runs: int,
    rule: str,
    camp: sqlite3.Row,
) -> None:
    conn.execute(
        "UPDATE variants SET status = ?, decided_at = ? WHERE variant_id = ?",
        (status, ev.ts, ev.variant_id),
    )
    conn.execute(
        "INSERT OR REPLACE INTO keep_decisions(event_id, campaign, variant_id, run_id, status, "
        "value, runs, rule, best_before_variant_id, best_before_value, decided_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            event_key(ev),
            ev.campaign,
            ev.variant_id,
            ev.run_id,
            status,
            value,
            runs,
            rule,
            camp["best_variant_id"],
            camp["best_value"],
            ev.ts,
        ),
    )
