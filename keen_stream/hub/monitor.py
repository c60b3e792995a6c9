"""The browser monitor: static files served at ``/monitor/`` (docs/monitor.md).

``keen_stream/hub/static`` holds the page (``index.html``, ``monitor.js``, ``monitor.css``) and
``keen-client.js``, the JavaScript client other front ends import. No build step: the files are
package data, read once and served as they are. The page talks to the hub only over ``/ws``
(same origin), with the token the user pastes; the HTTP routes here serve files, nothing else.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Final

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

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


def monitor_routes() -> list[Route]:
    """``/monitor`` (redirects to ``/monitor/``), ``/monitor/`` (the page) and its files."""
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
        Route("/monitor/{name}", page),
    ]
