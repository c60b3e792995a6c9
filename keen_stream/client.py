"""A Python client for the keen_stream hub (docs/protocol.md, "A Python client").

::

    async with StreamClient(["ws://hub-a:8000/ws", "ws://hub-b:8000/ws"], token=token) as stream:
        async for event in stream.subscribe(sessions=[session_id], since=saved_cursor):
            saved_cursor = event.cursor
            ...

The client reconnects by itself (exponential backoff with jitter, round robin over the URLs),
authenticates again, and resubscribes with ``since`` = the cursor of the last event it handed
out, so the caller sees every event once, in cursor order. What it cannot repair it raises, as
one of the exceptions below (all :class:`StreamError`).

It speaks the protocol only: it imports neither the data layer nor the hub (an import-linter
contract in pyproject.toml). Its exceptions belong to keen_stream's one hierarchy
(:class:`~keen_stream.errors.KeenError`), under :class:`StreamError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from keen_stream.errors import KeenError

__all__ = [
    "AccountInactive",
    "AuthenticationFailed",
    "Event",
    "StreamClient",
    "StreamClosed",
    "StreamError",
    "StreamGap",
    "StreamUnavailable",
    "Subscription",
    "SubscriptionRejected",
    "TokenExpired",
    "TokenRejected",
    "TokenRevoked",
    "parse_cursor",
]

logger = logging.getLogger(__name__)

_CURSOR: Final = re.compile(r"^[0-9]{1,19}-[0-9]{1,19}$")

#: A token, or a callable that returns one (called at every connection attempt).
TokenProvider = Callable[[], str | Awaitable[str]]
#: Called with the :class:`StreamGap` instead of raising it; the stream then goes on.
GapHandler = Callable[["StreamGap"], object]


# --- exceptions -----------------------------------------------------------------------------
class StreamError(KeenError):
    """A stream ended with something the client cannot repair by reconnecting."""

    code = "stream_error"


class StreamClosed(StreamError):
    """The hub closed the connection with a code that says retrying will not help."""

    code = "stream_closed"

    def __init__(self, close_code: int, reason: str = "") -> None:
        super().__init__(f"the hub closed the connection: {close_code} {reason}".rstrip())
        #: The WebSocket close code (docs/protocol.md).
        self.close_code = close_code
        self.reason = reason


class AuthenticationFailed(StreamClosed):
    """The hub refused the authentication (4001: no token, or one in the URL)."""


class TokenRejected(AuthenticationFailed):
    """The token is unknown, malformed, or lacks the required scope (4003)."""


class TokenExpired(TokenRejected):
    """The token expired (4004). With a ``token_provider`` the client reconnects once with a
    fresh token when it expires while connected; it raises this when the new one fails too."""


class TokenRevoked(TokenRejected):
    """The token was revoked (4005): log in again."""


class AccountInactive(AuthenticationFailed):
    """The account is suspended or deactivated (4006)."""


class SubscriptionRejected(StreamError):
    """The hub refused the subscribe frame (an ``error`` frame: ``session_not_found``,
    ``forbidden``, ``invalid_cursor``, ...)."""

    code = "subscription_rejected"

    def __init__(self, error_code: str, message: str) -> None:
        super().__init__(f"{error_code}: {message}")
        #: The ``code`` of the hub's ``error`` frame.
        self.error_code = error_code


class StreamGap(StreamError):
    """``recovered: false``: the hub cannot give the events since the resume point (``reason``
    ``since_expired`` or ``since_unknown``). Reload state, then follow from ``cursor``."""

    def __init__(self, reason: str, cursor: str, since: str | None) -> None:
        super().__init__(f"events after {since} cannot be recovered ({reason}); resume at {cursor}")
        self.reason = reason
        self.cursor = cursor
        self.since = since


class StreamUnavailable(StreamError):
    """``max_attempts`` connection or subscribe attempts in a row failed (the cause is chained)."""


#: Close codes after which a new attempt cannot succeed: the typed exception to raise.
_FATAL_CLOSES: Final[dict[int, type[StreamClosed]]] = {
    1009: StreamClosed,  # a frame over 64 KB: a client bug
    4001: AuthenticationFailed,
    4003: TokenRejected,
    4004: TokenExpired,
    4005: TokenRevoked,
    4006: AccountInactive,
}
#: ``error`` codes after which the same subscribe is sent again (after a backoff).
_RETRY_ERRORS: Final = frozenset({"unavailable", "since_expired", "rate_limited", "internal_error"})


# --- events ---------------------------------------------------------------------------------
def parse_cursor(text: str) -> tuple[int, int]:
    """A cursor ``"<xid>-<id>"`` as the pair of integers it is ordered by; ValueError if not one.

    Cursors are opaque to applications; the client compares them to drop repeats."""
    if not isinstance(text, str) or not _CURSOR.match(text):
        raise ValueError(f"not a stream cursor: {text!r}")
    xid, _, event_id = text.partition("-")
    return int(xid), int(event_id)


class Event(BaseModel):
    """One ``event`` frame (docs/protocol.md, section 3)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    type: Literal["event"] = "event"
    #: The event's position; the ``since`` to resume after it.
    cursor: str
    #: Grows with every change of the same entity (session or credit account).
    version: int
    event_type: str
    user_id: uuid.UUID
    session_id: uuid.UUID | None = None
    root_session_id: uuid.UUID | None = None
    #: When the writing transaction started.
    time: datetime
    #: The payload; money is a decimal string.
    data: dict[str, Any]

    @property
    def position(self) -> tuple[int, int]:
        return parse_cursor(self.cursor)


