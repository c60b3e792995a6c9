"""Server-sent events: ``GET /events`` (the stream) and ``POST /events/tickets`` (its tickets).

The same fan-out client as a WebSocket (keen_stream/hub/connection.py, ``StreamConnection``):
the same subscription checks, authorization rule, resume and send-buffer limit, one way. The
subscription is the query string (the ``subscribe`` frame's fields); ``Last-Event-ID`` (sent by
a browser's EventSource when it reconnects) takes precedence over ``since``. Each event's
cursor is its SSE ``id``, so a browser resumes by itself. Frames other than events are named
SSE events (``subscribed``, ``error``, ``close``); a ``: ping`` comment every
``hub_sse_heartbeat_interval`` keeps proxies and idle sockets from ending the stream silently.

Authentication (docs/protocol.md, section 11): ``Authorization: Bearer`` for programs; for
browsers, whose EventSource sends no headers, a ticket (``POST /events/tickets`` with the
token in the header; short-lived, single-use, stored hashed, so any node of the deployment
redeems it) in the URL. Redeeming it sets an HttpOnly cookie (a stream credential) with which
the browser's own reconnects of the same URL authenticate. The token behind a ticket or a
credential is checked again at every connect. Tickets and credentials are never logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from http.cookies import CookieError, SimpleCookie
from typing import Any, Final
from urllib.parse import parse_qsl
from weakref import WeakKeyDictionary

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from keen_stream.dal.models.events import Cursor
from keen_stream.dal.models.users import TokenInfo
from keen_stream.dal.tickets import StreamGrant
from keen_stream.dal.tokens import hash_token, require_scopes
from keen_stream.errors import (
    AccountInactive,
    AuthenticationError,
    CursorExpired,
    KeenError,
    StreamCredentialRejected,
    TicketExpired,
    TicketUsed,
)
from keen_stream.hub.connection import (
    RateLimiter,
    Receive,
    Scope,
    Send,
    StreamConnection,
    bearer_token,
    clean_client_type,
    token_in_query,
)
from keen_stream.hub.fanout import EventStreamSender, Subscription, make_sse_sender
from keen_stream.hub.protocol import (
    CloseCode,
    ProtocolError,
    SubscribeFrame,
    error_frame,
    event_type_filter,
    parse_session_ids,
    parse_since,
    too_slow_reason,
)
from keen_stream.hub.service import HubService
from keen_stream.hub.transport import guarded_http

logger = logging.getLogger(__name__)

#: The stream credential's cookie: sent only to /events, never to scripts, never cross-site.
COOKIE: Final = "keen_stream_sse"
COOKIE_PATH: Final = "/events"
#: Query parameters of GET /events (the subscribe frame's fields, and the ticket).
_LIST_PARAMS: Final = ("sessions", "events")
_PARAMS: Final = frozenset({"scope", "since", "ticket", *_LIST_PARAMS})
_PING: Final = b": ping\n\n"
_URL_REFUSAL: Final = "tokens in the URL are refused; use a ticket (POST /events/tickets)"


class HttpError(Exception):
    """A refused request: its status and the ``error`` frame that is its body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def response(self) -> Response:
        headers = {"cache-control": "no-store"}
        if self.status == 401:
            headers["www-authenticate"] = "Bearer"
        if self.status in (429, 503):
            headers["retry-after"] = "1"
        return Response(
            error_frame(self.code, self.message),
            status_code=self.status,
            media_type="application/json",
            headers=headers,
        )


def _auth_error(exc: AuthenticationError) -> HttpError:
    return HttpError(403 if isinstance(exc, AccountInactive) else 401, exc.code, exc.message)


def _database_error(exc: KeenError) -> HttpError:
    if exc.retryable:
        return HttpError(503, "unavailable", "the database is unavailable; retry")
    return HttpError(500, "internal_error", "the hub could not handle this")


