"""What the campaign overview shows, as JSON and to the page: progress, rates, fleet, spend.

GET /campaigns/{name}/progress: every ok result as a point (experiment number, value), each
kept one marked, and the running best as steps: the data of the dashboard's chart, which is
drawn from exactly this. GET /campaigns/{name}/overview: counts by status, experiments per
hour, fleet, spend, dead letters and the campaign's state.

The fleet comes from the launchers' FleetStatus (lossy, once a second, over core NATS),
which the ledger service follows while it runs, summed over a tier's launchers (a launcher
not heard from for `ack_wait_s`, at most 10 s, is no longer counted); a ledger read from a
file has no fleet.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from services.bus import Delivery
from services.contracts import FleetStatus
from services.ledger import queries
from services.ledger.api import Conn
from services.ledger.params import CampaignName
from services.proposer.fleet import Fleet

HOUR_S = 3600.0


class Point(BaseModel):
    experiment: int = Field(description="1-based position of the result in evaluation order")
    run_id: str
    variant_id: str
    value: float
    evaluated_at: float
    kept: bool = Field(description="the variant became the best")
    title: str


class Step(BaseModel):
    experiment: int = Field(description="the experiment after which this became the best")
    variant_id: str
    value: float


class Progress(BaseModel):
    campaign: str
    metric: str
    direction: str
    experiments: int = Field(description="evaluated results, crashes included")
    points: list[Point]
    best: list[Step]


class TierFleet(BaseModel):
    tier: str
    slots: int = Field(description="the slots of this tier's launchers heard from, summed")
    busy: int
    launchers: int = Field(description="launchers of this tier heard from lately")


class FleetView(BaseModel):
    heard: bool = Field(description="false: no launcher heard from (ledger read from a file)")
    tiers: list[TierFleet]
    queued: int
    running_runs: int = Field(description="runs of this campaign the ledger knows as running")
    requested_runs: int = Field(description="runs of this campaign requested, not started")
    busy_run_hours_last_hour: float
    utilization_last_hour: float | None = Field(
        description="run time / (slots x window); None without a slot count"
    )


class Overview(BaseModel):
    campaign: str
    status: str
    stop_reason: str | None
    halted_reason: str | None
    metric: str
    direction: str
    variants: dict[str, int]
    results: dict[str, int]
    proposed: int
    evaluated: int
    dead_letters: int
    best_variant_id: str | None
    best_value: float | None
    best_title: str | None
    experiments_per_hour: float = Field(description="over the campaign so far")
    experiments_last_hour: int
    llm_usd: float
    gpu_usd: float | None = Field(description="None: GPU cost not recorded by this backend")
    fleet: FleetView
    position: int = Field(description="the ledger's last applied event of this campaign")


class FleetWatch(Fleet):
    """The proposer's view of the fleet (slots per tier, expiring quiet launchers) plus
    what the dashboard shows besides: busy slots and queued runs."""

    async def on_status(self, event: FleetStatus, _: Delivery) -> None:
        self.update(event, time.time())

    def tiers(self, now: float) -> list[TierFleet]:
        live = self._live(now)
        slots = self.slots(now)
        busy: dict[str, int] = {}
        launchers: dict[str, int] = {}
        for status in live:
            for tier, n in status.busy.items():
                busy[tier] = busy.get(tier, 0) + n
            for tier in status.slots:
                launchers[tier] = launchers.get(tier, 0) + 1
        return [
            TierFleet(tier=t, slots=n, busy=busy.get(t, 0), launchers=launchers.get(t, 0))
            for t, n in sorted(slots.items())
        ]

    def queued(self, now: float) -> int:
        """Runs waiting, per tier once: a tier's launchers share one queue (its durable
        consumer) and each reports all of it."""
        per_tier: dict[tuple[str, ...], int] = {}
        for status in self._live(now):
            tiers = tuple(sorted(status.slots))
            per_tier[tiers] = max(per_tier.get(tiers, 0), status.queued)
        return sum(per_tier.values())


def position(conn: sqlite3.Connection, name: str) -> int:
    """The sequence number of the last event applied for this campaign (0: none)."""
    row = conn.execute("SELECT MAX(rowid) FROM events_seen WHERE campaign = ?", (name,))
    return int(row.fetchone()[0] or 0)


def progress(conn: sqlite3.Connection, name: str) -> Progress | None:
    camp = queries.campaign(conn, name)
    if camp is None:
        return None
    kept = {r["variant_id"] for r in queries.best_history(conn, name)}
    rows = conn.execute(
        "SELECT r.run_id, r.variant_id, r.status, r.value, r.evaluated_at, v.title "
        "FROM results r LEFT JOIN variants v ON v.variant_id = r.variant_id "
        "WHERE r.campaign = ? AND r.status != 'infra' ORDER BY r.seq",
        (name,),
    ).fetchall()
    points = [
        Point(
            experiment=n,
            run_id=r["run_id"],
            variant_id=r["variant_id"],
            value=float(r["value"]),
            evaluated_at=float(r["evaluated_at"]),
            kept=r["variant_id"] in kept,
            title=str(r["title"] or ""),
        )
        for n, r in enumerate(rows, start=1)
        if r["status"] == "ok" and r["value"] is not None
    ]
    times = [float(r["evaluated_at"]) for r in rows]
    steps = [
        Step(
            experiment=max(1, sum(t <= float(h["ts"]) for t in times)),
            variant_id=h["variant_id"],
            value=float(h["value"]),
        )
        for h in queries.best_history(conn, name)
    ]
    return Progress(
        campaign=name,
        metric=camp["metric"],
        direction=camp["direction"],
        experiments=len(rows),
        points=points,
        best=steps,
    )


def _fleet(conn: sqlite3.Connection, name: str, watch: FleetWatch | None, now: float) -> FleetView:
    started = conn.execute("SELECT started_at FROM campaigns WHERE name = ?", (name,)).fetchone()
    window = min(HOUR_S, max(1.0, now - float(started[0] or now))) if started else HOUR_S
    since = now - window
    busy_s = conn.execute(
        "SELECT COALESCE(SUM(MIN(COALESCE(finished_at, ?), ?) - MAX(started_at, ?)), 0) "
        "FROM runs WHERE campaign = ? AND started_at IS NOT NULL "
        "AND COALESCE(finished_at, ?) > ?",
        (now, now, since, name, now, since),
    ).fetchone()[0]
    states = dict(
        conn.execute(
            "SELECT state, COUNT(*) FROM runs WHERE campaign = ? GROUP BY state", (name,)
        ).fetchall()
    )
    tiers = watch.tiers(now) if watch is not None else []
    slots = sum(t.slots for t in tiers)
    return FleetView(
        heard=bool(tiers),
        tiers=tiers,
        queued=watch.queued(now) if watch is not None else 0,
        running_runs=int(states.get("running", 0)),
        requested_runs=int(states.get("requested", 0)),
        busy_run_hours_last_hour=float(busy_s) / HOUR_S,
        utilization_last_hour=float(busy_s) / (slots * window) if slots else None,
    )


def overview(
    conn: sqlite3.Connection, name: str, watch: FleetWatch | None = None
) -> Overview | None:
    summary = queries.campaign_summary(conn, name)
    if summary is None:
        return None
    now = time.time()
    counts = summary["counts"]
    span = conn.execute(
        "SELECT MIN(evaluated_at), MAX(evaluated_at), "
        "SUM(evaluated_at > ?) FROM results WHERE campaign = ? AND status != 'infra'",
        (now - HOUR_S, name),
    ).fetchone()
    first, last, last_hour = span[0], span[1], span[2]
    started = summary["started_at"] or first
    hours = (float(last) - float(started)) / HOUR_S if last is not None and started else 0.0
    evaluated = counts["evaluated"] - counts["results"].get("infra", 0)
    best = summary["best"]
    return Overview(
        campaign=name,
        status=summary["status"],
        stop_reason=summary["stop_reason"],
        halted_reason=summary["halted_reason"],
        metric=summary["metric"],
        direction=summary["direction"],
        variants=counts["variants"],
        results=counts["results"],
        proposed=counts["proposed"],
        evaluated=evaluated,
        dead_letters=counts["dead_letters"],
        best_variant_id=best["variant_id"] if best else None,
        best_value=best["value"] if best else None,
        best_title=best.get("title") if best else None,
        experiments_per_hour=evaluated / hours if hours > 0 else 0.0,
        experiments_last_hour=int(last_hour or 0),
        llm_usd=float(summary["llm"]["usd"] or 0.0),
        gpu_usd=summary["gpu"]["usd"] if summary["gpu"]["gpu_seconds"] > 0 else None,
        fleet=_fleet(conn, name, watch, now),
        position=position(conn, name),
    )


def found(value: Any, name: str) -> Any:
    if value is None:
        raise HTTPException(status_code=404, detail=f"unknown campaign {name!r}")
    return value


router = APIRouter(tags=["dashboard data"])
_404: dict[int | str, dict[str, Any]] = {404: {"description": "unknown campaign"}}


@router.get("/campaigns/{name}/progress", response_model=Progress, responses=_404)
def get_progress(name: CampaignName, conn: Conn) -> Progress:
    """The chart's data: ok results as points, kept ones marked, the running best."""
    result: Progress = found(progress(conn, name), name)
    return result


@router.get("/campaigns/{name}/overview", response_model=Overview, responses=_404)
def get_overview(name: CampaignName, request: Request, conn: Conn) -> Overview:
    """Counts, rates, fleet, spend and state of a campaign."""
    result: Overview = found(overview(conn, name, request.app.state.fleet), name)
    return result
