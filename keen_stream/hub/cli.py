"""``keen-stream serve [--host H] [--port P]``: run one hub node under uvicorn."""

from __future__ import annotations

import argparse
import importlib.util
import logging
from typing import Any

import uvicorn

from keen_stream.settings import Settings

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
        "log_level": "warning",
        "proxy_headers": False,
    }
    options.update(extra)
    return uvicorn.Config(app, **options)


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
    from keen_stream.hub.app import create_app

    host = args.host or settings.hub_host
    port = settings.hub_port if args.port is None else args.port
    raise_open_file_limit(settings)
    app = create_app(settings, freeze_gc=True)
    server = uvicorn.Server(uvicorn_config(app, settings, host=host, port=port))
    server.run()
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="run the streaming hub: WebSocket /ws, /healthz, /metrics "
        "(embedded PostgreSQL when KEEN_DATABASE_URL is unset)",
    )
    p.add_argument("--host", default=None, help="default: KEEN_HUB_HOST (127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="default: KEEN_HUB_PORT (8765)")
    p.set_defaults(func=cmd_serve)
