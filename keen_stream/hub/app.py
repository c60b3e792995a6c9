"""The hub's ASGI app: WebSocket ``/ws`` (the fan-out fast path), server-sent events
``/events`` (and ``POST /events/tickets``; keen_stream/hub/sse.py), ``/healthz``, ``/metrics``,
and the browser monitor's static files under ``/monitor/`` (keen_stream/hub/monitor.py).

Starlette serves the HTTP routes and owns the lifespan (database pool, hub service). WebSocket
connections to ``/ws`` are routed to :func:`serve_websocket` before Starlette's middleware, so the
ASGI ``send`` it receives is uvicorn's own: that is what lets the fan-out write pre-encoded frames
to the transport (keen_stream/hub/fanout.py). Other WebSocket paths are refused. ``GET /events``
is routed the same way: its stream needs uvicorn's ``send`` (the transport's buffer is part of
the send-buffer limit) and no middleware buffering it.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from keen_stream.dal.database import KeenDatabase
from keen_stream.hub.connection import Receive, Scope, Send, serve_websocket
from keen_stream.hub.metrics import registry_for
from keen_stream.hub.monitor import monitor_routes
from keen_stream.hub.service import HubService
from keen_stream.hub.sse import issue_ticket, serve_events
from keen_stream.hub.transport import ConnectionGuard
from keen_stream.settings import Settings, get_settings


class HubApp:
    """ASGI entry point: ``/ws`` WebSockets straight to the hub, everything else to Starlette."""

    def __init__(self, starlette: Starlette) -> None:
        self.starlette = starlette

    @property
    def guard(self) -> ConnectionGuard | None:
        """The socket guard of the uvicorn server running this app (set by ``uvicorn_config``)."""
        return getattr(self.starlette.state, "guard", None)

    @guard.setter
    def guard(self, guard: ConnectionGuard) -> None:
        self.starlette.state.guard = guard

    @property
    def service(self) -> HubService | None:
        return getattr(self.starlette.state, "service", None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            service = self.service
            if scope.get("path") != "/ws" or service is None:
                await receive()
                await send({"type": "websocket.close", "code": 1008})
                return
            await serve_websocket(service, scope, receive, send)
            return
        if scope["type"] == "http" and scope.get("path") == "/events":
            await serve_events(self.service, scope, receive, send)
            return
        await self.starlette(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    *,
    db: KeenDatabase | None = None,
    close_db: bool = False,
    freeze_gc: bool = False,
) -> HubApp:
    """The hub application. ``db``: use this database (closed at shutdown only if ``close_db``);
    default: ``KeenDatabase.connect()`` (``KEEN_DATABASE_URL``, or the embedded PostgreSQL).

    ``freeze_gc`` (set by ``keen-stream serve``, which owns its process): after startup, move
    every object alive into the garbage collector's permanent generation, so full collections
    no longer walk the imported modules and the app (tens of milliseconds each, during which
    no frame goes out)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        database = db or await KeenDatabase.connect(settings=settings)
        service = HubService(database, settings)
        try:
            await service.start()
            app.state.service = service
            app.state.registry = registry_for(service, getattr(app.state, "guard", None))
            if freeze_gc:
                gc.collect()
                gc.freeze()
            yield
        finally:
            await service.stop()
            app.state.service = None
            if db is None or close_db:
                await database.close()

    async def healthz(request: Request) -> Response:
        service: HubService | None = getattr(request.app.state, "service", None)
        if service is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        database = await service.db.health()
        body: dict[str, Any] = {"database": database, **service.health()}
        guard: ConnectionGuard | None = getattr(request.app.state, "guard", None)
        if guard is not None:
            body["sockets"] = guard.snapshot()
        ok = bool(database.get("ok")) and service.listener.connected and not service.stopping
        body["status"] = "ok" if ok else "degraded"
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        registry = getattr(request.app.state, "registry", None)
        if registry is None:
            return Response("starting\n", status_code=503)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    starlette = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/metrics", metrics),
            Route("/events/tickets", issue_ticket, methods=["POST"]),
            *monitor_routes(),
        ],
        lifespan=lifespan,
    )
    return HubApp(starlette)