# --- the client -----------------------------------------------------------------------------
class _Retry(Exception):
    """This connection is over; connect again (after a backoff)."""

    def __init__(self, why: str, *, failed: bool = True) -> None:
        super().__init__(why)
        #: False when the connection had worked (a restart, a drop): the backoff starts over.
        self.failed = failed


class StreamClient:
    """Follow the hub's event stream; see the module docstring.

    ``urls``: one hub URL or several (tried round robin). ``token`` or ``token_provider`` (a
    callable, plain or async, called at every connection attempt). ``backoff_initial`` /
    ``backoff_max``: seconds; every wait is drawn between half and all of
    ``min(backoff_max, backoff_initial * 2**failures)``. ``max_attempts``: raise
    :class:`StreamUnavailable` after that many failed attempts in a row (None: never give up).
    ``ping_interval`` / ``ping_timeout``: WebSocket pings that detect a dead connection.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        client_type: str | None = "python",
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        max_attempts: int | None = None,
        open_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        max_size: int = 2**20,
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("at least one hub URL is needed")
        if (token is None) == (token_provider is None):
            raise ValueError("pass either token or token_provider")
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("backoff_initial must be > 0 and at most backoff_max")
        self._token = token
        self._token_provider = token_provider
        self.client_type = client_type
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.max_attempts = max_attempts
        self.open_timeout = open_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.max_size = max_size
        self._next_url = 0
        self._subscriptions: set[Subscription] = set()
        self._closed = False

    async def __aenter__(self) -> StreamClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """End every subscription and close its connection."""
        self._closed = True
        for subscription in list(self._subscriptions):
            await subscription.aclose()

    def subscribe(
        self,
        *,
        scope: Literal["mine", "sessions", "all"] | None = None,
        sessions: Sequence[uuid.UUID | str] | None = None,
        events: Sequence[str] | None = None,
        since: str | None = None,
        on_gap: GapHandler | None = None,
    ) -> Subscription:
        """The events matching the subscription (docs/protocol.md, section 2), as an async
        iterator of :class:`Event`, on a connection of its own.

        ``since``: resume after this cursor. ``on_gap``: called (plain or async) with the
        :class:`StreamGap` when missed events cannot be recovered, after which the stream goes
        on from the gap's cursor; without it the iterator raises the StreamGap."""
        if self._closed:
            raise RuntimeError("the client is closed")
        if since is not None:
            parse_cursor(since)
        frame: dict[str, Any] = {"type": "subscribe", "id": "keen-client"}
        if scope is not None:
            frame["scope"] = scope
        if sessions is not None:
            frame["sessions"] = [str(s) for s in sessions]
        if events is not None:
            frame["events"] = list(events)
        subscription = Subscription(self, frame, since, on_gap)
        self._subscriptions.add(subscription)
        return subscription

    # -- internals used by Subscription --
    def _url(self) -> str:
        url = self.urls[self._next_url % len(self.urls)]
        self._next_url += 1
        return url

    def _delay(self, failures: int) -> float:
        ceiling = min(self.backoff_max, self.backoff_initial * 2 ** min(failures, 30))
        if failures == 0:  # the connection had worked: a little jitter so clients spread out
            return random.uniform(0, self.backoff_initial)
        return random.uniform(ceiling / 2, ceiling)

    async def _token_now(self) -> str:
        if self._token_provider is None:
            assert self._token is not None
            return self._token
        value = self._token_provider()
        if inspect.isawaitable(value):
            value = await value
        if not isinstance(value, str) or not value:
            raise TypeError("token_provider must return a non-empty string")
        return value

    async def _open(self, url: str) -> tuple[ClientConnection, dict[str, Any]]:
        """A connection that is authenticated: the socket and the ``ready`` frame."""
        headers = {"Authorization": f"Bearer {await self._token_now()}"}
        if self.client_type:
            headers["X-Keen-Client-Type"] = self.client_type
        ws = await connect(
            url,
            additional_headers=headers,
            open_timeout=self.open_timeout,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            max_size=self.max_size,
            close_timeout=2.0,
        )
        try:
            ready = json.loads(await asyncio.wait_for(ws.recv(), self.open_timeout))
            if not isinstance(ready, dict) or ready.get("type") != "ready":
                raise _Retry(f"expected a ready frame, got {str(ready)[:200]}")
        except BaseException:
            await ws.close()
            raise
        return ws, ready