def parse_events_query(
    query: bytes, last_event_id: str | None
) -> tuple[SubscribeFrame, str | None]:
    """The subscription (as a ``subscribe`` frame) and the ticket a GET /events asks for.

    ``sessions`` and ``events`` may repeat or hold comma-separated values. ProtocolError for
    what a ``subscribe`` frame would be refused for, and for unknown or repeated parameters.
    """
    fields: dict[str, Any] = {"type": "subscribe"}
    try:
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True, strict_parsing=False)
    except ValueError:
        raise ProtocolError("invalid_frame", "the query string is malformed") from None
    for key, value in pairs:
        if key not in _PARAMS:
            raise ProtocolError("invalid_frame", f"unknown query parameter {key[:40]!r}")
        if key in _LIST_PARAMS:
            fields.setdefault(key, []).extend(v for v in value.split(",") if v)
        elif key in fields:
            raise ProtocolError("invalid_frame", f"{key}: given more than once")
        else:
            fields[key] = value
    ticket = fields.pop("ticket", None)
    if last_event_id:  # the browser's resume point wins over the URL's (which it never changes)
        fields["since"] = last_event_id.strip()
    try:
        frame = SubscribeFrame.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "query"
        raise ProtocolError("invalid_frame", f"{where}: {first['msg']}") from None
    # The checks that need no database, before a ticket is spent on a request that will fail.
    parse_session_ids(frame.sessions or [], 10_000)
    event_type_filter(frame.events)
    parse_since(frame.since)
    return frame, ticket


def _protocol_error(exc: ProtocolError) -> HttpError:
    status = {"forbidden": 403, "session_not_found": 404}.get(exc.code, 400)
    return HttpError(status, exc.code, exc.message)


def _cookie(headers: dict[str, str], name: str) -> str | None:
    raw = headers.get("cookie")
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


async def serve_events(
    service: HubService | None, scope: Scope, receive: Receive, send: Send
) -> None:
    """The ASGI application for ``/events`` (POST /events/tickets is a Starlette route)."""
    if service is None or service.stopping:
        # Not a network error: EventSource gives up, and its page reopens with a new ticket.
        response = HttpError(503, "unavailable", "the hub node is starting or stopping").response()
        await response(scope, receive, send)
        return
    await EventStream(service, scope, receive, send).run()


