"""The stream protocol: JSON text frames in (validated), JSON text frames out, close codes; on
``/ws`` as WebSocket text frames, on ``/events`` as server-sent events (the same JSON).

docs/protocol.md is the reference with examples. The client's frames are validated by the models
here; the frames the hub sends are described by keen_stream/protocol.py (what clients parse
with). keen_stream/protocol.schema.json, the JSON Schema of every frame, is generated from both
(keen_stream/hub/protocol_schema.py). Pure functions only: no I/O, no database.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keen_stream.dal.models.events import EVENT_TYPES, Cursor, StreamEvent
from keen_stream.dal.validation import parse_uuid
from keen_stream.errors import (
    AccountInactive,
    InvalidInput,
    KeenError,
    TokenExpired,
    TokenRevoked,
)
from keen_stream.protocol import CloseCode as CloseCode

#: Patterns a subscription may name besides exact event types.
WILDCARDS: Final = {"*": "", "session.*": "session.", "credit.*": "credit."}
MAX_EVENT_PATTERNS: Final = 32
_REF = Annotated[str, Field(max_length=64)] | int | None


def close_code_for(exc: KeenError) -> CloseCode:
    """The close code for an authentication failure."""
    if isinstance(exc, TokenExpired):
        return CloseCode.TOKEN_EXPIRED
    if isinstance(exc, TokenRevoked):
        return CloseCode.TOKEN_REVOKED
    if isinstance(exc, AccountInactive):
        return CloseCode.ACCOUNT_INACTIVE
    return CloseCode.INVALID_TOKEN


def too_slow_reason(cursor: Cursor) -> str:
    """The reason of a 4008 close: where the client resumes (``since``)."""
    return f"too slow; resume with since={cursor}"


#: Token statuses (keen_token_authenticate) that end a connection, with their close codes.
STATUS_CLOSE: Final = {
    "unknown": CloseCode.INVALID_TOKEN,
    "revoked": CloseCode.TOKEN_REVOKED,
    "expired": CloseCode.TOKEN_EXPIRED,
    "inactive": CloseCode.ACCOUNT_INACTIVE,
}


class ProtocolError(Exception):
    """A client frame the hub refuses; becomes an ``error`` frame (the connection stays)."""

    def __init__(self, code: str, message: str, ref: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


# --- client -> server -----------------------------------------------------------------------
class _Frame(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AuthFrame(_Frame):
    type: Literal["auth"]
    id: _REF = None
    token: str = Field(min_length=1, max_length=256)
    client_type: str | None = Field(default=None, max_length=50)


class SubscribeFrame(_Frame):
    """Replace the connection's subscription.

    ``scope``: ``mine`` (all my events; the default without ``sessions``), ``sessions`` (the
    listed sessions and their sub-agents; the default with ``sessions``), ``all`` (admins only).
    ``events``: exact types or ``session.*``, ``credit.*``, ``*``; empty/absent = all.
    ``since``: resume after this cursor.
    """

    type: Literal["subscribe"]
    id: _REF = None
    scope: Literal["mine", "sessions", "all"] | None = None
    sessions: list[str] | None = Field(default=None, max_length=10_000)
    events: list[str] | None = Field(default=None, max_length=MAX_EVENT_PATTERNS)
    since: str | None = Field(default=None, max_length=64)


class UnsubscribeFrame(_Frame):
    """Drop the listed sessions from the subscription, or (no ``sessions``) all of it."""

    type: Literal["unsubscribe"]
    id: _REF = None
    sessions: list[str] | None = Field(default=None, max_length=10_000)


class PingFrame(_Frame):
    type: Literal["ping"]
    id: _REF = None


ClientFrame = AuthFrame | SubscribeFrame | UnsubscribeFrame | PingFrame
_FRAME_TYPES: Final[dict[str, type[_Frame]]] = {
    "auth": AuthFrame,
    "subscribe": SubscribeFrame,
    "unsubscribe": UnsubscribeFrame,
    "ping": PingFrame,
}


def parse_client_frame(text: str | bytes) -> ClientFrame:
    """Decode and validate one client frame; ProtocolError says what is wrong."""
    if isinstance(text, bytes):
        raise ProtocolError("invalid_frame", "binary frames are not supported; send JSON text")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError("invalid_json", "the frame is not valid JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("invalid_frame", "a frame must be a JSON object")
    ref = _safe_ref(data.get("id"))
    kind = data.get("type")
    model = _FRAME_TYPES.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ProtocolError(
            "unknown_type",
            f"unknown frame type; expected one of {', '.join(_FRAME_TYPES)}",
            ref,
        )
    try:
        return model.model_validate(data)  # type: ignore[return-value]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "frame"
        raise ProtocolError("invalid_frame", f"{where}: {first['msg']}", ref) from None


def _safe_ref(value: Any) -> str | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and abs(value) < 2**53:
        return value
    if isinstance(value, str) and len(value) <= 64:
        return value
    return None


def parse_session_ids(values: Sequence[str], limit: int, ref: Any = None) -> frozenset[uuid.UUID]:
    """Session ids (agent_sessions.id, UUIDs) or ProtocolError ``invalid_identifier``."""
    if len(values) > limit:
        raise ProtocolError("too_many_sessions", f"at most {limit} sessions per subscription", ref)
    out = set()
    for value in values:
        try:
            out.add(parse_uuid(value, "sessions"))
        except InvalidInput:
            raise ProtocolError(
                "invalid_identifier", "sessions: not a valid session id", ref
            ) from None
    return frozenset(out)


def parse_since(value: str | None, ref: Any = None) -> Cursor | None:
    if value is None:
        return None
    try:
        return Cursor.parse(value)
    except InvalidInput:
        raise ProtocolError("invalid_cursor", "since: not a cursor this hub issued", ref) from None


def event_type_filter(patterns: Sequence[str] | None, ref: Any = None) -> frozenset[str] | None:
    """The set of event types ``patterns`` select; None means all (also for ``*``)."""
    if not patterns:
        return None
    selected: set[str] = set()
    for pattern in patterns:
        if pattern in WILDCARDS:
            prefix = WILDCARDS[pattern]
            if not prefix:
                return None
            selected.update(t for t in EVENT_TYPES if t.startswith(prefix))
        elif pattern in EVENT_TYPES:
            selected.add(pattern)
        else:
            raise ProtocolError(
                "invalid_frame", f"events: unknown event type {pattern[:64]!r}", ref
            )
    return frozenset(selected)


# --- server -> client -----------------------------------------------------------------------
def _dump(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), default=str)


def ready_frame(connection_id: str, user_id: uuid.UUID, is_admin: bool, cursor: Cursor) -> str:
    return _dump(
        {
            "type": "ready",
            "connection_id": connection_id,
            "user_id": str(user_id),
            "admin": is_admin,
            "cursor": str(cursor),
        }
    )


def subscribed_frame(
    ref: Any,
    *,
    scope: str,
    sessions: Sequence[uuid.UUID] | None,
    events: Sequence[str] | None,
    cursor: Cursor,
    recovered: bool,
    reason: str | None = None,
) -> str:
    frame: dict[str, Any] = {
        "type": "subscribed",
        "id": ref,
        "scope": scope,
        "sessions": None if sessions is None else sorted(str(s) for s in sessions),
        "events": None if events is None else sorted(events),
        "cursor": str(cursor),
        "recovered": recovered,
    }
    if reason:
        frame["reason"] = reason
    return _dump(frame)


def unsubscribed_frame(ref: Any, scope: str, sessions: Sequence[uuid.UUID] | None) -> str:
    return _dump(
        {
            "type": "unsubscribed",
            "id": ref,
            "scope": scope,
            "sessions": None if sessions is None else sorted(str(s) for s in sessions),
        }
    )


def pong_frame(ref: Any, cursor: Cursor) -> str:
    return _dump({"type": "pong", "id": ref, "cursor": str(cursor)})


def error_frame(code: str, message: str, ref: Any = None) -> str:
    return _dump({"type": "error", "id": ref, "code": code, "message": message})


def event_frame(event: StreamEvent) -> str:
    """The event frame, built by string concatenation: the payload is already JSON text
    (from PostgreSQL) and every other field is a UUID, an integer or a fixed type name."""
    sid = f'"{event.session_id}"' if event.session_id is not None else "null"
    root = f'"{event.root_session_id}"' if event.root_session_id is not None else "null"
    return (
        f'{{"type":"event","cursor":"{event.cursor.xid}-{event.cursor.id}",'
        f'"version":{event.cursor.id},"event_type":{json.dumps(event.event_type)},'
        f'"user_id":"{event.user_id}","session_id":{sid},"root_session_id":{root},'
        f'"time":"{event.created_at.isoformat()}","data":{event.data}}}'
    )


def close_frame(code: int, reason: str) -> str:
    return _dump({"type": "close", "code": code, "reason": reason})


def sse_message(text: str, *, event: str | None = None, event_id: str | None = None) -> bytes:
    """One server-sent event (the HTML standard's text/event-stream). ``text`` is one line of
    JSON (the dumps here and PostgreSQL's jsonb text never contain a raw newline). No ``event``:
    a plain message, which EventSource hands to ``onmessage``."""
    head = (f"event: {event}\n" if event else "") + (f"id: {event_id}\n" if event_id else "")
    return f"{head}data: {text}\n\n".encode()


def ws_text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented, uncompressed WebSocket text frame (RFC 6455 section 5.2):
    server frames are the same bytes for every client, so one encoding serves them all."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65_536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload
