"""``keen-stream serve [--host H] [--port P]``: run one hub node under uvicorn.

It checks the database before it listens (a refusal is one line and exit 2), then logs where it
listens, the database (password hidden), the schema revision and the node id, and a line per
WebSocket connection (keen_stream/hub/connection.py), as text or JSON (keen_stream/logs.py).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

import uvicorn

from keen_stream import logs
from keen_stream.errors import ConfigurationError, KeenError
from keen_stream.settings import Settings, redact_dsn

if TYPE_CHECKING:
    from keen_stream.dal.database import KeenDatabase
    from keen_stream.hub.app import HubApp

logger = logging.getLogger(__name__)

#: Descriptors kept for everything but clients: the database pool, the listener, logs, imports.
_SPARE_FDS = 100


def uvicorn_config(
    app: Any, settings: Settings, *, host: str, port: int, **extra: Any
) -> uvicorn.Config:
    """uvicorn settings the hub depends on.

    ``websockets-sansio`` is the protocol the fan-out fast path writes through; per-message
    deflate is off (a compressor per connection costs ~100 KB and makes every client's bytes
    different, so a frame could no longer be encoded once); incoming frames are capped at
    ``hub_max_frame_bytes`` (close 1009 above it). Its class and the HTTP one are bound to a new
    ``ConnectionGuard`` (socket caps and deadlines: keen_stream/hub/transport.py), which the hub
    app, when ``app`` is one, reports in /metrics and /healthz.
    """
    from keen_stream.hub.app import HubApp
    from keen_stream.hub.transport import ConnectionGuard, protocol_classes

    has_uvloop = importlib.util.find_spec("uvloop") is not None
    has_httptools = importlib.util.find_spec("httptools") is not None
    guard = ConnectionGuard.from_settings(settings)
    http_class, ws_class = protocol_classes(guard, "httptools" if has_httptools else "h11")
    if isinstance(app, HubApp):
        app.guard = guard
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "ws": ws_class,
        "ws_max_size": settings.hub_max_frame_bytes,
        "ws_per_message_deflate": False,
        "ws_ping_interval": settings.hub_ws_ping_interval,
        "ws_ping_timeout": settings.hub_ws_ping_interval,
        "loop": "uvloop" if has_uvloop else "asyncio",
        "http": http_class,
        "lifespan": "on",
        "access_log": False,
        # uvicorn's loggers go through the process's own handler (keen_stream.logs: text or
        # JSON like every other line), not a configuration of uvicorn's.
        "log_config": None,
        "log_level": "warning",
        "proxy_headers": False,
    }
    options.update(extra)
    return uvicorn.Config(app, **options)


class _HostedServer(uvicorn.Server):
    """uvicorn inside an event loop its caller runs: signals stay the caller's to handle.

    uvicorn's own handlers would swallow Ctrl-C into a graceful stop of the server alone and
    raise it again only once the server has stopped; the caller (a test, ``keen-stream demo``)
    wants its task cancelled at once, so that its own cleanup runs in order.
    """

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@asynccontextmanager
async def serving(
    app: Any,
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    start_timeout: float = 30.0,
    **extra: Any,
) -> AsyncIterator[int]:
    """Serve ``app`` (with :func:`uvicorn_config`) in the running event loop; yields the port.

    ``port`` 0: a free one. The socket is bound here with SO_REUSEADDR, so a server started
    again may take the port of one that stopped. On exit the server stops gracefully.
    """
    server = _HostedServer(
        uvicorn_config(app, settings, host=host, port=port, loop="none", **extra)
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + start_timeout
            while not server.started and not task.done():
                if loop.time() > deadline:
                    raise TimeoutError(f"the hub did not start within {start_timeout} s")
                await asyncio.sleep(0.01)
            if not server.started:
                # uvicorn logs a failed lifespan and returns; anything else it raises.
                cause = None if task.cancelled() else task.exception()
                raise RuntimeError("the hub stopped while starting (see the log above)") from cause
            yield int(sock.getsockname()[1])
        finally:
            server.should_exit = True
            await asyncio.wait([task], timeout=30)
            if not task.done():  # a stuck shutdown: cut it
                task.cancel()
                await asyncio.wait([task])
            # Retrieved here so a failure is raised (or chained), never reported at GC.
            failure = None if task.cancelled() else task.exception()
        if failure is not None:
            raise failure
    finally:
        sock.close()


def raise_open_file_limit(settings: Settings) -> tuple[int, int]:
    """Raise this process's soft limit of open files to the hard limit; returns (before, after).

    Every client is a file descriptor, and a soft limit of 1024 (a common default) would refuse
    clients long before ``hub_max_connections``; only the hard limit is the operator's choice.
    """
    try:
        import resource
    except ImportError:  # not on this platform
        return (0, 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = soft
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            target = hard
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    if target != soft:
        logger.info("raised the open-file limit (RLIMIT_NOFILE) from %d to %d", soft, target)
    wanted = settings.hub_max_connections
    if wanted and target != resource.RLIM_INFINITY and wanted + _SPARE_FDS > target:
        logger.warning(
            "KEEN_HUB_MAX_CONNECTIONS (%d) does not fit in %d open files (%d spare for the "
            "database and logs): raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower it",
            wanted,
            target,
            _SPARE_FDS,
        )
    return soft, target


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    logs.configure(args.log_level.upper(), args.log_format or settings.log_format, replace=True)
    host = args.host or settings.hub_host
    port = settings.hub_port if args.port is None else args.port
    raise_open_file_limit(settings)
    loop_factory = None
    if importlib.util.find_spec("uvloop") is not None:  # what uvicorn_config asks for
        import uvloop

        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(serve(settings, host, port))
    except KeyboardInterrupt:  # Ctrl-C: uvicorn stopped gracefully, then passed the signal on
        return 130


async def open_database(settings: Settings) -> tuple[KeenDatabase, str]:
    """The database ``serve`` runs on, and its schema revision, checked before anything listens.

    Unreachable, unsafe for tenant work (``check_role_safety``), never migrated or at an older
    revision than this release's: a :class:`KeenError` whose message says which and what to do
    (``keen-stream`` prints it as one line and exits 2), never a traceback from the lifespan.
    """
    from keen_stream.dal.database import KeenDatabase
    from keen_stream.migrate import heads, revision_state

    where = redact_dsn(settings.database_url) if settings.database_url else "the embedded server"
    try:
        db = await KeenDatabase.connect(settings=settings)
    except KeenError as exc:
        raise type(exc)(f"cannot serve on {where}: {exc}") from exc
    try:
        revision = await db.schema_revision()
        state = revision_state(revision)
        if state == "behind":
            raise ConfigurationError(
                f"cannot serve on {where}: its schema is at revision {revision or '(none)'},"
                f" this release needs {', '.join(heads())}: run `keen-stream migrate`"
            )
        if state == "newer":
            logger.warning(
                "the database's schema revision %s is newer than this release knows (%s):"
                " serving, as a release whose migrations only add allows",
                revision,
                ", ".join(heads()),
            )
    except BaseException:
        await db.close()
        raise
    return db, revision or ""


async def serve(settings: Settings, host: str, port: int) -> int:
    """Check the database, then run the hub under uvicorn until it is told to stop."""
    from keen_stream.hub.app import create_app

    db, revision = await open_database(settings)
    try:
        app = create_app(settings, db=db, close_db=True, freeze_gc=True)
        server = _Server(uvicorn_config(app, settings, host=host, port=port))
        server.on_started = lambda: _announce(server, app, db, revision)
        try:
            await server.serve()
        except SystemExit:  # uvicorn's answer to a failed bind (logged): its 3 is our not-found
            return 1
        return 0 if server.started else 1
    finally:
        await db.close()  # the lifespan closed it unless the server never started


class _Server(uvicorn.Server):
    """uvicorn's server, calling ``on_started`` once it listens (the app's lifespan has run)."""

    on_started: Callable[[], None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_started is not None:
            self.on_started()


def _announce(server: uvicorn.Server, app: HubApp, db: KeenDatabase, revision: str) -> None:
    """Where the hub listens, on which database, at which revision, as which node."""
    addresses = []
    for listener in server.servers:
        for sock in listener.sockets:
            host, port = sock.getsockname()[:2]
            addresses.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    service = app.service
    node_id = str(service.node_id) if service is not None else None
    database = redact_dsn(db.dsn)
    logger.info(
        "hub listening on %s (WebSocket /ws, monitor /monitor/); database %s; schema revision "
        "%s; node %s",
        ", ".join(f"http://{a}" for a in addresses),
        database,
        revision,
        node_id,
        extra={
            "event": "hub.started",
            "listen": addresses,
            "database": database,
            "schema_revision": revision,
            "node_id": node_id,
            "pid": os.getpid(),
        },
    )


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="run the streaming hub: WebSocket /ws, /healthz, /metrics "
        "(embedded PostgreSQL when KEEN_DATABASE_URL is unset)",
    )
    p.add_argument("--host", default=None, help="default: KEEN_HUB_HOST (127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="default: KEEN_HUB_PORT (8765)")
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=None,
        help="text, or one JSON object a line (default: KEEN_LOG_FORMAT, text)",
    )
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="default info: the start line and a line per WebSocket connection opened and closed",
    )
    p.set_defaults(func=cmd_serve)