class EventStream(StreamConnection):
    """One ``GET /events``: checks, then a ``text/event-stream`` response until it ends."""

    kind = "sse"

    async def _respond(self, response: Response) -> None:
        await response(self.scope, self.receive, self.send)

    async def _run(self) -> None:
        if self.scope.get("method") != "GET":
            await self._respond(
                Response(
                    error_frame("method_not_allowed", "GET /events"),
                    status_code=405,
                    media_type="application/json",
                    headers={"allow": "GET"},
                )
            )
            return
        try:
            stream = await self._check()
        except HttpError as exc:
            if exc.status in (401, 403):
                self.service.stats.auth_failures += 1
            await self._respond(exc.response())
            return
        grant, frame, subscription, since = stream
        await self._stream(grant, frame.id, subscription, since)

    async def _check(self) -> tuple[StreamGrant, SubscribeFrame, Subscription, Cursor | None]:
        query = self.scope.get("query_string", b"")
        if token_in_query(query):
            raise HttpError(401, "token_in_url", _URL_REFUSAL)
        try:
            frame, ticket = parse_events_query(query, self.headers.get("last-event-id"))
        except ProtocolError as exc:
            raise _protocol_error(exc) from None
        try:
            grant = await self._authenticate(ticket)
            require_scopes(grant.info.scopes, self.settings.hub_required_scopes)
        except AuthenticationError as exc:
            raise _auth_error(exc) from None
        except KeenError as exc:
            raise _database_error(exc) from None
        info = grant.info
        try:
            subscription, since = await self._check_subscription(frame, info.user_id, info.is_admin)
        except ProtocolError as exc:
            raise _protocol_error(exc) from None
        except KeenError as exc:
            raise _database_error(exc) from None
        return grant, frame, subscription, since

    async def _authenticate(self, ticket: str | None) -> StreamGrant:
        """Bearer header, else the ticket (or, on a reconnect with the spent ticket still in
        the URL, the credential its redemption left), else the credential alone."""
        db = self.service.db
        token = bearer_token(self.headers.get("authorization"))
        if token is not None:
            info: TokenInfo = await db.tokens.validate(token, ip=self.client_ip, touch=True)
            expires = info.expires_at or datetime.max.replace(tzinfo=UTC)
            return StreamGrant(info, hash_token(token), None, expires)
        credential = _cookie(self.headers, COOKIE)
        if ticket is not None:
            # The ticket first, even with a cookie: a ticket in a URL (which proxies may log)
            # must be spent by the request that carries it, never left redeemable. Only a
            # ticket nobody can use any more (EventSource's reconnect names the spent one)
            # falls back to the cookie its redemption left.
            ttl = timedelta(seconds=self.settings.hub_stream_credential_ttl)
            try:
                return await db.tickets.redeem(ticket, ttl)
            except (TicketUsed, TicketExpired) as spent:
                if credential is None:
                    raise
                try:
                    return await db.tickets.authenticate(credential, ticket)
                except StreamCredentialRejected:
                    raise spent from None  # a cookie of another token or an old one
        if credential is not None:
            return await db.tickets.authenticate(credential)
        raise HttpError(
            401,
            "authentication_required",
            "send Authorization: Bearer <token>, or a ticket from POST /events/tickets",
        )

    def _start_headers(self, grant: StreamGrant) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache, no-store"),
            (b"x-accel-buffering", b"no"),  # nginx: pass events through at once
            # The socket ends with the stream (EventSource reconnects on a new one): it was
            # taken off the stranger cap for the stream, not for requests after it.
            (b"connection", b"close"),
        ]
        if grant.credential is not None:
            seconds = (grant.credential_expires_at - datetime.now(UTC)).total_seconds()
            secure = "; Secure" if self._over_tls() else ""
            value = (
                f"{COOKIE}={grant.credential.get_secret_value()}; Path={COOKIE_PATH}; "
                f"Max-Age={max(0, int(seconds))}; HttpOnly; SameSite=Strict{secure}"
            )
            headers.append((b"set-cookie", value.encode("latin-1")))
        return headers

    def _over_tls(self) -> bool:
        """Whether the browser reached us over HTTPS: directly, or through a proxy that ended
        TLS and says so (X-Forwarded-Proto, Forwarded). Trusting the header without knowing the
        proxy is safe here: it can only add ``Secure`` to the cookie, never take it away."""
        if self.scope.get("scheme") == "https":
            return True
        forwarded_proto = self.headers.get("x-forwarded-proto", "").split(",")[0]
        if forwarded_proto.strip().lower() == "https":
            return True
        first = self.headers.get("forwarded", "").split(",")[0]
        return any(
            part.strip().lower().replace('"', "") == "proto=https" for part in first.split(";")
        )

    async def _stream(
        self, grant: StreamGrant, ref: Any, subscription: Subscription, since: Cursor | None
    ) -> None:
        settings = self.settings
        await self.send(
            {"type": "http.response.start", "status": 200, "headers": self._start_headers(grant)}
        )
        sender = make_sse_sender(self.send)
        sender.write_raw(f"retry: {int(settings.hub_sse_retry * 1000)}\n\n".encode())
        client_type = clean_client_type(self.headers.get("x-keen-client-type") or "sse", "sse")
        client = self._open(grant.info, grant.token_hash, client_type, sender)
        proto = guarded_http(self.send)
        if proto is not None:
            proto.streaming(
                lambda: client.close(CloseCode.SERVICE_RESTART, "hub restarting; reconnect")
            )
        try:
            await self._install(ref, subscription, since)
        except (ProtocolError, CursorExpired, KeenError) as exc:
            # No way to subscribe again in-band: say why and end; the browser reconnects and
            # resumes from the last event it received (Last-Event-ID).
            code = exc.code if isinstance(exc, (ProtocolError, CursorExpired)) else "unavailable"
            self._send(error_frame(code, "the subscription failed; reconnect to resume", ref))
            client.close(CloseCode.INTERNAL_ERROR, f"{code}; reconnect and resume")
        await self._wait(sender)

    async def _wait(self, sender: EventStreamSender) -> None:
        """Until the client goes away or the hub ends the stream; heartbeats meanwhile."""
        client = self.client
        assert client is not None
        gone = asyncio.ensure_future(self._disconnected())
        ended = asyncio.ensure_future(sender.finished.wait())
        interval = self.settings.hub_sse_heartbeat_interval
        try:
            while True:
                done, _ = await asyncio.wait(
                    {gone, ended}, timeout=interval, return_when="FIRST_COMPLETED"
                )
                if done:
                    return
                self._heartbeat(sender)
        finally:
            for task in (gone, ended):
                task.cancel()
            if not sender.finished.is_set():
                sender.abort()

    async def _disconnected(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass

    def _heartbeat(self, sender: EventStreamSender) -> None:
        """A ``: ping`` comment; a client that has taken nothing for as long as a WebSocket
        client gets to answer a ping, or is over the send-buffer limit, is closed as too slow."""
        client = self.client
        if client is None or client.closing:
            return
        settings = self.settings
        if (
            sender.stalled_for() > settings.hub_ws_ping_interval
            or sender.buffered() > settings.hub_send_buffer_limit
        ):
            client.close(CloseCode.TOO_SLOW, too_slow_reason(client.last_cursor))
            return
        sender.write_raw(_PING)
        self.service.recorder.ping(self.connection_id, datetime.now(UTC))


class TicketLimits:
    """Per token, a token bucket on ``POST /events/tickets``: the frame rate of a WebSocket
    (``hub_rate_limit`` a second, bursts of ``hub_rate_burst``). Each ticket is a row in the
    shared database, kept an hour past its expiry; a loop must not fill the table. The
    least recently used buckets are forgotten past ``size`` tokens (memory stays bounded; a
    forgotten token starts with a full burst again)."""

    def __init__(self, rate: float, burst: int, size: int = 10_000) -> None:
        self._rate = rate
        self._burst = burst
        self._size = size
        self._buckets: OrderedDict[str, RateLimiter] = OrderedDict()

    def allow(self, key: str) -> bool:
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = RateLimiter(self._rate, self._burst)
            if len(self._buckets) >= self._size:
                self._buckets.popitem(last=False)
        self._buckets[key] = bucket
        return bucket.allow()


_TICKET_LIMITS: WeakKeyDictionary[HubService, TicketLimits] = WeakKeyDictionary()


def _ticket_limits(service: HubService) -> TicketLimits:
    limits = _TICKET_LIMITS.get(service)
    if limits is None:
        settings = service.settings
        limits = TicketLimits(settings.hub_rate_limit, settings.hub_rate_burst)
        _TICKET_LIMITS[service] = limits
    return limits


async def issue_ticket(request: Request) -> Response:
    """``POST /events/tickets`` with ``Authorization: Bearer <token>``: a ticket for one
    ``GET /events?ticket=...``. Only a header authenticates it: a cross-site form or image
    cannot send one, and no CORS header lets another origin's script read the answer."""
    service: HubService | None = getattr(request.app.state, "service", None)
    if service is None:
        return HttpError(503, "unavailable", "the hub is starting").response()
    settings = service.settings
    token = bearer_token(request.headers.get("authorization"))
    try:
        if token_in_query(request.scope.get("query_string", b"")):
            raise HttpError(401, "token_in_url", _URL_REFUSAL)
        if token is None:
            raise HttpError(401, "authentication_required", "send Authorization: Bearer <token>")
        if not _ticket_limits(service).allow(hash_token(token)):
            raise HttpError(429, "rate_limited", "too many tickets for this token; slow down")
        client = request.client
        try:
            await service.db.tokens.validate(
                token,
                scopes=settings.hub_required_scopes,
                ip=client.host if client else None,
                touch=True,
            )
            issued = await service.db.tickets.issue(
                token, timedelta(seconds=settings.hub_ticket_ttl)
            )
        except AuthenticationError as exc:
            raise _auth_error(exc) from None
        except KeenError as exc:
            raise _database_error(exc) from None
    except HttpError as exc:
        if exc.status in (401, 403):
            service.stats.auth_failures += 1
        return exc.response()
    return JSONResponse(
        {
            "ticket": issued.ticket.get_secret_value(),
            "expires_at": issued.expires_at.isoformat(),
            "expires_in": settings.hub_ticket_ttl,
        },
        status_code=201,
        headers={"cache-control": "no-store"},
    )
