"""The browser monitor: static files served at ``/monitor/`` (docs/monitor.md).

``keen_stream/hub/static`` holds the page (``index.html``, ``monitor.js``, ``monitor.css``) and
``keen-client.js``, the JavaScript client other front ends import. No build step: the files are
package data, read once and served as they are.

The page builds its state from the event stream itself: each session event carries the
session's whole state, so it subscribes from the oldest event the hub still retains and replays
the retention window. ``GET /monitor/origin`` tells it where that is (the pruning watermark, a
cursor); it is authorized like ``/ws`` (a Bearer token with the hub's required scopes, of an
active user) and reveals nothing else. Events themselves go over ``/ws`` only.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Final

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from keen_stream.errors import AccountInactive, AuthenticationError, KeenError
from keen_stream.hub.connection import bearer_token
from keen_stream.hub.service import HubService

#: Served name -> content type. Nothing else under /monitor/ exists.
_FILES: Final = {
    "index.html": "text/html; charset=utf-8",
    "monitor.js": "text/javascript; charset=utf-8",
    "monitor.css": "text/css; charset=utf-8",
    "keen-client.js": "text/javascript; charset=utf-8",
}

#: Scripts, styles and connections from this origin only (a script injected through data the
#: page shows could not run, nor load more); no referrer, so the page's address never leaves it;
#: no framing (clickjacking a page that holds a token). 'self' in connect-src covers ws:/wss:
#: to the same host and port (CSP 3).
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Revalidate on every load, so a deploy's new page and client are picked up at once.
    "Cache-Control": "no-cache",
}


def _load() -> dict[str, bytes]:
    static = files("keen_stream.hub") / "static"
    return {name: (static / name).read_bytes() for name in _FILES}


def _refusal(status: int, code: str) -> JSONResponse:
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="keen_stream"'
    return JSONResponse({"error": code}, status_code=status, headers=headers)


async def origin(request: Request) -> Response:
    """``{"since": cursor}``: subscribing with it replays every event still retained (the
    ``since`` of a full reload). The token as for ``/ws``: Authorization header only."""
    service: HubService | None = getattr(request.app.state, "service", None)
    if service is None:
        return _refusal(503, "starting")
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        return _refusal(401, "authentication_required")
    try:
        await service.db.tokens.validate(
            token,
            scopes=service.settings.hub_required_scopes,
            ip=request.client.host if request.client else None,
            touch=False,
        )
        since = await service.db.events.pruned_through()
    except AccountInactive as exc:
        return _refusal(403, exc.code)
    except AuthenticationError as exc:
        return _refusal(401, exc.code)
    except KeenError as exc:  # the database is unavailable, ...: try again later
        return _refusal(503, exc.code)
    return JSONResponse(
        {"since": str(since)}, headers={**SECURITY_HEADERS, "Cache-Control": "no-store"}
    )


def monitor_routes() -> list[Route]:
    """``/monitor`` (redirects to ``/monitor/``), ``/monitor/`` (the page), its files, and
    ``/monitor/origin``."""
    content = _load()

    async def page(request: Request) -> Response:
        name = request.path_params.get("name") or "index.html"
        body = content.get(name)
        if body is None:
            return Response("not found\n", status_code=404, headers=SECURITY_HEADERS)
        return Response(body, media_type=_FILES[name], headers=SECURITY_HEADERS)

    async def to_page(request: Request) -> Response:
        # Relative links in the page resolve under /monitor/. The query is dropped: nothing
        # belongs there (a token never does).
        return RedirectResponse("/monitor/", status_code=308, headers=SECURITY_HEADERS)

    return [
        Route("/monitor", to_page),
        Route("/monitor/", page),
        Route("/monitor/origin", origin),
        Route("/monitor/{name}", page),
    ]
