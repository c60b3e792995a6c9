"""One WebSocket connection: authenticate, then handle frames until it ends.

The ASGI callable ``serve_websocket`` runs once per connection (uvicorn gives each its own task).
Frames from one client are handled one at a time, in order; a subscription's replay runs inside
that handling, so a client never sees a ``pong`` overtake its replayed events.

:class:`StreamConnection` is what a WebSocket and a server-sent event stream
(keen_stream/hub/sse.py) share: the fan-out client and its connection row, the subscription's
checks, the resume (replay at the client's pace, then live) and the token's expiry.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from keen_stream.dal.events import Scope as StreamScope
from keen_stream.dal.models.connections import (
    ConnectionOpened,
    ConnectionStatus,
    SubscriptionChanged,
)
from keen_stream.dal.models.events import EVENT_TYPES, Cursor, StreamEvent
from keen_stream.dal.models.users import TokenInfo
from keen_stream.dal.tokens import PREFIXES, hash_token
from keen_stream.errors import (
    AuthenticationError,
    CursorExpired,
    CursorUnknown,
    DatabaseUnavailable,
    KeenError,
)
from keen_stream.hub.fanout import NO_SUBSCRIPTION, Client, Frame, Sender, Subscription, make_sender
from keen_stream.hub.protocol import (
    AuthFrame,
    ClientFrame,
    CloseCode,
    PingFrame,
    ProtocolError,
    SubscribeFrame,
    UnsubscribeFrame,
    close_code_for,
    error_frame,
    event_frame,
    event_type_filter,
    parse_client_frame,
    parse_session_ids,
    parse_since,
    pong_frame,
    ready_frame,
    subscribed_frame,
    too_slow_reason,
    unsubscribed_frame,
)
from keen_stream.hub.service import HubService

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_URL_TOKEN_KEYS = frozenset({"token", "access_token", "auth", "authorization", "api_key", "key"})
_REPLAY_PAGE = 1000
_DRAIN_TIMEOUT = 30.0
_UNKNOWN_IP = "0.0.0.0"  # noqa: S104 - a Unix-socket client has no address; the column needs one


class RateLimiter:
    """Token bucket: ``rate`` frames per second, bursts of ``burst``."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


