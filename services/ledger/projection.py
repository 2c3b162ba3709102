"""Apply events to the ledger, one transaction each (or one per batch); return what to publish.

`apply_event` is idempotent: an event id is applied once, and applying it again changes
nothing and returns the same outbox (stored with the event), so a redelivery after a crash
between commit and publish republishes the same BestUpdated (whose deterministic id lets
JetStream drop the duplicate).

What an event does to the tables is the one function of `services.ledger.apply` for its
type (like optuna's journal replay, one apply function per operation). `_apply` dispatches
on the event's type to it: `functools.singledispatch` registers each function under the
type annotated on its first parameter, so a function cannot be filed under a type it does
not take.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from services.contracts import AnyEvent, BestUpdated, Event, NoiseMeasured, VariantDecided
from services.ledger import apply
from services.ledger.verdict import Outbox, event_key

_outbox_decoder: msgspec.json.Decoder[list[AnyEvent]] = msgspec.json.Decoder(list[AnyEvent])

_apply = functools.singledispatch(apply.record_only)
for _function in (
    apply.campaign_started,
    apply.campaign_stopped,
    apply.proposer_halted,
    apply.dead_lettered,
    apply.variant_proposed,
    apply.run_requested,
    apply.run_started,
    apply.run_finished,
    apply.result_evaluated,
):
    _apply.register(_function)
# The ledger is the one that publishes these: recorded when they come back, nothing more.
for _own in (BestUpdated, VariantDecided, NoiseMeasured):
    _apply.register(_own, apply.record_only)


def projected_types() -> frozenset[type[Event]]:
    """The event types with an apply function of their own (every stored type)."""
    return frozenset(t for t in _apply.registry if issubclass(t, Event) and t is not Event)


def seen(conn: sqlite3.Connection, event: Event) -> bool:
    """Has this event already been applied? (Lets the service skip fetching its objects.)"""
    row = conn.execute("SELECT 1 FROM events_seen WHERE event_id = ?", (event_key(event),))
    return row.fetchone() is not None


def apply_event(
    conn: sqlite3.Connection,
    event: Event,
    *,
    source_text: str | None = None,
    log_text: str | None = None,
) -> Outbox:
    """Apply `event` in one transaction; return the events to publish (its outbox).

    `source_text` is the source named by a VariantProposed, `log_text` the full log of a
    RunFinished (both fetched from the object stores by the caller, outside the transaction).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        outbox = _apply_once(conn, event, source_text, log_text)
        conn.execute("COMMIT")
    except BaseException:  # whatever interrupted the transaction (SQLite, cancellation)
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return outbox


@dataclass(frozen=True)
class Pending:
    """One event of a batch, with the objects it names (fetched by the caller)."""

    event: Event
    source_text: str | None = None
    log_text: str | None = None


def apply_events(conn: sqlite3.Connection, batch: Sequence[Pending]) -> list[Outbox | Exception]:
    """Apply a batch in order in one transaction: per event, its outbox, or the exception
    that refused it (Unreferenced, or any failure), in which case nothing of that event
    was applied (a savepoint per event) and the others are.

    The same as `apply_event` on each in turn (each event id applied once; a repeat, in
    this batch or an earlier one, returns its stored outbox) at the cost of one commit.
    """
    results: list[Outbox | Exception] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for item in batch:
            conn.execute("SAVEPOINT one_event")
            try:
                outbox = _apply_once(conn, item.event, item.source_text, item.log_text)
            except Exception as exc:
                conn.execute("ROLLBACK TO one_event")
                results.append(exc)
            else:
                results.append(outbox)
            conn.execute("RELEASE one_event")
        conn.execute("COMMIT")
    except BaseException:  # SQLite itself, or cancellation: nothing of the batch applied
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return results


def _apply_once(
    conn: sqlite3.Connection, event: Event, source_text: str | None, log_text: str | None
) -> Outbox:
    """Inside a transaction: apply `event` unless its id was applied (then its outbox)."""
    key = event_key(event)
    row = conn.execute("SELECT outbox FROM events_seen WHERE event_id = ?", (key,)).fetchone()
    if row is not None:
        return list(_outbox_decoder.decode(row["outbox"]))
    cur = conn.execute(
        "INSERT INTO events_seen(event_id, type, campaign, ts) VALUES (?, ?, ?, ?)",
        (key, type(event).__name__, event.campaign, event.ts),
    )
    ctx = apply.Ctx(conn, cur.lastrowid or 0, source_text, log_text)
    outbox = _apply(event, ctx)
    if outbox:
        conn.execute(
            "UPDATE events_seen SET outbox = ? WHERE event_id = ?",
            (msgspec.json.encode(outbox).decode(), key),
        )
    return outbox
