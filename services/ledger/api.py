"""The ledger's HTTP API (FastAPI): campaigns, best train.py, variants, runs, logs, results.tsv.

Each request opens its own read connection (WAL lets it read while the service writes).
The OpenAPI document (`/openapi.json`) is the contract, tested with schemathesis
(tests/test_openapi_contract.py): every JSON answer has a declared model (models.py),
every path and query parameter is bounded, so a bad one is a 422 before any SQL runs;
an unknown campaign, variant or run is a 404 with a `detail` naming it; text answers
carry the media type they are documented with; links lead from one answer to the next.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path as FilePath
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import PlainTextResponse, Response

from services.bus import Bus
from services.ledger import queries, tsv
from services.ledger.db import LedgerError, open_read
from services.ledger.models import (
    Ancestor,
    BestChange,
    BestWithSource,
    CampaignListItem,
    CampaignSummary,
    DeadLetter,
    ErrorBody,
    Health,
    MissingAncestor,
    RunDetail,
    VariantDetail,
    VariantStatus,
    VariantSummary,
)
from services.ledger.params import MAX_LIMIT, MAX_OFFSET, CampaignName, RunId, VariantId
from services.settings import Settings

T = TypeVar("T")


class TsvResponse(PlainTextResponse):
    media_type = "text/tab-separated-values"


class DiffResponse(PlainTextResponse):
    media_type = "text/x-diff"


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


def _variant(conn: sqlite3.Connection, variant_id: str) -> dict[str, Any]:
    return _found(queries.variant(conn, variant_id), f"unknown variant {variant_id!r}")


def _run(conn: sqlite3.Connection, run_id: str) -> dict[str, Any]:
    return _found(queries.run(conn, run_id), f"unknown run {run_id!r}")


def _text(
    body: str, response_class: type[PlainTextResponse], filename: str | None = None
) -> Response:
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'} if filename else None
    return response_class(body, headers=headers)


def _error(status: int, what: str) -> dict[int | str, dict[str, Any]]:
    """An error answer: JSON `{"detail": ...}` whatever the operation's own media type."""
    content = {"application/json": {"schema": ErrorBody.model_json_schema()}}
    return {status: {"description": what, "content": content}}


def _not_found(what: str) -> dict[int | str, dict[str, Any]]:
    return _error(404, what)


def _links(operations: Iterable[str], parameter: str, value: str) -> dict[int | str, Any]:
    """OpenAPI links of a 200 answer: each operation takes `parameter` from `value`."""
    links = {op: {"operationId": op, "parameters": {parameter: value}} for op in operations}
    return {200: {"links": links}}


def _answers(
    missing: str, operations: Iterable[str], parameter: str, value: str
) -> dict[int | str, Any]:
    """A 404 (`missing`), and a 200 whose links lead to `operations` (as `_links`)."""
    return {**_not_found(missing), **_links(operations, parameter, value)}


_CAMPAIGN_OPS = ("best", "variants", "results_tsv", "deadletters", "best_history")
_VARIANT_OPS = ("variant", "variant_source", "variant_diff", "lineage")

router = APIRouter(
    generate_unique_id_function=lambda route: route.name,
    responses=_error(503, "the ledger database cannot be read (not a ledger, a newer schema)"),
)


@router.get("/healthz", response_model=Health)
def healthz(conn: Conn) -> dict[str, Any]:
    return {"ok": True, "events": queries.events_applied(conn)}


# --- campaigns --------------------------------------------------------------------------


@router.get(
    "/campaigns",
    response_model=list[CampaignListItem],
    responses=_links(("campaign_summary", "variants"), "name", "$response.body#/0/name"),
)
def campaigns(conn: Conn) -> list[dict[str, Any]]:
    return queries.list_campaigns(conn)


@router.get(
    "/campaigns/{name}",
    response_model=CampaignSummary,
    responses=_answers("unknown campaign", _CAMPAIGN_OPS, "name", "$request.path.name"),
)
def campaign_summary(name: CampaignName, conn: Conn) -> dict[str, Any]:
    return _found(queries.campaign_summary(conn, name), f"unknown campaign {name!r}")


def _best(conn: sqlite3.Connection, name: str) -> dict[str, Any]:
    _campaign(conn, name)
    return _found(
        queries.best(conn, name),
        f"campaign {name!r} has no best variant yet: no variant has an ok result",
    )


@router.get(
    "/campaigns/{name}/best",
    response_model=BestWithSource,
    responses=_answers(
        "unknown campaign, or no best variant yet",
        _VARIANT_OPS,
        "variant_id",
        "$response.body#/variant_id",
    ),
)
def best(name: CampaignName, conn: Conn) -> dict[str, Any]:
    return _best(conn, name)


def _attachment(filename: str) -> dict[int | str, Any]:
    """A 200 that names the file to save it as (the Content-Disposition header)."""
    header = {
        "description": f'`attachment; filename="{filename}"`',
        "required": True,
        "schema": {"type": "string", "pattern": '^attachment; filename="[^"]+"$'},
    }
    return {200: {"headers": {"Content-Disposition": header}}}


_SOURCE_404 = {
    **_not_found("unknown campaign, no best yet, or its source is not in the ledger"),
    **_attachment("<the edited file, train.py by default>"),
}


@router.get(
    "/campaigns/{name}/best/train.py",
    response_class=PlainTextResponse,
    responses=_SOURCE_404,
    name="best_train_py",
)
@router.get(
    "/campaigns/{name}/best/source", response_class=PlainTextResponse, responses=_SOURCE_404
)
def best_source(name: CampaignName, conn: Conn) -> Response:
    found = _best(conn, name)
    source = _found(
        found.get("source"),
        f"the source of best variant {found['variant_id']} is not in the ledger "
        f"(digest {found.get('source_digest')} was missing from the object store)",
    )
    return _text(source, PlainTextResponse, filename=str(found.get("edit_file") or "train.py"))