async def serve_websocket(service: HubService, scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI application for ``/ws``."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if service.stopping:
        await send({"type": "websocket.close", "code": CloseCode.GOING_AWAY})
        return
    await send({"type": "websocket.accept"})
    await Connection(service, scope, receive, send, make_sender(send)).run()


class StreamConnection:
    """One client of the fan-out, whichever endpoint it came through."""

    #: The connection id's prefix: ``ws`` or ``sse``.
    kind = "ws"

    def __init__(self, service: HubService, scope: Scope, receive: Receive, send: Send) -> None:
        self.service = service
        self.settings = service.settings
        self.scope = scope
        self.receive = receive
        self.send = send
        self.connection_id = f"{self.kind}-{uuid.uuid4().hex}"
        self.headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
        }
        client = scope.get("client")
        self.client_ip = client[0] if client else _UNKNOWN_IP
        #: For log lines: address and port ("unix" for a client on a Unix socket).
        self.remote = (
            (f"[{client[0]}]:{client[1]}" if ":" in client[0] else f"{client[0]}:{client[1]}")
            if client
            else "unix"
        )
        self.opened_at = 0.0
        self.client: Client | None = None
        self.peer_code: int | None = None
        self._expiry: asyncio.TimerHandle | None = None

    def _open(self, info: TokenInfo, token_hash: str, client_type: str, sender: Sender) -> Client:
        """Join the fan-out as ``info``'s user (no subscription yet) and record the connection;
        a token with an expiry ends the connection then (4004)."""
        service = self.service
        client = Client(
            self.connection_id,
            info.user_id,
            info.is_admin,
            sender,
            service.request_close,
            token_hash=token_hash,
        )
        self.client = client
        service.fanout.add(client)
        now = datetime.now(UTC)
        service.recorder.opened(
            ConnectionOpened(
                connection_id=self.connection_id,
                user_id=info.user_id,
                token_id=info.token_id,
                client_ip=self.client_ip,
                user_agent=(self.headers.get("user-agent") or "")[:1024] or None,
                client_type=client_type,
                admin_connection=info.is_admin,
                can_view_all_sessions=info.is_admin,
                hub_node_id=service.node_id,
                connected_at=now,
            )
        )
        self.opened_at = time.monotonic()
        # One INFO line per authenticated connection opened and closed: who, from where, how
        # long, how it ended (strangers refused at authentication are counted in /metrics).
        logger.info(
            "%s open %s user %s from %s (%s%s)",
            self.kind,
            self.connection_id,
            info.user_id,
            self.remote,
            client_type,
            ", admin" if info.is_admin else "",
            extra={
                "event": f"{self.kind}.open",
                "connection_id": self.connection_id,
                "user_id": str(info.user_id),
                "remote": self.remote,
                "client_type": client_type,
                "admin": info.is_admin,
            },
        )
        if info.expires_at is not None:
            delay = max(0.0, (info.expires_at - now).total_seconds())
            self._expiry = asyncio.get_running_loop().call_later(
                delay, client.close, CloseCode.TOKEN_EXPIRED, "token expired"
            )
        return client

    # --- lifecycle ---------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self._finish()

    async def _run(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        client = self.client
        if client is None:
            return
        self.service.fanout.remove(client)
        status: ConnectionStatus = "disconnected"
        if client.close_code is not None:
            code: int | None = client.close_code
            reason = client.close_reason
        else:
            code, reason = self.peer_code, None
            if code in (1006, 1011):
                status = "timed_out"
        self.service.record_close(client, code, reason, status)
        duration = round(time.monotonic() - self.opened_at, 3)
        logger.info(
            "%s close %s user %s from %s: code %s%s after %.1f s",
            self.kind,
            self.connection_id,
            client.user_id,
            self.remote,
            code,
            f" ({reason})" if reason else "",
            duration,
            extra={
                "event": f"{self.kind}.close",
                "connection_id": self.connection_id,
                "user_id": str(client.user_id),
                "remote": self.remote,
                "close_code": code,
                "close_reason": reason,
                "duration_s": duration,
            },
        )

    # --- frames ------------------------------------------------------------------------------
    def _send(self, text: str, cursor: Cursor | None = None, resume: Cursor | None = None) -> bool:
        """Send a frame; ``cursor``: an event's; ``resume``: for another frame, a position a
        client may resume from after it (an event stream's ``id``)."""
        if self.client is None:
            return False
        frame = Frame(text, cursor, resume)
        return self.client.send(frame, self.settings.hub_send_buffer_limit)

    def _position(self) -> Cursor:
        """A safe resume point for this client: everything matching up to it has been sent."""
        client = self.client
        cursor = self.service.fanout.cursor
        return cursor if client is None else max(cursor, client.last_cursor)

    async def _subscribe(self, frame: SubscribeFrame) -> None:
        client = self.client
        if client is None:
            return
        subscription, since = await self._check_subscription(frame, client.user_id, client.is_admin)
        if client.closing:
            return
        await self._install(frame.id, subscription, since)

    async def _check_subscription(
        self, frame: SubscribeFrame, user_id: uuid.UUID, is_admin: bool
    ) -> tuple[Subscription, Cursor | None]:
        """The subscription ``frame`` asks for, if ``user_id`` may have it; else ProtocolError."""
        ref = frame.id
        scope = frame.scope or ("sessions" if frame.sessions else "mine")
        sessions = parse_session_ids(
            frame.sessions or [], self.settings.hub_max_session_filters, ref
        )
        if scope == "sessions" and not sessions:
            raise ProtocolError("invalid_frame", "scope 'sessions' needs a list of sessions", ref)
        if scope != "sessions" and frame.sessions:
            raise ProtocolError("invalid_frame", "sessions go with scope 'sessions'", ref)
        if scope == "all" and not is_admin:
            raise ProtocolError("forbidden", "only admins may subscribe to all events", ref)
        types = event_type_filter(frame.events, ref)
        since = parse_since(frame.since, ref)
        if sessions:
            visible = await self.service.db.events.visible_sessions(user_id, list(sessions))
            missing = len(sessions - visible)
            if missing:
                raise ProtocolError(
                    "session_not_found", f"{missing} session(s) do not exist or are not yours", ref
                )
        return Subscription(scope, sessions, types), since

    async def _install(self, ref: Any, subscription: Subscription, since: Cursor | None) -> None:
        """Replace the subscription: from now on (no ``since``), or resume after ``since``."""
        client = self.client
        if client is None:
            return
        if since is None:
            self.service.fanout.subscribe(client, subscription)
            self._record_subscription(subscription)
            position = self._position()
            self._send(
                self._subscribed(ref, subscription, position, recovered=True), None, position
            )
            return
        await self._resume(client, ref, subscription, since)

    async def _resume(
        self, client: Client, ref: Any, subscription: Subscription, since: Cursor
    ) -> None:
        """``subscribe`` with ``since``: the missed events of the new subscription, then live.

        The client's cursor must stay a safe resume point whatever fails, and ``recovered:
        true`` is said only of a replay that is under way with nothing skipped:

        1. Hold the current subscription's live frames and read what the resume needs (the
           first page up to the fan-out's cursor, or the stream's bounds). If that fails,
           nothing has changed: the held frames go out and the error is answered.
        2. Switch, with no await in between: the held frames are dropped (the old
           subscription ends at the hold's cursor), the new one is installed with its live
           frames held, and the replay runs up to the fan-out's cursor now.
        3. ``subscribed``, the replay page by page, then the held frames. If a page fails,
           the subscription is removed and what was held is dropped: nothing after the last
           replayed event was sent, so the client resumes from it.
        """
        fanout = self.service.fanout
        events = self.service.db.events
        user = client.user_id
        scope: StreamScope = subscription.scope  # type: ignore[assignment]
        sessions = list(subscription.sessions) or None
        mark = fanout.hold(client)
        first: list[StreamEvent] = []
        reason: str | None = None
        try:
            if since < mark:
                first = await events.replay(
                    user, since, mark, scope=scope, session_ids=sessions, limit=_REPLAY_PAGE
                )
            elif since > mark:
                # Ahead of this node: a cursor from a node further along (this one lags behind
                # the database), or one this deployment never issued.
                pruned, head = await events.bounds(since)
                if since < pruned:
                    reason = "since_expired"
                elif since > head:
                    reason = "since_unknown"
        except CursorExpired:
            reason = "since_expired"
        except CursorUnknown:
            reason = "since_unknown"
        except BaseException:
            fanout.release(client)
            raise
        fanout.discard_held(client)
        fanout.subscribe(client, subscription)
        self._record_subscription(subscription)
        upto = fanout.cursor
        if reason is not None or since >= upto:
            if reason is None:
                client.last_cursor = since  # frames up to it were sent by the other node
            else:
                client.last_cursor = max(client.last_cursor, upto)
            # No replay follows: the reply's cursor is where the client continues from.
            position = client.last_cursor
            self._send(
                self._subscribed(
                    ref, subscription, position, recovered=reason is None, reason=reason
                ),
                None,
                position,
            )
            fanout.release(client)
            return
        client.last_cursor = since
        self._send(self._subscribed(ref, subscription, upto, recovered=True))
        after = first[-1].cursor if len(first) == _REPLAY_PAGE else max(since, mark)
        started = time.monotonic()
        self._trace("replay %s since=%s upto=%s first page=%d", ref, since, upto, len(first))
        try:
            if await self._send_replayed(subscription, first):
                while after < upto and not client.closing:
                    page = await events.replay(
                        user, after, upto, scope=scope, session_ids=sessions, limit=_REPLAY_PAGE
                    )
                    self._trace("replay %s page after=%s: %d events", ref, after, len(page))
                    sent = await self._send_replayed(subscription, page)
                    if not sent or len(page) < _REPLAY_PAGE:
                        break
                    after = page[-1].cursor
        except BaseException as exc:
            self._trace("replay %s failed at %s: %r", ref, client.last_cursor, exc)
            fanout.discard_held(client)
            client.pending = None
            fanout.subscribe(client, NO_SUBSCRIPTION)
            self._record_subscription(NO_SUBSCRIPTION)
            raise
        self._trace(
            "replay %s done in %.3fs at %s", ref, time.monotonic() - started, client.last_cursor
        )
        fanout.release(client)

    def _trace(self, message: str, *args: object) -> None:
        """A debug line about this connection's replay, with its socket's state
        (``KEEN_DEBUG_LOGGERS=keen_stream.hub.connection``): which side stopped moving."""
        if self.client is not None and logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s: " + message + " %s",
                self.connection_id,
                *args,
                self.client.sender.diagnostics(),
            )

    async def _send_replayed(self, subscription: Subscription, events: list[StreamEvent]) -> bool:
        """Send replayed events at the client's pace: past half the send buffer, wait for it
        to read (a page of large frames can be bigger than the whole buffer)."""
        client = self.client
        if client is None:
            return False
        half = self.settings.hub_send_buffer_limit // 2
        for event in events:
            if subscription.allows(event.event_type) and client.may_see(event):
                if client.sender.buffered() > half:
                    await self._drain()
                if not self._send(event_frame(event), event.cursor):
                    return False
                self.service.stats.replayed += 1
        return True

    async def _drain(self) -> None:
        """Let a big replay go out at the client's pace, within the same buffer limit."""
        client = self.client
        if client is None:
            return
        limit = self.settings.hub_send_buffer_limit
        started = time.monotonic()
        report = started + 1.0
        while client.sender.buffered() > limit // 2 and not client.closing:
            now = time.monotonic()
            if now > started + _DRAIN_TIMEOUT:
                self._trace("drain timed out at %s", client.last_cursor)
                client.close(CloseCode.TOO_SLOW, too_slow_reason(client.last_cursor))
                return
            if now > report:
                report = now + 1.0
                self._trace("drain waiting %.1fs at %s", now - started, client.last_cursor)
            await asyncio.sleep(0.005)

    def _subscribed(
        self,
        ref: Any,
        subscription: Subscription,
        cursor: Cursor,
        *,
        recovered: bool,
        reason: str | None = None,
    ) -> str:
        return subscribed_frame(
            ref,
            scope=subscription.scope,
            sessions=sorted(subscription.sessions) if subscription.scope == "sessions" else None,
            events=None if subscription.event_types is None else sorted(subscription.event_types),
            cursor=cursor,
            recovered=recovered,
            reason=reason,
        )

    def _record_subscription(self, subscription: Subscription) -> None:
        types = subscription.event_types
        self.service.recorder.subscription(
            SubscriptionChanged(
                connection_id=self.connection_id,
                subscription_scope=subscription.scope,
                subscribed_events=(
                    ()
                    if subscription.scope == "none"
                    else ("*",)
                    if types is None or types == frozenset(EVENT_TYPES)
                    else tuple(sorted(types))
                ),
                session_filters=(
                    tuple(sorted(subscription.sessions))
                    if subscription.scope == "sessions"
                    else None
                ),
            )
        )


