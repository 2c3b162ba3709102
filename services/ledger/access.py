"""Who may use the ledger's HTTP API: the bearer token of the settings (`api_token`).

- Controls (POST /campaigns/{name}/stop and /resume) need `Authorization: Bearer <token>`.
  Without an `api_token` setting they are off: 403 with the setting to set. A missing or
  wrong token: 401, and nothing changes. A cookie never authorizes a control (no cross-site
  request can stop a campaign).
- With `api_token_reads` every read needs the token too (the header, or the cookie the
  dashboard's token form sets, since a browser's EventSource cannot send headers), except
  /healthz (the container's health check) and the static assets.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from urllib.parse import unquote

from fastapi import HTTPException, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from services.settings import Settings

TOKEN_COOKIE = "nightshift_token"
OPEN_PATHS = ("/healthz", "/static/")
BEARER = {"WWW-Authenticate": "Bearer"}
TOKEN_PAGE = Path(__file__).parent / "templates" / "token.html"


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer ...` header, or None."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def token_matches(expected: str, presented: str | None) -> bool:
    return (
        bool(expected)
        and presented is not None
        and secrets.compare_digest(expected.encode(), presented.encode())
    )


def require_control_token(request: Request) -> None:
    """FastAPI dependency of the controls: 403 when they are off, 401 without the token."""
    settings: Settings = request.app.state.settings
    if not settings.api_token:
        raise HTTPException(
            status_code=403,
            detail="campaign controls are off on this ledger: it has no api_token setting; "
            "set NIGHTSHIFT_API_TOKEN (or api_token in nightshift.toml) and restart it",
        )
    presented = bearer_token(request)
    if presented is None:
        raise HTTPException(
            status_code=401,
            detail="missing bearer token: send the header 'Authorization: Bearer <api_token>'",
            headers=BEARER,
        )
    if not token_matches(settings.api_token, presented):
        raise HTTPException(
            status_code=401, detail="wrong bearer token: nothing was changed", headers=BEARER
        )


class ReadGuard:
    """ASGI middleware: every GET/HEAD needs the token (header or cookie), but OPEN_PATHS."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in ("GET", "HEAD")
            or scope["path"].startswith(OPEN_PATHS)
        ):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        cookie = request.cookies.get(TOKEN_COOKIE)
        presented = bearer_token(request) or (unquote(cookie) if cookie else None)
        if token_matches(self.token, presented):
            await self.app(scope, receive, send)
            return
        await _refusal(request, presented is not None)(scope, receive, send)


def _refusal(request: Request, presented: bool) -> Response:
    what = "wrong token" if presented else "this ledger requires its api_token for reads"
    if "text/html" in request.headers.get("accept", ""):
        # A browser: the token form, which stores the token as a cookie and reloads.
        return HTMLResponse(TOKEN_PAGE.read_text(), status_code=401, headers=BEARER)
    detail = f"{what}: send the header 'Authorization: Bearer <api_token>'"
    return JSONResponse({"detail": detail}, status_code=401, headers=BEARER)
