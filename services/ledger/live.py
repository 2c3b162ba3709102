"""GET /campaigns/{name}/events: the live feed of a campaign, as server-sent events.

Each message's `id` is the ledger's position: the sequence number of the last event it
applied for the campaign. A client that reconnects sends the last id it saw
(`Last-Event-ID`, which browsers send by themselves) and gets everything after it: one
`result` message per result evaluated since (in order, each with its own position as id),
then an `update` with the campaign's overview. A first connection may say where it starts
with `?after=<position>` (the page passes the position it was drawn at); without either it
starts with an `update` of the present, as does an id beyond the ledger's position (a
ledger rebuilt from the stream numbers its events anew). A comment line every KEEPALIVE_S keeps proxies from
closing an idle stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from services.ledger.db import LedgerError, open_read
from services.ledger.overview import FleetWatch, found, overview, position
from services.ledger.params import CampaignName

POLL_S = 0.25
KEEPALIVE_S = 15.0
RETRY_MS = 2000

router = APIRouter(tags=["live"])


def message(event: str, data: Any, event_id: int | None = None) -> str:
    """One server-sent event (data on one line: JSON never holds a raw newline)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def results_after(conn: sqlite3.Connection, name: str, after: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT r.seq, r.run_id, r.variant_id, r.tier, r.replica, r.status, r.value, "
        "r.crash_reason, r.evaluated_at, v.title, v.status AS variant_status FROM results r "
        "LEFT JOIN variants v ON v.variant_id = r.variant_id "
        "WHERE r.campaign = ? AND r.seq > ? ORDER BY r.seq",
        (name, after),
    )
    return [dict(r) for r in rows]


def changes(
    db_path: Path, name: str, after: int | None, watch: FleetWatch | None
) -> tuple[int, list[str]]:
    """The messages that bring a client at position `after` (None: knows nothing) up to
    date, and the position they bring it to."""
    conn = open_read(db_path)
    try:
        now = position(conn, name)
        if after is not None and now < after:
            after = None  # a position this ledger never reached (it was rebuilt): start over
        if after is not None and now == after:
            return after, []
        out = [
            message("result", row, row["seq"])
            for row in (results_after(conn, name, after) if after is not None else [])
        ]
        view = overview(conn, name, watch)
        if view is not None:
            out.append(message("update", view.model_dump(), now))
        return now, out
    finally:
        conn.close()


def _campaign_known(db_path: Path, name: str) -> bool | None:
    try:
        conn = open_read(db_path)
    except LedgerError as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc
    try:
        row = conn.execute("SELECT 1 FROM campaigns WHERE name = ?", (name,)).fetchone()
        return True if row is not None else None
    finally:
        conn.close()


def _start(last_event_id: str | None, after: int | None) -> int | None:
    if last_event_id and last_event_id.strip().isdigit():
        return int(last_event_id.strip())
    return after


async def stream(request: Request, name: str, after: int | None) -> AsyncIterator[str]:
    app = request.app
    closing: asyncio.Event = app.state.closing
    yield f"retry: {RETRY_MS}\n\n"
    idle = 0.0
    while not closing.is_set():
        after, messages = await asyncio.to_thread(
            changes, app.state.db_path, name, after, app.state.fleet
        )
        for text in messages:
            yield text
        idle = 0.0 if messages else idle + POLL_S
        if idle >= KEEPALIVE_S:
            idle = 0.0
            yield ": keepalive\n\n"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), timeout=POLL_S)


# One server-sent event as a client parses it: `event` names the message, `data` is JSON text.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"type": "string", "enum": ["result", "update"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}


@router.get(
    "/campaigns/{name}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "a stream of `result` and `update` messages (server-sent events)",
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        },
        404: {"description": "unknown campaign"},
    },
)
async def events(
    name: CampaignName,
    request: Request,
    last_event_id: Annotated[str | None, Header(description="the last id received")] = None,
    after: Annotated[int | None, Query(ge=0, description="start after this position")] = None,
) -> StreamingResponse:
    """Server-sent events: `result` per evaluated result, `update` with the overview."""
    found(await asyncio.to_thread(_campaign_known, request.app.state.db_path, name), name)
    return StreamingResponse(
        stream(request, name, _start(last_event_id, after)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
