"""POST /campaigns/{name}/stop and /resume: the dashboard's buttons, guarded by api_token.

They do what `nightshift campaign stop` and a restart do (services.campaign): mark the
campaign stopped in the campaigns KV, publish CampaignStopped and cancel its runs; or clear
the mark and publish its CampaignStarted again. The ledger shows the new state once the
event comes back through the stream (a moment later, pushed to the page by the live feed).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field

from services.bus import Bus
from services.campaign import CampaignError, resume_campaign, stop_campaign
from services.ledger.access import require_control_token
from services.ledger.params import CampaignName

Action = Literal["stop", "resume"]


class ControlResult(BaseModel):
    """What a stop or resume request did."""

    campaign: str
    action: Action
    changed: bool = Field(description="false: the campaign already was in that state")
    detail: str


router = APIRouter(tags=["controls"], dependencies=[Depends(require_control_token)])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or wrong bearer token; nothing changed"},
    403: {"description": "controls are off: no api_token setting"},
    404: {"description": "no such campaign on this deployment"},
    503: {"description": "this ledger has no broker connection"},
}


def _bus(request: Request) -> Bus:
    bus: Bus | None = request.app.state.bus
    if bus is None:
        raise HTTPException(
            status_code=503,
            detail="this ledger has no broker connection (it serves a ledger file only): "
            "use `nightshift campaign stop NAME` against the deployment's NATS",
        )
    return bus


@router.post("/campaigns/{name}/stop", response_model=ControlResult, responses=_ERRORS)
async def stop(name: CampaignName, request: Request) -> ControlResult:
    """Stop proposing and cancel the campaign's runs; its history stays."""
    try:
        changed = await stop_campaign(
            _bus(request), name, detail="stopped from the dashboard (POST /campaigns/{name}/stop)"
        )
    except CampaignError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    detail = "stopped: no new proposals, runs cancelled" if changed else "was already stopped"
    return ControlResult(campaign=name, action="stop", changed=changed, detail=detail)


@router.post("/campaigns/{name}/resume", response_model=ControlResult, responses=_ERRORS)
async def resume(name: CampaignName, request: Request) -> ControlResult:
    """Start a stopped campaign again with its configuration (seed, limits)."""
    try:
        changed = await resume_campaign(_bus(request), name)
    except CampaignError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    detail = "resumed: proposing again" if changed else "was not stopped"
    return ControlResult(campaign=name, action="resume", changed=changed, detail=detail)
