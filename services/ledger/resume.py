"""The runs a stopped campaign left undone, requested again when it is resumed.

A stop is no verdict on a variant. While a campaign is stopped its launchers skip its
queued work (acked: JetStream would otherwise redeliver it for ever) and report the runs
they cancel as set aside (an infrastructure failure: GPU time counted, nothing charged to
the variant). So when the campaign starts again the ledger, which has seen every proposal,
request and result, asks for each run still owed:

- a run requested or started that has no result, or only an infrastructure failure with
  attempts left (a replicate, a promotion, a set-aside run), unless a keep decision
  cancelled it (a replicate the decision made useless);
- replica 0 of a proposed variant no launcher ever started (its VariantProposed was skipped).

Each request carries the run's attempts so far (`attempt_base`), so the new attempt's events
have ids of their own, and an id of its own per restart, so a later stop and resume asks
again. A run that finished meanwhile is skipped by the launcher (its finished mark).
"""

from __future__ import annotations

import sqlite3

from services import contracts
from services.contracts import MAX_RUN_ATTEMPTS, CampaignStarted, RunRequested

RESUME_REASON = "resumed: left undone when the campaign stopped"


def was_stopped(conn: sqlite3.Connection, ev: CampaignStarted) -> bool:
    """Whether `ev` starts again a campaign the ledger saw stop before it."""
    row = conn.execute("SELECT stopped_at FROM campaigns WHERE name = ?", (ev.campaign,)).fetchone()
    return row is not None and row["stopped_at"] is not None and row["stopped_at"] <= ev.ts


def runs_left_undone(conn: sqlite3.Connection, ev: CampaignStarted) -> list[RunRequested]:
    """RunRequested for every run of the campaign still owed a result (see the module)."""
    first_tier = (ev.tiers or ["default"])[0]
    owed = conn.execute(
        """
        SELECT r.run_id, r.variant_id, r.tier, r.replica, r.attempt, v.source_digest
        FROM runs r JOIN variants v ON v.variant_id = r.variant_id
        LEFT JOIN results x ON x.run_id = r.run_id
        WHERE r.campaign = :campaign AND v.source_digest IS NOT NULL
          AND r.cancel_requested_at IS NULL
          AND (x.run_id IS NULL OR (x.status = 'infra' AND x.attempt < :max_attempts))
        UNION ALL
        SELECT NULL, v.variant_id, :tier, 0, 0, v.source_digest
        FROM variants v
        WHERE v.campaign = :campaign AND v.proposed_at IS NOT NULL
          AND v.source_digest IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.variant_id = v.variant_id
                          AND r.tier = :tier AND r.replica = 0)
          AND NOT EXISTS (SELECT 1 FROM results x WHERE x.variant_id = v.variant_id)
        ORDER BY 2, 4
        """,
        {"campaign": ev.campaign, "tier": first_tier, "max_attempts": MAX_RUN_ATTEMPTS},
    ).fetchall()
    conn.execute(  # the runs the stop cancelled before they started are requested again
        "UPDATE runs SET state = 'requested', cancel_reason = NULL WHERE campaign = ? "
        "AND state = 'cancelled' AND cancel_requested_at IS NULL",
        (ev.campaign,),
    )
    requests = []
    for row in owed:
        run_id = row["run_id"] or contracts.run_id_for(row["variant_id"], first_tier, 0)
        requests.append(
            RunRequested(
                campaign=ev.campaign,
                event_id=contracts.event_id_for("resumed", ev.campaign, run_id, ev.event_id),
                ts=ev.ts,
                run_id=run_id,
                variant_id=row["variant_id"],
                source_digest=row["source_digest"],
                tier=row["tier"],
                replica=int(row["replica"]),
                reason=RESUME_REASON,
                attempt_base=int(row["attempt"]),
            )
        )
    return requests
