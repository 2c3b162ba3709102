"""The dashboard: HTML pages from Jinja2 templates (autoescaped), static assets vendored here.

/ goes to the newest campaign's overview; /ui/campaigns lists them all;
/ui/campaigns/{name} is the overview (state and controls, counts, rates, fleet, spend, the
progress chart, the experiments table); /ui/variants/{id} a variant (diff, runs, evidence,
lineage). The page keeps itself current through the live feed (live.py): on each update
its script fetches the parts that changed (/ui/campaigns/{name}/parts/{part}) and swaps
them in. Nothing is fetched from outside the ledger: the chart is drawn here as SVG, the
one script is ours.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlencode

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader

from services.bus import Bus
from services.ledger import chart, controls, experiments, live, overview, queries
from services.ledger.access import ReadGuard
from services.ledger.api import Conn
from services.ledger.experiments import TableQuery
from services.ledger.overview import FleetWatch, found
from services.ledger.params import CampaignName, VariantId
from services.proposer.fleet import fleet_expiry
from services.settings import Settings

STATIC = Path(__file__).parent / "static"
NONE_SHOWN = "\N{EN DASH}"
# Our own files only: no inline script, nothing from another origin.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'"
)
Part = Literal["stats", "chart", "table", "recent"]


def _number(value: Any, digits: int = 6) -> str:
    return NONE_SHOWN if value is None else f"{float(value):.{digits}f}"


def _signed(value: Any, digits: int = 6) -> str:
    return NONE_SHOWN if value is None else f"{float(value):+.{digits}f}"


def _when(ts: Any) -> str:
    if ts is None:
        return NONE_SHOWN
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts)))


def _seconds(value: Any) -> str:
    if value is None:
        return NONE_SHOWN
    s = float(value)
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def diff_lines(diff: str) -> list[tuple[str, str]]:
    """Each line of a unified diff with its class: file, hunk, add, del or ctx."""
    out = []
    for line in diff.splitlines():
        if line.startswith(("+++", "---")):
            kind = "file"
        elif line.startswith("@@"):
            kind = "hunk"
        elif line.startswith("+"):
            kind = "add"
        elif line.startswith("-"):
            kind = "del"
        else:
            kind = "ctx"
        out.append((kind, line))
    return out


def table_url(name: str, query: TableQuery, **changes: Any) -> str:
    """The overview's address with the table's filters, some of them changed."""
    params = {**query.model_dump(exclude_none=True), **changes}
    return f"/ui/campaigns/{quote(name)}?{urlencode(params)}"


templates = Environment(
    loader=PackageLoader("services.ledger", "templates"), autoescape=True, trim_blocks=True
)
templates.filters.update(number=_number, signed=_signed, when=_when, seconds=_seconds)
templates.globals["table_url"] = table_url


def render(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    body = templates.get_template(template).render(**context)
    return HTMLResponse(body, status_code=status_code, headers={"Content-Security-Policy": CSP})


router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def home(conn: Conn) -> Response:
    campaigns = queries.list_campaigns(conn)
    if not campaigns:
        return render("index.html", campaigns=[])
    newest = max(campaigns, key=lambda c: c["started_at"] or 0)
    return RedirectResponse(f"/ui/campaigns/{newest['name']}", status_code=307)


@router.get("/ui/campaigns", response_class=HTMLResponse)
def campaign_list(conn: Conn) -> HTMLResponse:
    return render("index.html", campaigns=queries.list_campaigns(conn))


def _table_query(request: Request) -> TableQuery:
    """The table's filters from the page's query string (bad values fall back to defaults)."""
    params = dict(request.query_params)
    try:
        query = TableQuery.model_validate(
            {k: v for k, v in params.items() if k in TableQuery.model_fields and v != ""}
        )
    except ValueError:
        query = TableQuery()
    query.page = max(1, query.page)
    query.per_page = min(200, max(1, query.per_page))
    return query


def _parts(conn: sqlite3.Connection, request: Request, name: str) -> dict[str, Any]:
    """What the overview's parts are drawn from."""
    view = found(overview.overview(conn, name, request.app.state.fleet), name)
    progress = found(overview.progress(conn, name), name)
    query = _table_query(request)
    return {
        "name": name,
        "view": view,
        "chart": chart.draw(progress),
        "query": query,
        "page": experiments.table(conn, name, query),
        "tiers": experiments.tiers(conn, name),
        "recent": queries.recent_results(conn, name, limit=12),
        "controls_on": bool(request.app.state.settings.api_token),
    }


@router.get("/ui/campaigns/{name}", response_class=HTMLResponse)
def campaign_page(name: CampaignName, request: Request, conn: Conn) -> HTMLResponse:
    return render(
        "overview.html", campaigns=queries.list_campaigns(conn), **_parts(conn, request, name)
    )


@router.get("/ui/campaigns/{name}/parts/{part}", response_class=HTMLResponse)
def campaign_part(name: CampaignName, part: Part, request: Request, conn: Conn) -> HTMLResponse:
    return render(f"_{part}.html", **_parts(conn, request, name))


@router.get("/ui/variants/{variant_id}", response_class=HTMLResponse)
def variant_page(variant_id: VariantId, conn: Conn) -> HTMLResponse:
    variant = queries.variant(conn, variant_id)
    if variant is None:
        raise HTTPException(status_code=404, detail=f"unknown variant {variant_id!r}")
    runs = [queries.run(conn, r["run_id"]) or r for r in variant["runs"]]
    decisions = conn.execute(
        "SELECT status, value, runs, rule, best_before_variant_id, best_before_value, "
        "decided_at FROM keep_decisions WHERE variant_id = ? ORDER BY decided_at",
        (variant_id,),
    ).fetchall()
    camp = queries.campaign(conn, variant["campaign"]) or {}
    return render(
        "variant.html",
        v=variant,
        metric=camp.get("metric", "val_bpb"),
        diff=diff_lines(queries.variant_diff(conn, variant_id) or ""),
        runs=runs,
        decisions=[dict(d) for d in decisions],
        lineage=queries.lineage(conn, variant_id) or [],
    )


def install(app: FastAPI, settings: Settings, bus: Bus | None) -> None:
    """Add the dashboard, its data endpoints, the live feed and the controls to the API."""
    app.state.settings = settings
    app.state.bus = bus
    app.state.fleet = FleetWatch(fleet_expiry(settings.ack_wait_s)) if bus is not None else None
    app.state.closing = asyncio.Event()  # set when the ledger stops: live feeds end
    for module in (overview, experiments, live, controls):
        app.include_router(module.router)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if settings.api_token_reads:
        if not settings.api_token:
            raise ValueError(
                "api_token_reads is set but api_token is empty: set NIGHTSHIFT_API_TOKEN too"
            )
        app.add_middleware(ReadGuard, token=settings.api_token)