class Subscription:
    """The iterator :meth:`StreamClient.subscribe` returns (also an async context manager).

    ``cursor``: the resume point, the cursor of the last event handed out (or where the
    subscription started); persist it to resume in another process. ``ready``: the last
    ``ready`` frame (``connection_id``, ``user_id``, ``admin``)."""

    def __init__(
        self,
        client: StreamClient,
        frame: dict[str, Any],
        since: str | None,
        on_gap: GapHandler | None,
    ) -> None:
        self._client = client
        self._frame = frame
        self._on_gap = on_gap
        self.cursor: str | None = since
        self._last: tuple[int, int] | None = None if since is None else parse_cursor(since)
        self.ready: dict[str, Any] | None = None
        self.reconnects = 0
        self._ws: ClientConnection | None = None
        self._failures = 0
        self._closing = False
        self._gen = self._run()

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` was called."""
        return self._closing

    def _stopping(self) -> bool:
        return self._closing

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        return await self._gen.__anext__()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop: close the connection; the iterator ends."""
        self._closing = True
        self._client._subscriptions.discard(self)
        if self._ws is not None:
            await self._ws.close()
        # RuntimeError: being iterated in another task, which sees _closing and ends.
        with contextlib.suppress(RuntimeError):
            await self._gen.aclose()

    def _failed(self, cause: BaseException | str) -> None:
        self._failures += 1
        limit = self._client.max_attempts
        if limit is not None and self._failures >= limit:
            err = StreamUnavailable(f"{self._failures} attempts in a row failed: {cause}")
            if isinstance(cause, BaseException):
                raise err from cause
            raise err

    async def _run(self) -> AsyncGenerator[Event, None]:
        client = self._client
        first = True
        refreshed = False  # a 4004 while connected is retried once with a fresh token
        while not self._stopping():
            if not first:
                await asyncio.sleep(client._delay(self._failures))
                self.reconnects += 1
            first = False
            url = client._url()
            authenticated = False
            try:
                try:
                    self._ws, self.ready = await client._open(url)
                    authenticated = True
                    async for event in self._follow(self._ws):
                        refreshed = False
                        yield event
                finally:
                    if self._ws is not None:
                        await self._ws.close()
                        self._ws = None
            except ConnectionClosed as exc:
                if self._stopping():
                    return
                code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "")
                fatal = _FATAL_CLOSES.get(code)
                if (
                    fatal is TokenExpired
                    and authenticated
                    and client._token_provider
                    and (not refreshed)
                ):
                    refreshed = True  # expired while connected: try a fresh token
                    logger.info("%s: token expired; reconnecting with a new one", url)
                    continue
                if fatal is not None:
                    raise fatal(code, reason) from None
                logger.info("%s: connection closed (%s %s); reconnecting", url, code, reason)
                if authenticated and self._failures == 0:
                    continue  # it had worked: start the backoff over
                self._failed(exc)
            except _Retry as exc:
                logger.info("%s: %s; reconnecting", url, exc)
                if exc.failed:
                    self._failed(exc)
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                logger.info("%s: cannot connect (%s); trying again", url, exc)
                self._failed(exc)

    async def _follow(self, ws: ClientConnection) -> AsyncIterator[Event]:
        """Subscribe on ``ws`` and yield its new events; ConnectionClosed when it ends."""
        await self._send_subscribe(ws)
        while True:
            frame = json.loads(await ws.recv())
            kind = frame.get("type") if isinstance(frame, dict) else None
            if kind == "event":
                position = parse_cursor(frame["cursor"])
                if self._last is not None and position <= self._last:
                    continue  # already handed out (a replay overlapping what we have)
                event = Event.model_validate(frame)
                self._last, self.cursor = position, event.cursor
                yield event
            elif kind == "subscribed":
                self._failures = 0
                await self._subscribed(frame)
            elif kind == "error":
                code, message = str(frame.get("code")), str(frame.get("message", ""))
                if code not in _RETRY_ERRORS:
                    raise SubscriptionRejected(code, message)
                # The subscribe did not take, or the replay stopped and the subscription is
                # gone: the same subscribe again, from the last event handed out.
                logger.info("subscribe answered %s (%s); retrying", code, message)
                self._failed(f"{code}: {message}")
                await asyncio.sleep(self._client._delay(self._failures))
                await self._send_subscribe(ws)
            # ready, pong, unsubscribed: nothing to do

    async def _send_subscribe(self, ws: ClientConnection) -> None:
        frame = dict(self._frame)
        if self.cursor is not None:
            frame["since"] = self.cursor
        await ws.send(json.dumps(frame))

    async def _subscribed(self, frame: dict[str, Any]) -> None:
        cursor = str(frame["cursor"])
        if frame.get("recovered", True) is not False:
            if self.cursor is None:  # a fresh subscription: it starts here
                self.cursor, self._last = cursor, parse_cursor(cursor)
            return
        gap = StreamGap(str(frame.get("reason", "unknown")), cursor, self.cursor)
        # Whatever the caller does next starts from the new position.
        self.cursor, self._last = cursor, parse_cursor(cursor)
        if self._on_gap is None:
            raise gap
        result = self._on_gap(gap)
        if inspect.isawaitable(result):
            await result
