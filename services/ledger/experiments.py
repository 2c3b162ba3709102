"""The experiments table: every proposed variant of a campaign with its decision and evidence.

Filter by status, tier and title text; sort by time, value, duration or cost; one page at a
time. GET /campaigns/{name}/experiments answers the same rows as JSON that the dashboard's
table shows.
"""

from __future__ import annotations

import math
import sqlite3
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from services.ledger.api import Conn
from services.ledger.overview import found
from services.ledger.params import MAX_PAGE, CampaignName

ExperimentSort = Literal["time", "value", "duration", "cost"]
Order = Literal["asc", "desc"]
StatusFilter = Literal["pending", "keep", "discard", "crash"]
PER_PAGE = 25

_SORT_SQL = {
    "time": "v.proposed_at {o}, v.variant_id {o}",
    "value": "v.value IS NULL, v.value {o}, v.proposed_at {o}",
    "duration": "duration_s IS NULL, duration_s {o}, v.proposed_at {o}",
    "cost": "v.llm_usd {o}, v.proposed_at {o}",
}


class Experiment(BaseModel):
    variant_id: str
    parent_id: str | None
    title: str
    status: str = Field(description="the keep decision: pending, keep, discard or crash")
    value: float | None = Field(description="mean of the metric over the ok runs")
    delta: float | None = Field(description="value minus the campaign's best value")
    n: int = Field(description="ok runs behind the value")
    spread: float | None = Field(description="sample standard deviation of the ok runs")
    runs: int
    tiers: list[str]
    hardware: list[str]
    llm_usd: float
    duration_s: float | None = Field(description="wall seconds of its finished runs")
    proposed_at: float


class ExperimentPage(BaseModel):
    campaign: str
    total: int = Field(description="rows matching the filters, over all pages")
    page: int
    per_page: int
    pages: int
    best_value: float | None
    rows: list[Experiment]


class TableQuery(BaseModel):
    status: StatusFilter | None = None
    tier: str | None = None
    q: str | None = None
    sort: ExperimentSort = "time"
    order: Order = "desc"
    page: int = 1
    per_page: int = PER_PAGE


def _where(name: str, query: TableQuery) -> tuple[str, list[object]]:
    where = ["v.campaign = ?", "v.proposed_at IS NOT NULL"]
    params: list[object] = [name]
    if query.status:
        where.append("v.status = ?")
        params.append(query.status)
    if query.tier:
        where.append(
            "EXISTS (SELECT 1 FROM runs t WHERE t.variant_id = v.variant_id AND t.tier = ?)"
        )
        params.append(query.tier)
    if query.q:
        escaped = query.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        where.append("v.title LIKE ? ESCAPE '\\'")
        params.append(f"%{escaped}%")
    return " AND ".join(where), params


def table(conn: sqlite3.Connection, name: str, query: TableQuery) -> ExperimentPage | None:
    camp = conn.execute("SELECT best_value FROM campaigns WHERE name = ?", (name,)).fetchone()
    if camp is None:
        return None
    where, params = _where(name, query)
    total = int(
        conn.execute(f"SELECT COUNT(*) FROM variants v WHERE {where}", params).fetchone()[0]
    )
    order_by = _SORT_SQL[query.sort].format(o=query.order)
    rows = conn.execute(
        f"""
        SELECT v.variant_id, v.parent_id, v.title, v.status, v.value, v.ok_runs, v.llm_usd,
               v.proposed_at,
               (SELECT COUNT(*) FROM runs r WHERE r.variant_id = v.variant_id) AS runs,
               (SELECT GROUP_CONCAT(DISTINCT r.tier) FROM runs r
                WHERE r.variant_id = v.variant_id) AS tiers,
               (SELECT GROUP_CONCAT(DISTINCT r.accelerator) FROM runs r
                WHERE r.variant_id = v.variant_id AND r.accelerator != '') AS hardware,
               (SELECT SUM(r.finished_at - r.started_at) FROM runs r
                WHERE r.variant_id = v.variant_id AND r.finished_at IS NOT NULL) AS duration_s,
               (SELECT COUNT(*) FROM results s WHERE s.variant_id = v.variant_id
                AND s.status = 'ok') AS k,
               (SELECT SUM(s.value) FROM results s WHERE s.variant_id = v.variant_id
                AND s.status = 'ok') AS sx,
               (SELECT SUM(s.value * s.value) FROM results s WHERE s.variant_id = v.variant_id
                AND s.status = 'ok') AS sxx
        FROM variants v WHERE {where} ORDER BY {order_by} LIMIT ? OFFSET ?
        """,
        (*params, query.per_page, (query.page - 1) * query.per_page),
    ).fetchall()
    best = camp["best_value"]
    return ExperimentPage(
        campaign=name,
        total=total,
        page=query.page,
        per_page=query.per_page,
        pages=max(1, math.ceil(total / query.per_page)),
        best_value=best,
        rows=[_experiment(r, best) for r in rows],
    )


def _spread(k: int, sx: float | None, sxx: float | None) -> float | None:
    if k < 2 or sx is None or sxx is None:
        return None
    return math.sqrt(max(0.0, (sxx - sx * sx / k) / (k - 1)))


def _experiment(r: sqlite3.Row, best: float | None) -> Experiment:
    value = r["value"]
    return Experiment(
        variant_id=r["variant_id"],
        parent_id=r["parent_id"],
        title=r["title"],
        status=r["status"],
        value=value,
        delta=None if value is None or best is None else value - best,
        n=r["ok_runs"],
        spread=_spread(int(r["k"]), r["sx"], r["sxx"]),
        runs=r["runs"],
        tiers=(r["tiers"] or "").split(",") if r["tiers"] else [],
        hardware=(r["hardware"] or "").split(",") if r["hardware"] else [],
        llm_usd=float(r["llm_usd"] or 0.0),
        duration_s=r["duration_s"],
        proposed_at=r["proposed_at"],
    )


def tiers(conn: sqlite3.Connection, name: str) -> list[str]:
    rows = conn.execute("SELECT DISTINCT tier FROM runs WHERE campaign = ? ORDER BY tier", (name,))
    return [str(r[0]) for r in rows]


router = APIRouter(tags=["dashboard data"])


@router.get(
    "/campaigns/{name}/experiments",
    response_model=ExperimentPage,
    responses={404: {"description": "unknown campaign"}},
)
def experiments(
    name: CampaignName,
    conn: Conn,
    status: StatusFilter | None = None,
    tier: Annotated[str | None, Query(max_length=100)] = None,
    q: Annotated[str | None, Query(max_length=200, description="text in the title")] = None,
    sort: ExperimentSort = "time",
    order: Order = "desc",
    page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
    per_page: Annotated[int, Query(ge=1, le=200)] = PER_PAGE,
) -> ExperimentPage:
    """The experiments table: decision, evidence (n, mean, spread), Δ to the best, cost."""
    query = TableQuery(
        status=status, tier=tier, q=q, sort=sort, order=order, page=page, per_page=per_page
    )
    result: ExperimentPage = found(table(conn, name, query), name)
    return result
