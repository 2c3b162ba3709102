"""The ledger's HTTP API (FastAPI): campaigns, best train.py, variants, runs, logs, results.tsv.

Each request opens its own read connection (WAL lets it read while the service writes).
Unknown ids answer 404 with a detail naming what was not found; bad query parameters 422.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from pydantic import BaseModel

from services.ledger import queries
from services.ledger.dashboard import render_dashboard
from services.ledger.db import LedgerError, open_read

T = TypeVar("T")
VariantStatus = Literal["pending", "keep", "discard", "crash"]


def _connection(request: Request) -> Iterator[sqlite3.Connection]:
    try:
        conn = open_read(request.app.state.db_path)
    except LedgerError as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc
    try:
        yield conn
    finally:
        conn.close()


Conn = Annotated[sqlite3.Connection, Depends(_connection)]


def _found(value: T | None, detail: str) -> T:
    if value is None:
        raise HTTPException(status_code=404, detail=detail)
    return value


def _campaign(conn: sqlite3.Connection, name: str) -> dict[str, Any]:
    return _found(queries.campaign(conn, name), f"unknown campaign {name!r}")


def _text(body: str, media_type: str = "text/plain", filename: str | None = None) -> Response:
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'} if filename else None
    return PlainTextResponse(body, media_type=media_type, headers=headers)


router = APIRouter()


@router.get("/healthz")
def healthz(conn: Conn) -> dict[str, Any]:
    return {"ok": True, "events": queries.events_applied(conn)}


@router.get("/", response_class=HTMLResponse)
def dashboard(conn: Conn) -> HTMLResponse:
    return HTMLResponse(render_dashboard(conn))


# --- campaigns --------------------------------------------------------------------------


@router.get("/campaigns")
def campaigns(conn: Conn) -> list[dict[str, Any]]:
    return queries.list_campaigns(conn)


@router.get("/campaigns/{name}")
def campaign_summary(name: str, conn: Conn) -> dict[str, Any]:
    return _found(queries.campaign_summary(conn, name), f"unknown campaign {name!r}")


def _best(conn: sqlite3.Connection, name: str) -> dict[str, Any]:
    _campaign(conn, name)
    return _found(
        queries.best(conn, name),
        f"campaign {name!r} has no best variant yet: no variant has an ok result",
    )


@router.get("/campaigns/{name}/best")
def best(name: str, conn: Conn) -> dict[str, Any]:
    return _best(conn, name)


@router.get("/campaigns/{name}/best/train.py", response_class=PlainTextResponse)
@router.get("/campaigns/{name}/best/source", response_class=PlainTextResponse)
def best_source(name: str, conn: Conn) -> Response:
    found = _best(conn, name)
    source = _found(
        found.get("source"),
        f"the source of best variant {found['variant_id']} is not in the ledger "
        f"(digest {found.get('source_digest')} was missing from the object store)",
    )
    return _text(source, filename=str(found.get("edit_file") or "train.py"))


@router.get("/campaigns/{name}/variants")
def variants(
    name: str,
    conn: Conn,
    status: VariantStatus | None = None,
    sort: queries.VariantSort = "val_bpb",
    order: queries.SortOrder = "asc",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[dict[str, Any]]:
    _campaign(conn, name)
    return queries.list_variants(
        conn, name, status=status, sort=sort, order=order, limit=limit, offset=offset
    )


@router.get("/campaigns/{name}/results.tsv", response_class=PlainTextResponse)
def results_tsv(name: str, conn: Conn) -> Response:
    body = _found(queries.results_tsv(conn, name), f"unknown campaign {name!r}")
    return _text(body, "text/tab-separated-values", filename="results.tsv")


@router.get("/campaigns/{name}/deadletters")
def deadletters(name: str, conn: Conn) -> list[dict[str, Any]]:
    _campaign(conn, name)
    return queries.dead_letters(conn, name)


@router.get("/campaigns/{name}/history")
def best_history(name: str, conn: Conn) -> list[dict[str, Any]]:
    _campaign(conn, name)
    return queries.best_history(conn, name)


# --- variants and runs ------------------------------------------------------------------


@router.get("/variants/{variant_id}")
def variant(variant_id: str, conn: Conn) -> dict[str, Any]:
    return _found(queries.variant(conn, variant_id), f"unknown variant {variant_id!r}")


@router.get("/variants/{variant_id}/source", response_class=PlainTextResponse)
def variant_source(variant_id: str, conn: Conn) -> Response:
    _found(queries.variant(conn, variant_id), f"unknown variant {variant_id!r}")
    source = _found(
        queries.variant_source(conn, variant_id),
        f"the source of variant {variant_id} is not in the ledger (missing from the object store)",
    )
    return _text(source)


@router.get("/variants/{variant_id}/diff", response_class=PlainTextResponse)
def variant_diff(variant_id: str, conn: Conn) -> Response:
    _found(queries.variant(conn, variant_id), f"unknown variant {variant_id!r}")
    diff = _found(
        queries.variant_diff(conn, variant_id),
        f"no diff for variant {variant_id}: its source or its parent's is not in the ledger",
    )
    return _text(diff, "text/x-diff")


@router.get("/variants/{variant_id}/lineage")
def lineage(variant_id: str, conn: Conn) -> list[dict[str, Any]]:
    return _found(queries.lineage(conn, variant_id), f"unknown variant {variant_id!r}")


@router.get("/runs/{run_id}")
def run(run_id: str, conn: Conn) -> dict[str, Any]:
    return _found(queries.run(conn, run_id), f"unknown run {run_id!r}")


@router.get("/runs/{run_id}/log", response_class=PlainTextResponse)
def run_log(run_id: str, conn: Conn) -> Response:
    _found(queries.run(conn, run_id), f"unknown run {run_id!r}")
    text = _found(queries.run_log(conn, run_id), f"run {run_id} has no log yet (not finished)")
    return _text(text)


def create_app(db_path: Path | str) -> FastAPI:
    """The API over the ledger at `db_path` (opened read-only per request)."""
    app = FastAPI(title="nightshift ledger", version="1")
    app.state.db_path = Path(db_path)
    app.include_router(router)
    return app


# --- dead letters (issue 12): every campaign's, and those no campaign could be read from ---


class DeadLetter(BaseModel):
    """A message no handler could ever accept, with why (forged, unknown run, undecodable)."""

    event_id: str
    campaign: str  # `?` when the payload named none that could be read
    subject: str
    stream_seq: int
    consumer: str
    error: str
    payload_preview: str
    ts: float


@router.get("/dead-letters", response_model=list[DeadLetter])
def all_dead_letters(conn: Conn) -> list[dict[str, Any]]:
    return queries.all_dead_letters(conn)


@router.get("/campaigns/{name}/dead-letters", response_model=list[DeadLetter])
def campaign_dead_letters(name: str, conn: Conn) -> list[dict[str, Any]]:
    _campaign(conn, name)
    return queries.dead_letters(conn, name)