class Connection(StreamConnection):
    """A WebSocket on ``/ws``: authenticate (header or first frame), then frames in and out."""

    def __init__(
        self, service: HubService, scope: Scope, receive: Receive, send: Send, sender: Sender
    ) -> None:
        super().__init__(service, scope, receive, send)
        self.sender = sender
        self.limiter: RateLimiter | None = None
        self.refused_in_row = 0

    async def _run(self) -> None:
        authenticated = await self._authenticate()
        if authenticated is None:
            return
        info, token, client_type, bypass = authenticated
        await self._serve(info, token, client_type, bypass)

    async def _close_unauthenticated(self, code: int, reason: str) -> None:
        self.service.stats.auth_failures += 1
        await self.sender.close(code, reason, self.settings.hub_close_timeout)

    async def _authenticate(self) -> tuple[TokenInfo, str, str, bool] | None:
        settings = self.settings
        if token_in_query(self.scope.get("query_string", b"")):
            await self._close_unauthenticated(
                CloseCode.AUTH_REQUIRED,
                "tokens in the URL are refused; use the Authorization header or an auth frame",
            )
            return None
        token = bearer_token(self.headers.get("authorization"))
        client_type = self.headers.get("x-keen-client-type") or "websocket"
        if token is None:
            try:
                message = await asyncio.wait_for(self.receive(), settings.hub_auth_timeout)
            except TimeoutError:
                await self._close_unauthenticated(
                    CloseCode.AUTH_REQUIRED, "authentication timed out"
                )
                return None
            if message["type"] != "websocket.receive":
                return None
            try:
                frame = parse_client_frame(message.get("text") or message.get("bytes") or b"")
            except ProtocolError:
                frame = None
            if not isinstance(frame, AuthFrame):
                await self._close_unauthenticated(
                    CloseCode.AUTH_REQUIRED, 'authenticate first: {"type":"auth","token":"..."}'
                )
                return None
            token = frame.token
            client_type = frame.client_type or client_type
        db = self.service.db
        try:
            info = await db.tokens.validate(
                token, scopes=settings.hub_required_scopes, ip=self.client_ip, touch=True
            )
            user = await db.users.get(info.user_id)
        except AuthenticationError as exc:
            await self._close_unauthenticated(close_code_for(exc), exc.code)
            return None
        except (DatabaseUnavailable, KeenError) as exc:
            await self._close_unauthenticated(CloseCode.INTERNAL_ERROR, exc.code)
            return None
        bypass = info.is_admin and bool(
            info.bypass_limits or user.admin_privileges.get("bypass_rate_limits")
        )
        return info, token, clean_client_type(client_type), bypass

    async def _serve(self, info: TokenInfo, token: str, client_type: str, bypass: bool) -> None:
        service = self.service
        settings = self.settings
        client = self._open(info, hash_token(token), client_type, self.sender)
        if not bypass:
            self.limiter = RateLimiter(settings.hub_rate_limit, settings.hub_rate_burst)
        service.authenticated(client, self.send)
        self._send(
            ready_frame(self.connection_id, info.user_id, info.is_admin, service.fanout.cursor)
        )
        while True:
            message = await self.receive()
            if message["type"] == "websocket.disconnect":
                self.peer_code = message.get("code")
                return
            if client.closing:
                continue
            service.recorder.ping(self.connection_id, datetime.now(UTC))
            if self.limiter is not None and not self.limiter.allow():
                self._refuse_flood()
                continue
            self.refused_in_row = 0
            await self._handle(message.get("text") or message.get("bytes") or b"")

    def _refuse_flood(self) -> None:
        stats = self.service.stats
        stats.frames_refused += 1
        self.refused_in_row += 1
        if self.refused_in_row >= self.settings.hub_flood_close_after and self.client:
            self.client.close(CloseCode.FLOOD, "rate limit exceeded")
        elif self.refused_in_row == 1 or self.refused_in_row % 10 == 0:
            self._send(error_frame("rate_limited", "too many frames; slow down"))

    async def _handle(self, text: str | bytes) -> None:
        try:
            frame = parse_client_frame(text)
        except ProtocolError as exc:
            self._refuse(exc)
            return
        try:
            await self._dispatch(frame)
        except ProtocolError as exc:
            self._refuse(exc)
        except CursorExpired as exc:
            self._send(error_frame(exc.code, f"{exc.message}; reload state", frame.id))
        except KeenError as exc:
            if exc.retryable:  # the database is down, or a transaction lost a race: retry
                message = "the database is unavailable; retry"
                self._send(error_frame("unavailable", message, frame.id))
                return
            logger.warning("%s: %s frame failed: %s", self.connection_id, frame.type, exc)
            self._send(error_frame("internal_error", "the hub could not handle this", frame.id))

    def _refuse(self, exc: ProtocolError) -> None:
        self.service.stats.frames_refused += 1
        self._send(error_frame(exc.code, exc.message, exc.ref))

    async def _dispatch(self, frame: ClientFrame) -> None:
        if isinstance(frame, PingFrame):
            self._send(pong_frame(frame.id, self._position()))
        elif isinstance(frame, SubscribeFrame):
            await self._subscribe(frame)
        elif isinstance(frame, UnsubscribeFrame):
            self._unsubscribe(frame)
        else:
            raise ProtocolError(
                "already_authenticated", "this connection is authenticated", frame.id
            )

    def _unsubscribe(self, frame: UnsubscribeFrame) -> None:
        client = self.client
        if client is None:
            return
        current = client.subscription
        if frame.sessions:
            if current.scope != "sessions":
                raise ProtocolError("invalid_frame", "not subscribed to sessions", frame.id)
            dropped = parse_session_ids(
                frame.sessions, self.settings.hub_max_session_filters, frame.id
            )
            remaining = current.sessions - dropped
            new = (
                Subscription("sessions", remaining, current.event_types)
                if remaining
                else NO_SUBSCRIPTION
            )
        else:
            new = NO_SUBSCRIPTION
        self.service.fanout.subscribe(client, new)
        self._record_subscription(new)
        self._send(
            unsubscribed_frame(
                frame.id, new.scope, sorted(new.sessions) if new.scope == "sessions" else None
            )
        )


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def token_in_query(query: bytes) -> bool:
    if not query:
        return False
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    return any(
        key.lower() in _URL_TOKEN_KEYS or value.startswith(tuple(PREFIXES.values()))
        for key, value in pairs
    )


def clean_client_type(value: str, default: str = "websocket") -> str:
    cleaned = "".join(ch for ch in value if ch.isalnum() or ch in "-_.:/")[:50]
    return cleaned or default
