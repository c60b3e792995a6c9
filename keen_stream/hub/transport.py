"""The hub's sockets: caps and deadlines below the application, where strangers are cheap.

uvicorn lets a connection wait forever for its HTTP request, accepts sockets until the process
runs out of file descriptors, and closes a socket by waiting for its write buffer to drain (which
a peer that does not read never lets happen). One ``ConnectionGuard`` per server (made by
``keen_stream.hub.cli.uvicorn_config``) is shared by the HTTP and WebSocket protocol classes
bound to it (``protocol_classes``):

- at accept, a socket over a cap (per client address, overall, or not yet authenticated) is
  closed before anything is read from it;
- an HTTP request, a WebSocket handshake included, must be complete and answered within
  ``hub_handshake_timeout`` of the connection's start or of the previous response;
- a WebSocket that is closing is cut (aborted) when its peer has not taken the rest within
  ``hub_close_timeout``: a descriptor is never left to a peer that stopped reading;
- an authenticated WebSocket that stops answering keepalive pings is handed back to the hub
  (``GuardedWebSocketProtocol.mark_authenticated``), which closes it as too slow (4008) with its
  resume point, instead of uvicorn's 1011 behind a backlog the peer will never read.

A socket counts against the caps from accept to ``connection_lost``, whichever protocol owns it
then (after an upgrade, the WebSocket one). Nothing here runs per frame.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final, cast

from uvicorn._types import ASGISendEvent
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from keen_stream.settings import Settings

logger = logging.getLogger(__name__)

#: Why a socket was refused at accept, in the order the caps are checked.
CAPS: Final = ("address", "total", "unauthenticated")
_WARN_EVERY = 60.0  # seconds between two warnings about the same cap (an attack is loud enough)


@dataclass(slots=True)
class SocketStats:
    """Plain counters, read by /metrics and /healthz."""

    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CAPS, 0))
    handshake_timeouts: int = 0
    keepalive_timeouts: int = 0
    cut: int = 0


class _Ticket:
    __slots__ = ("address", "authenticated")

    def __init__(self, address: str | None) -> None:
        self.address = address
        self.authenticated = False


def address_key(host: str) -> str:
    """What the per-address cap counts: an IPv4 address, or an IPv6 address's /64 (a home or a
    server usually gets a whole /64, so single IPv6 addresses would cost an attacker nothing)."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return host