@router.get(
    "/campaigns/{name}/variants",
    response_model=list[VariantSummary],
    responses=_answers(
        "unknown campaign", _VARIANT_OPS, "variant_id", "$response.body#/0/variant_id"
    ),
)
def variants(
    name: CampaignName,
    conn: Conn,
    status: Annotated[VariantStatus | None, Query(description="only variants with it")] = None,
    sort: queries.VariantSort = "val_bpb",
    order: queries.SortOrder = "asc",
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> list[dict[str, Any]]:
    _campaign(conn, name)
    return queries.list_variants(
        conn, name, status=status, sort=sort, order=order, limit=limit, offset=offset
    )


@router.get(
    "/campaigns/{name}/results.tsv",
    response_class=TsvResponse,
    responses={**_not_found("unknown campaign"), **_attachment("results.tsv")},
)
def results_tsv(name: CampaignName, conn: Conn) -> Response:
    body = _found(tsv.results_tsv(conn, name), f"unknown campaign {name!r}")
    return _text(body, TsvResponse, filename="results.tsv")


@router.get(
    "/campaigns/{name}/deadletters",
    response_model=list[DeadLetter],
    responses=_not_found("unknown campaign"),
)
def deadletters(name: CampaignName, conn: Conn) -> list[dict[str, Any]]:
    """Messages of this campaign that could never be handled (forged, unknown run or variant)."""
    _campaign(conn, name)
    return queries.dead_letters(conn, name)


@router.get("/deadletters", response_model=list[DeadLetter])
def all_deadletters(conn: Conn) -> list[dict[str, Any]]:
    """Every dead letter, newest first, also those no campaign could be read from (`?`)."""
    return queries.all_dead_letters(conn)


@router.get(
    "/campaigns/{name}/history",
    response_model=list[BestChange],
    responses=_answers(
        "unknown campaign", ("variant",), "variant_id", "$response.body#/0/variant_id"
    ),
)
def best_history(name: CampaignName, conn: Conn) -> list[dict[str, Any]]:
    _campaign(conn, name)
    return queries.best_history(conn, name)


# --- variants and runs ------------------------------------------------------------------


@router.get(
    "/variants/{variant_id}",
    response_model=VariantDetail,
    responses=_answers(
        "unknown variant", ("run", "run_log"), "run_id", "$response.body#/runs/0/run_id"
    ),
)
def variant(variant_id: VariantId, conn: Conn) -> dict[str, Any]:
    return _variant(conn, variant_id)


def _variant_text(
    conn: sqlite3.Connection,
    variant_id: str,
    query: Callable[[sqlite3.Connection, str], str | None],
    missing: str,
    response_class: type[PlainTextResponse],
) -> Response:
    """A text of a known variant as `response_class`: a 404 naming the variant when it is
    unknown, a 404 saying what is `missing` when the text is not in the ledger."""
    _variant(conn, variant_id)
    return _text(_found(query(conn, variant_id), missing), response_class)


@router.get(
    "/variants/{variant_id}/source",
    response_class=PlainTextResponse,
    responses=_not_found("unknown variant, or its source is not in the ledger"),
)
def variant_source(variant_id: VariantId, conn: Conn) -> Response:
    missing = (
        f"the source of variant {variant_id} is not in the ledger (missing from the object store)"
    )
    return _variant_text(conn, variant_id, queries.variant_source, missing, PlainTextResponse)


@router.get(
    "/variants/{variant_id}/diff",
    response_class=DiffResponse,
    responses=_not_found("unknown variant, or no diff (a source is not in the ledger)"),
)
def variant_diff(variant_id: VariantId, conn: Conn) -> Response:
    missing = f"no diff for variant {variant_id}: its source or its parent's is not in the ledger"
    return _variant_text(conn, variant_id, queries.variant_diff, missing, DiffResponse)


@router.get(
    "/variants/{variant_id}/lineage",
    response_model=list[Ancestor | MissingAncestor],
    responses=_not_found("unknown variant"),
)
def lineage(variant_id: VariantId, conn: Conn) -> list[dict[str, Any]]:
    return _found(queries.lineage(conn, variant_id), f"unknown variant {variant_id!r}")


@router.get(
    "/runs/{run_id}",
    response_model=RunDetail,
    responses=_answers("unknown run", ("variant",), "variant_id", "$response.body#/variant_id"),
)
def run(run_id: RunId, conn: Conn) -> dict[str, Any]:
    return _run(conn, run_id)


@router.get(
    "/runs/{run_id}/log",
    response_class=PlainTextResponse,
    responses=_not_found("unknown run, or no log yet (not finished)"),
)
def run_log(run_id: RunId, conn: Conn) -> Response:
    _run(conn, run_id)
    text = _found(queries.run_log(conn, run_id), f"run {run_id} has no log yet (not finished)")
    return _text(text, PlainTextResponse)


def create_app(
    db_path: FilePath | str, settings: Settings | None = None, bus: Bus | None = None
) -> FastAPI:
    """The API over the ledger at `db_path` (opened read-only per request), with the
    dashboard; `bus` (the ledger service's) lets the controls stop and resume campaigns."""
    from services.ledger import dashboard  # its routers build on this module's `Conn`

    app = FastAPI(title="nightshift ledger", version="1")
    app.state.db_path = FilePath(db_path)
    app.include_router(router)
    dashboard.install(app, settings or Settings(), bus)
    return app
