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

A connection that goes quiet while the caller waits is pinged, and cut if the ping is not
answered (a hub that hangs, a network that drops everything). Events are
:class:`keen_stream.protocol.EventFrame`, the model the hub builds its frames from.

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
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Final, Literal, TypeVar

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from keen_stream.errors import KeenError
from keen_stream.protocol import (
    CloseCode,
    CreditTransaction,
    ErrorFrame,
    EventFrame,
    ReadyFrame,
    ServerFrame,
    SessionState,
    SubscribedFrame,
)

__all__ = [
    "AccountInactive",
    "AuthenticationFailed",
    "Event",
    "LatestByEntity",
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
    "UnexpectedFrame",
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


class UnexpectedFrame(StreamError):
    """The hub sent a frame that does not match the protocol (a client older than a breaking
    change, or not a keen hub): reconnecting would not help."""

    code = "unexpected_frame"


class StreamUnavailable(StreamError):
    """``max_attempts`` connection or subscribe attempts in a row failed (the cause is chained)."""


#: Close codes after which a new attempt cannot succeed: the typed exception to raise.
#: Every other close (1000, 1001, 1006, 1011, 1012, 4007, 4008, 4029, ...) is retried.
_FATAL_CLOSES: Final[dict[int, type[StreamClosed]]] = {
    CloseCode.MESSAGE_TOO_BIG: StreamClosed,  # a frame over 64 KB: a client bug
    CloseCode.AUTH_REQUIRED: AuthenticationFailed,
    CloseCode.INVALID_TOKEN: TokenRejected,
    CloseCode.TOKEN_EXPIRED: TokenExpired,
    CloseCode.TOKEN_REVOKED: TokenRevoked,
    CloseCode.ACCOUNT_INACTIVE: AccountInactive,  # a suspended or deactivated user
}
#: The code recorded for a connection that ended without a close frame.
_NO_CLOSE_FRAME: Final = 1006
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


class Event(EventFrame):
    """One ``event`` frame (docs/protocol.md, section 3): the hub's own model
    (:class:`keen_stream.protocol.EventFrame`) with the client's conveniences."""

    @property
    def position(self) -> tuple[int, int]:
        """The cursor as the pair of integers events are ordered by."""
        return parse_cursor(self.cursor)

    @property
    def session(self) -> SessionState | None:
        """``data`` of a ``session.*`` event, typed (None for other events); UnexpectedFrame
        if it does not parse. Parsed on each access: keep the result."""
        if not self.event_type.startswith("session."):
            return None
        return _parse(SessionState, self.data, "session.* payload")

    @property
    def credit(self) -> CreditTransaction | None:
        """``data`` of a ``credit.*`` event, typed (None for other events); UnexpectedFrame
        if it does not parse."""
        if not self.event_type.startswith("credit."):
            return None
        return _parse(CreditTransaction, self.data, "credit.* payload")


class LatestByEntity:
    """Per entity, the newest event: the state a dashboard shows (docs/protocol.md, section 3).

    Two changes of one entity can arrive in either order when their transactions overlapped;
    ``version`` grows with every change of the same entity, so the event with the highest one
    wins. The entity of a ``session.*`` event is its session (``session_id``), that of a
    ``credit.*`` event the credit account (``data["account_id"]``). Each session event carries
    the session's whole small state, so the newest one is enough. After a :class:`StreamGap`,
    :meth:`clear` and reload.

    ::

        latest = LatestByEntity()
        async for event in stream.subscribe():
            if latest.update(event):
                render(latest.session(event.session_id))
    """

    def __init__(self) -> None:
        self._latest: dict[tuple[str, str], Event] = {}

    @staticmethod
    def entity(event: Event) -> tuple[str, str] | None:
        """``("session", id)`` or ``("account", id)``; None for an event of neither kind."""
        kind = event.event_type.partition(".")[0]
        if kind == "session" and event.session_id is not None:
            return "session", str(event.session_id)
        if kind == "credit" and event.data.get("account_id") is not None:
            return "account", str(event.data["account_id"])
        return None

    def update(self, event: Event) -> bool:
        """Keep ``event`` if it is its entity's newest; False when an event with the same or
        a higher ``version`` is already kept (or the event has no entity)."""
        key = self.entity(event)
        if key is None:
            return False
        kept = self._latest.get(key)
        if kept is not None and kept.version >= event.version:
            return False
        self._latest[key] = event
        return True

    def session(self, session_id: uuid.UUID | str) -> Event | None:
        """The newest event of this session (by its row id, the events' ``session_id``)."""
        return self._latest.get(("session", str(session_id)))

    def account(self, account_id: uuid.UUID | str) -> Event | None:
        """The newest credit event of this account."""
        return self._latest.get(("account", str(account_id)))

    def clear(self) -> None:
        self._latest.clear()

    def __len__(self) -> int:
        return len(self._latest)

    def __iter__(self) -> Iterator[Event]:
        return iter(list(self._latest.values()))


_F = TypeVar("_F", bound=ServerFrame)


def _parse(model: type[_F], frame: dict[str, Any], what: str | None = None) -> _F:
    try:
        return model.model_validate(frame)
    except ValidationError as exc:
        what = what or f"{frame.get('type')} frame"
        raise UnexpectedFrame(f"a {what} not as expected: {exc}") from None


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
    ``ping_interval`` / ``ping_timeout``: a dead connection is one that sent nothing for
    ``ping_interval`` seconds while the caller waited for an event and then did not answer a
    WebSocket ping within ``ping_timeout``; it is cut and the client reconnects (None: no
    pings). Only time spent waiting counts: a caller busy with its own work does not make the
    connection look dead (the hub closes a client that stops reading with 4008, and the client
    resumes).
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
        ping_timeout: float = 10.0,
        max_size: int = 2**20,
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("at least one hub URL is needed")
        if (token is None) == (token_provider is None):
            raise ValueError("pass either token or token_provider")
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("backoff_initial must be > 0 and at most backoff_max")
        if (ping_interval is not None and ping_interval <= 0) or ping_timeout <= 0:
            raise ValueError("ping_interval and ping_timeout must be > 0")
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

    async def _open(self, url: str) -> tuple[ClientConnection, ReadyFrame]:
        """A connection that is authenticated: the socket and the ``ready`` frame."""
        headers = {"Authorization": f"Bearer {await self._token_now()}"}
        if self.client_type:
            headers["X-Keen-Client-Type"] = self.client_type
        ws = await connect(
            url,
            additional_headers=headers,
            open_timeout=self.open_timeout,
            # Not websockets' keepalive: its pings go out on a timer and its pong waits count
            # the time the caller spends away, so a busy caller would cut a healthy
            # connection. Subscription._recv pings only a connection that has gone quiet.
            ping_interval=None,
            max_size=self.max_size,
            close_timeout=2.0,
        )
        try:
            first = json.loads(await asyncio.wait_for(ws.recv(), self.open_timeout))
            if not isinstance(first, dict) or first.get("type") != "ready":
                raise _Retry(f"expected a ready frame, got {str(first)[:200]}")
            ready = _parse(ReadyFrame, first)
        except BaseException:
            await ws.close()
            raise
        return ws, ready


class Subscription:
    """The iterator :meth:`StreamClient.subscribe` returns (also an async context manager).

    ``cursor``: the resume point, the cursor of the last event handed out (or where the
    subscription started); persist it to resume in another process. ``ready``: the last
    ``ready`` frame (``connection_id``, ``user_id``, ``admin``). ``url``: the hub URL of the
    current connection (None between connections); ``live``: its subscribe was answered
    (False while reconnecting: a UI's "reconnecting..." state). ``reconnects``, ``closes`` (how each
    connection ended, by close code; 1006: without a close frame) and ``dead_connections``
    (cut after an unanswered ping) tell what the client went through."""

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
        self.ready: ReadyFrame | None = None
        self.url: str | None = None
        #: True while a connection's subscribe has been answered (False while reconnecting).
        self.live = False
        self.reconnects = 0
        self.closes: Counter[int] = Counter()
        self.dead_connections = 0
        self._ws: ClientConnection | None = None
        self._failures = 0
        # A 4004 while connected is retried with a fresh token; once, until a connection with
        # the new token subscribes (then its own expiry is a new one to refresh, events or not).
        self._refreshed = False
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
                    self.url = url
                    authenticated = True
                    async for event in self._follow(self._ws):
                        yield event
                finally:
                    self.url, self.live = None, False
                    if self._ws is not None:
                        await self._ws.close()
                        self._ws = None
            except ConnectionClosed as exc:
                if self._stopping():
                    return
                code, reason = (
                    (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (_NO_CLOSE_FRAME, "")
                )
                self.closes[code] += 1
                fatal = _FATAL_CLOSES.get(code)
                if (
                    fatal is TokenExpired
                    and authenticated
                    and client._token_provider
                    and (not self._refreshed)
                ):
                    self._refreshed = True  # expired while connected: try a fresh token
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
            frame = json.loads(await self._recv(ws))
            kind = frame.get("type") if isinstance(frame, dict) else None
            if kind == "event":
                try:
                    position = parse_cursor(frame.get("cursor"))
                except ValueError as exc:
                    raise UnexpectedFrame(f"an event frame not as expected: {exc}") from None
                if self._last is not None and position <= self._last:
                    continue  # already handed out (a replay overlapping what we have)
                event = _parse(Event, frame)
                self._last, self.cursor = position, event.cursor
                yield event
            elif kind == "subscribed":
                self._failures = 0
                self.live = True
                self._refreshed = False
                await self._subscribed(_parse(SubscribedFrame, frame))
            elif kind == "error":
                error = _parse(ErrorFrame, frame)
                code, message = error.code, error.message
                if code not in _RETRY_ERRORS:
                    raise SubscriptionRejected(code, message)
                # The subscribe did not take, or the replay stopped and the subscription is
                # gone: the same subscribe again, from the last event handed out.
                logger.info("subscribe answered %s (%s); retrying", code, message)
                self.live = False
                self._failed(f"{code}: {message}")
                await asyncio.sleep(self._client._delay(self._failures))
                await self._send_subscribe(ws)
            # ready, pong, unsubscribed: nothing to do

    async def _recv(self, ws: ClientConnection) -> str | bytes:
        """The next frame. A connection that has sent nothing for ``ping_interval`` seconds
        gets a ping; without a pong within ``ping_timeout`` it is dead (a hub that stopped, a
        network that drops everything without a reset): cut it and reconnect."""
        client = self._client
        if client.ping_interval is None:
            return await ws.recv()
        while True:
            try:
                # websockets' recv() may be cancelled without losing a message.
                return await asyncio.wait_for(ws.recv(), client.ping_interval)
            except TimeoutError:
                pass
            pong = await ws.ping()
            try:
                await asyncio.wait_for(pong, client.ping_timeout)
            except TimeoutError:
                self.dead_connections += 1
                # No closing handshake with a peer that does not answer: it would only wait.
                ws.transport.abort()
                raise _Retry(
                    f"nothing received for {client.ping_interval:g} s and no pong within "
                    f"{client.ping_timeout:g} s",
                    failed=False,
                ) from None

    async def _send_subscribe(self, ws: ClientConnection) -> None:
        frame = dict(self._frame)
        if self.cursor is not None:
            frame["since"] = self.cursor
        await ws.send(json.dumps(frame))

    async def _subscribed(self, frame: SubscribedFrame) -> None:
        cursor = frame.cursor
        if frame.recovered:
            if self.cursor is None:  # a fresh subscription: it starts here
                self.cursor, self._last = cursor, parse_cursor(cursor)
            return
        gap = StreamGap(frame.reason or "unknown", cursor, self.cursor)
        # Whatever the caller does next starts from the new position.
        self.cursor, self._last = cursor, parse_cursor(cursor)
        if self._on_gap is None:
            raise gap
        result = self._on_gap(gap)
        if inspect.isawaitable(result):
            await result