class ConnectionGuard:
    """Counts this server's sockets and refuses those over the caps (0: no cap)."""

    def __init__(
        self,
        *,
        max_connections: int,
        max_per_address: int,
        max_unauthenticated: int,
        handshake_timeout: float,
        close_grace: float,
    ) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.max_unauthenticated = max_unauthenticated
        self.handshake_timeout = handshake_timeout
        self.close_grace = close_grace
        self.stats = SocketStats()
        #: Sockets not authenticated yet (HTTP requests and WebSockets before their auth).
        self.unauthenticated = 0
        self._tickets: dict[object, _Ticket] = {}  # by transport
        self._per_address: dict[str, int] = {}
        self._warned: dict[str, tuple[float, int]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionGuard:
        return cls(
            max_connections=settings.hub_max_connections,
            max_per_address=settings.hub_max_connections_per_address,
            max_unauthenticated=settings.hub_max_unauthenticated,
            handshake_timeout=settings.hub_handshake_timeout,
            close_grace=settings.hub_close_timeout,
        )

    @property
    def open(self) -> int:
        return len(self._tickets)

    def admit(self, transport: object, peer: tuple[str, int] | None) -> bool:
        """Count a new socket, or refuse it (False) when it would pass a cap."""
        # A Unix-socket peer has no address: it is a local proxy, subject to the overall caps.
        address = address_key(peer[0]) if peer else None
        cap = self._over_cap(address)
        if cap is not None:
            self.stats.refused[cap] += 1
            self._warn(cap)
            return False
        self._tickets[transport] = _Ticket(address)
        self.unauthenticated += 1
        if address is not None:
            self._per_address[address] = self._per_address.get(address, 0) + 1
        return True

    def _over_cap(self, address: str | None) -> str | None:
        per_address = self.max_per_address
        if address is not None and per_address and self._per_address.get(address, 0) >= per_address:
            return "address"
        if self.max_connections and len(self._tickets) >= self.max_connections:
            return "total"
        if self.max_unauthenticated and self.unauthenticated >= self.max_unauthenticated:
            return "unauthenticated"
        return None

    def authenticated(self, transport: object) -> None:
        """The socket's client authenticated: it no longer counts against the stranger cap."""
        ticket = self._tickets.get(transport)
        if ticket is not None and not ticket.authenticated:
            ticket.authenticated = True
            self.unauthenticated -= 1

    def release(self, transport: object) -> None:
        """The socket is gone (idempotent: either protocol of an upgraded socket may call it)."""
        ticket = self._tickets.pop(transport, None)
        if ticket is None:
            return
        if not ticket.authenticated:
            self.unauthenticated -= 1
        address = ticket.address
        if address is not None:
            left = self._per_address[address] - 1
            if left:
                self._per_address[address] = left
            else:
                del self._per_address[address]

    def _warn(self, cap: str) -> None:
        now = time.monotonic()
        since, count = self._warned.get(cap, (float("-inf"), 0))
        count += 1
        if now - since < _WARN_EVERY:
            self._warned[cap] = (since, count)
            return
        self._warned[cap] = (now, 0)
        logger.warning(
            "refused %d connection(s) over the %s cap since the last warning; "
            "open sockets: %d, unauthenticated: %d",
            count,
            cap,
            self.open,
            self.unauthenticated,
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "open": self.open,
            "unauthenticated": self.unauthenticated,
            "addresses": len(self._per_address),
            "refused": dict(self.stats.refused),
            "handshake_timeouts": self.stats.handshake_timeouts,
            "keepalive_timeouts": self.stats.keepalive_timeouts,
            "cut": self.stats.cut,
        }


# --- protocol classes -----------------------------------------------------------------------
if TYPE_CHECKING:
    _HttpBase = H11Protocol
else:
    _HttpBase = object


class _GuardedHttp(_HttpBase):
    """Mixed into uvicorn's HTTP protocol (h11 or httptools: the same hooks)."""

    guard: ClassVar[ConnectionGuard]
    _deadline: asyncio.TimerHandle | None = None
    _on_shutdown: Callable[[], None] | None = None

    def streaming(self, on_shutdown: Callable[[], None]) -> None:
        """An authenticated client's response streams for as long as it lasts (server-sent
        events): no deadline for it (its own send-buffer and stall rules apply), off the
        stranger cap, and ``on_shutdown`` ends it when the server shuts down (uvicorn waits for
        responses to finish before the application's shutdown runs)."""
        self._disarm()
        self._on_shutdown = on_shutdown
        self.guard.authenticated(self.transport)

    def shutdown(self) -> None:
        super().shutdown()
        handler, self._on_shutdown = self._on_shutdown, None
        if handler is not None:
            handler()

    def on_response_complete(self) -> None:
        self._on_shutdown = None
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request gets its own deadline

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.admit(transport, self.client):
            transport.abort()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.guard.release(self.transport)
        super().connection_lost(exc)

    def handle_websocket_upgrade(self, *args: Any) -> None:
        # The request is complete; from here the hub's auth timeout and the keepalive rule.
        self._disarm()
        super().handle_websocket_upgrade(*args)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.guard.handshake_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if (
            cycle is not None
            and not cycle.more_body
            and not cycle.response_complete
            and not self.flow.write_paused
            and not self.transport.is_closing()
        ):
            # The request is in and the application is still answering (/healthz waits for a
            # pooled connection at most pool_acquire_timeout): not the client's doing.
            self._arm()
            return
        # No complete request in time, or a response the peer does not read.
        self.guard.stats.handshake_timeouts += 1
        self.transport.abort()


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol with bounded closes and the hub's keepalive rule."""

    guard: ClassVar[ConnectionGuard]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # uvicorn waits a fixed 10 s for the peer to answer a close frame.
        self.close_timeout = self.guard.close_grace
        self._cut_timer: asyncio.TimerHandle | None = None
        self._close_timer_replaced = False
        self._on_keepalive_timeout: Callable[[], None] | None = None

    def mark_authenticated(self, on_keepalive_timeout: Callable[[], None]) -> None:
        """The hub authenticated this client: stop counting it as a stranger, and let the hub
        decide what a keepalive timeout means for it."""
        self._on_keepalive_timeout = on_keepalive_timeout
        self.guard.authenticated(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._cut_timer is not None:
            self._cut_timer.cancel()
            self._cut_timer = None
        self.guard.release(self.transport)
        super().connection_lost(exc)

    def keepalive_timeout(self) -> None:
        timeout = self.ping_timeout
        if (
            self.read_paused
            and timeout is not None
            and not (self.close_sent or self.transport.is_closing())
        ):
            # uvicorn stops reading while a received frame waits for the hub (flow control),
            # and the hub handles a client's frames one at a time, a resume's whole replay
            # inside its subscribe: the pong may be sitting unread. Not the client's fault;
            # wait again (a replay that stalls on a client that does not read ends in 4008
            # by its own rule).
            self.pong_timer = self.loop.call_later(timeout, self.keepalive_timeout)
            return
        handler = self._on_keepalive_timeout
        if handler is None or self.close_sent or self.transport.is_closing():
            super().keepalive_timeout()
            self._cut_if_stuck()
            return
        # A client that does not answer pings has almost always stopped reading (a dead peer
        # looks the same); uvicorn would queue a 1011 behind a backlog it will never read.
        self.pong_timer = None
        self.pending_ping_payload = None
        self.guard.stats.keepalive_timeouts += 1
        handler()

    # Every path that closes the transport (a close frame sent or received, the application
    # ending, a server shutdown) is followed by _cut_if_stuck.
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._cut_if_stuck()

    async def send(self, message: ASGISendEvent) -> None:
        try:
            await super().send(message)
        finally:
            if self.close_timer is not None and not self._close_timer_replaced:
                self._close_timer_replaced = True
                self.close_timer.cancel()
                self.close_timer = self.loop.call_later(self.close_timeout, self._close_now)
            self._cut_if_stuck()

    async def run_asgi(self) -> None:
        try:
            await super().run_asgi()
        finally:
            self._cut_if_stuck()

    def shutdown(self) -> None:
        super().shutdown()
        self._cut_if_stuck()

    def _close_now(self) -> None:
        """The peer did not answer our close frame in time."""
        self.transport.close()
        self._cut_if_stuck()

    def _cut_if_stuck(self) -> None:
        if self._cut_timer is None and not self.disconnected and self.transport.is_closing():
            # A closing transport waits for its buffer to drain, forever if the peer never reads.
            self._cut_timer = self.loop.call_later(self.guard.close_grace, self._cut)

    def _cut(self) -> None:
        self._cut_timer = None
        if not self.disconnected:
            self.guard.stats.cut += 1
            self.transport.abort()


def protocol_classes(
    guard: ConnectionGuard, http: str
) -> tuple[type[asyncio.Protocol], type[asyncio.Protocol]]:
    """uvicorn ``http=`` and ``ws=`` classes bound to ``guard``; ``http``: "h11" or "httptools"."""
    base: type[asyncio.Protocol] = H11Protocol
    if http == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base = HttpToolsProtocol
    http_class = type("GuardedHttpProtocol", (_GuardedHttp, base), {"guard": guard})
    ws_class = type("GuardedWebSocketProtocol", (GuardedWebSocketProtocol,), {"guard": guard})
    return cast(type[asyncio.Protocol], http_class), ws_class


def guarded_http(send: Any) -> _GuardedHttp | None:
    """The guarded HTTP protocol behind an ASGI ``send`` (its request-response cycle's)."""
    cycle = getattr(send, "__self__", None)
    proto = getattr(getattr(cycle, "on_response", None), "__self__", None)
    return proto if isinstance(proto, _GuardedHttp) else None


def guarded_protocol(send: Any) -> GuardedWebSocketProtocol | None:
    """The guarded protocol behind an ASGI ``send`` (None under another server or protocol)."""
    proto = getattr(send, "__self__", None)
    return proto if isinstance(proto, GuardedWebSocketProtocol) else None
