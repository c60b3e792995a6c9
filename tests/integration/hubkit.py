"""A real hub for tests: uvicorn on 127.0.0.1 (ephemeral port), real WebSocket clients."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import asyncpg
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from keen_stream.dal.database import KeenDatabase
from keen_stream.hub.app import HubApp, create_app
from keen_stream.hub.cli import serving
from keen_stream.hub.service import HubService
from keen_stream.settings import Settings
from tests.conftest import make_settings

#: Fast intervals so tests finish quickly; production defaults are in settings.py.
FAST = {
    "hub_auth_timeout": 1.0,
    "hub_token_recheck_interval": 0.2,
    "hub_flush_interval": 0.1,
    "hub_heartbeat_interval": 0.2,
    "hub_node_stale_after": 2.0,
    "listener_fallback_poll": 0.2,
    "listener_probe_interval": 0.5,
    "listener_probe_timeout": 2.0,
    "listener_backoff_max": 0.2,
    "event_prune_interval": 3600.0,
    "hub_required_scopes": ("stream",),
}


@dataclass
class Hub:
    url: str
    app: HubApp
    db: KeenDatabase
    settings: Settings

    @property
    def service(self) -> HubService:
        service = self.app.service
        assert service is not None
        return service

    @property
    def http(self) -> str:
        return self.url.replace("ws://", "http://").removesuffix("/ws")


@asynccontextmanager
async def running_hub(dsn: str, **overrides: Any) -> AsyncIterator[Hub]:
    """A hub on 127.0.0.1; ``overrides`` are settings, except ``port`` (default 0: an
    ephemeral one), so a restarted hub can take the port of one that stopped."""
    port = int(overrides.pop("port", 0))
    settings = make_settings(dsn, **{**FAST, **overrides})
    db = await KeenDatabase.connect(settings=settings, migrate=False)
    try:
        app = create_app(settings, db=db)
        async with serving(app, settings, port=port) as bound:
            hub = Hub(f"ws://127.0.0.1:{bound}/ws", app, db, settings)
            await wait_for(lambda: hub.service.listener.connected, "listener connected")
            yield hub
    finally:
        await db.close()


async def wait_for(predicate: Any, what: str, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class WsClient:
    ws: ClientConnection
    ready: dict[str, Any]
    received: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self, within: float = 10.0) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), within))
        self.received.append(frame)
        return frame

    async def expect(self, kind: str, within: float = 10.0) -> dict[str, Any]:
        """The next frame that is not an event... or of ``kind``; events seen meanwhile are kept."""
        while True:
            frame = await self.recv(within)
            if frame["type"] == kind:
                return frame
            if frame["type"] != "event":
                raise AssertionError(f"expected {kind}, got {frame}")

    async def subscribe(self, **fields: Any) -> dict[str, Any]:
        await self.send({"type": "subscribe", **fields})
        return await self.expect("subscribed")

    async def events(self, count: int, within: float = 10.0) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        while len(got) < count:
            frame = await self.recv(within)
            if frame["type"] == "event":
                got.append(frame)
        return got

    async def no_event(self, wait: float = 0.3) -> None:
        try:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), wait))
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame {frame}")

    async def closed(self, within: float = 10.0) -> tuple[int | None, str | None]:
        """Read until the server closes; returns (code, reason)."""
        try:
            while True:
                await asyncio.wait_for(self.ws.recv(), within)
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            return (rcvd.code, rcvd.reason) if rcvd else (None, None)

    async def close(self) -> None:
        await self.ws.close()


async def open_client(
    url: str, token: str | None = None, *, header: bool = False, **connect_args: Any
) -> WsClient:
    headers = {"Authorization": f"Bearer {token}"} if header and token else None
    ws = await connect(url, additional_headers=headers, max_size=2**22, **connect_args)
    if token is not None and not header:
        await ws.send(json.dumps({"type": "auth", "token": token}))
    frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert frame["type"] == "ready", frame
    return WsClient(ws, frame)


async def stream_token(db: KeenDatabase, user_id: uuid.UUID, **kwargs: Any) -> str:
    issued = await db.tokens.issue(user_id, "session", scopes=["stream"], **kwargs)
    return issued.token.get_secret_value()


@asynccontextmanager
async def late_close_proxy(
    dsn: str, server: asyncpg.Connection, *, delay: float, stall_first: bytes | None = None
) -> AsyncIterator[str]:
    """``dsn`` routed through a TCP proxy to the PostgreSQL ``server`` is connected to.

    Bytes pass at once both ways, but when PostgreSQL closes a connection the client sees the
    close only ``delay`` seconds later: like a terminated backend that sends its FATAL message
    and is then slow to exit (a loaded machine), or a network that delivers the FIN late.
    ``stall_first``: the first connection whose startup message contains these bytes (an
    application_name, say) goes silent once logged in: nothing the client sends after the
    server's first ReadyForQuery reaches the server, and no error ever comes back (a
    connection that died silently). TLS is off so the startup message can be read.
    """
    stalled = False

    def should_stall(first_chunk: bytes) -> bool:
        nonlocal stalled
        if stall_first is None or stalled or stall_first not in first_chunk:
            return False
        stalled = True
        return True

    where = await server.fetchrow(
        "SELECT host(inet_server_addr()) AS host, inet_server_port() AS port,"
        " split_part(current_setting('unix_socket_directories'), ',', 1) AS dir,"
        " current_setting('port') AS unix_port"
    )
    upstream: Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
    if where["host"] is not None:
        upstream = lambda: asyncio.open_connection(where["host"], where["port"])  # noqa: E731
    else:
        path = f"{where['dir'].strip()}/.s.PGSQL.{where['unix_port']}"
        upstream = lambda: asyncio.open_unix_connection(path)  # noqa: E731
    pipes: set[asyncio.Task[None]] = set()

    async def pipe(
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        late: float = 0.0,
        *,
        silent_once: asyncio.Event | None = None,
        logs_in: asyncio.Event | None = None,
    ) -> None:
        """Copy src to dst; after src's end wait ``late`` before closing dst. Nothing passes
        once ``silent_once`` is set; ``logs_in`` is set at the first ReadyForQuery seen."""
        try:
            while data := await src.read(65536):
                if silent_once is None or not silent_once.is_set():
                    dst.write(data)
                    await dst.drain()
                if logs_in is not None and b"Z\x00\x00\x00\x05" in data:
                    logs_in.set()
            await asyncio.sleep(late)
        except OSError:
            pass
        finally:
            dst.close()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await upstream()
        except OSError:
            writer.close()
            return
        first = await reader.read(65536)  # the startup message (TLS is off)
        up_writer.write(first)
        logged_in = asyncio.Event() if should_stall(first) else None
        for task in (
            pipe(reader, up_writer, silent_once=logged_in),
            pipe(up_reader, writer, delay, logs_in=logged_in),
        ):
            t = asyncio.create_task(task)
            pipes.add(t)
            t.add_done_callback(pipes.discard)

    proxy = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    parts = urlsplit(dsn)
    user = parts.netloc.rpartition("@")[0] or await server.fetchval("SELECT current_user")
    params = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "port", "sslmode")]
    query = urlencode([*params, ("sslmode", "disable")])
    query = f"?{query}" if query else ""
    try:
        yield f"{parts.scheme}://{user}@127.0.0.1:{port}{parts.path}{query}"
    finally:
        proxy.close()
        for t in list(pipes):
            t.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        await proxy.wait_closed()
