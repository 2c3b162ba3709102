"""What an event may reference: the ledger accepts only what happened.

A run or result event must name a variant proposed in its campaign, and a result (or a
run's end) a run a launcher started; `Unreferenced` says which and whether waiting can
help (services.ledger.apply and its service decide what to do with it).
"""

from __future__ import annotations

import sqlite3

from services.contracts import Event, ResultEvaluated, RunFinished
from services.ledger.verdict import event_key


class Unreferenced(Exception):
    """The event names a variant or run the ledger has not seen (yet).

    `definitive` when waiting cannot help (the run belongs to another variant or
    campaign); otherwise the service decides: every earlier message handled means the
    referenced event never happened (dead-letter it), else wait for it (redeliver).
    """

    def __init__(self, reason: str, *, definitive: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.definitive = definitive


def ensure_campaign(conn: sqlite3.Connection, name: str) -> None:
    conn.execute("INSERT OR IGNORE INTO campaigns(name) VALUES (?)", (name,))


def require_variant(conn: sqlite3.Connection, ev: Event, variant_id: str) -> None:
    """The variant was proposed in this campaign (its VariantProposed was applied)."""
    row = conn.execute(
        "SELECT campaign, proposed_at FROM variants WHERE variant_id = ?", (variant_id,)
    ).fetchone()
    what = f"{type(ev).__name__} {event_key(ev)}"
    if row is None or row["proposed_at"] is None:
        raise Unreferenced(
            f"{what} names variant {variant_id}, which was never proposed in campaign "
            f"{ev.campaign!r}"
        )
    if row["campaign"] != ev.campaign:
        raise Unreferenced(
            f"{what} names variant {variant_id} of campaign {row['campaign']!r}, not of "
            f"{ev.campaign!r}",
            definitive=True,
        )


def require_run(
    conn: sqlite3.Connection, ev: RunFinished | ResultEvaluated, *, finished: bool
) -> None:
    """The launcher started this run (RunStarted applied), for this variant and campaign;
    with `finished`, it also reported its end (RunFinished applied)."""
    row = conn.execute(
        "SELECT campaign, variant_id, attempt, finished_at FROM runs WHERE run_id = ?", (ev.run_id,)
    ).fetchone()
    what = f"{type(ev).__name__} {event_key(ev)}"
    if row is not None and (row["variant_id"], row["campaign"]) != (ev.variant_id, ev.campaign):
        raise Unreferenced(
            f"{what} names run {ev.run_id} as variant {ev.variant_id} of {ev.campaign!r}, but "
            f"the launcher ran it for variant {row['variant_id']} of {row['campaign']!r}",
            definitive=True,
        )
    if row is None or int(row["attempt"]) == 0:
        raise Unreferenced(f"{what} names run {ev.run_id}, which no launcher started")
    if finished and row["finished_at"] is None:
        raise Unreferenced(f"{what} names run {ev.run_id}, which no launcher reported finished")


def ensure_run(
    conn: sqlite3.Connection, campaign: str, variant_id: str, run_id: str, tier: str, replica: int
) -> int:
    """Make sure the run of a proposed variant exists; return its current attempt (0 for one
    not started yet)."""
    conn.execute(
        "INSERT OR IGNORE INTO runs(run_id, campaign, variant_id, tier, replica) "
        "VALUES (?, ?, ?, ?, ?)",
        (run_id, campaign, variant_id, tier, replica),
    )
    row = conn.execute("SELECT attempt FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    return int(row["attempt"])


# --- campaign events --------------------------------------------------------------------
