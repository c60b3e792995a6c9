"""``keen-stream serve [--host H] [--port P]``: run one hub node under uvicorn."""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

import uvicorn

from keen_stream.settings import Settings


def uvicorn_config(
    app: Any, settings: Settings, *, host: str, port: int, **extra: Any
) -> uvicorn.Config:
    """uvicorn settings the hub depends on.

    ``websockets-sansio`` is the protocol the fan-out fast path writes through; per-message
    deflate is off (a compressor per connection costs ~100 KB and makes every client's bytes
    different, so a frame could no longer be encoded once); incoming frames are capped at
    ``hub_max_frame_bytes`` (close 1009 above it).
    """
    has_uvloop = importlib.util.find_spec("uvloop") is not None
    has_httptools = importlib.util.find_spec("httptools") is not None
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "ws": "websockets-sansio",
        "ws_max_size": settings.hub_max_frame_bytes,
        "ws_per_message_deflate": False,
        "ws_ping_interval": settings.hub_ws_ping_interval,
        "ws_ping_timeout": settings.hub_ws_ping_interval,
        "loop": "uvloop" if has_uvloop else "asyncio",
        "http": "httptools" if has_httptools else "h11",
        "lifespan": "on",
        "access_log": False,
        "log_level": "warning",
        "proxy_headers": False,
    }
    options.update(extra)
    return uvicorn.Config(app, **options)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from keen_stream.hub.app import create_app

    host = args.host or settings.hub_host
    port = settings.hub_port if args.port is None else args.port
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
