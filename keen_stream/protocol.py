"""What the hub sends: the frames and the events' payloads as pydantic models, and its close
codes.

``keen_stream.client`` parses with these models; the hub builds its frames as text
(``keen_stream.hub.protocol``: fast, and exact on the wire) and a unit test holds every frame it
builds to them (tests/unit/test_protocol.py), as an integration test holds every payload the
capture triggers write (tests/integration/test_stream_client.py), so the two cannot drift
apart. This module imports neither the data layer nor the hub, so the client may import it
(import-linter contracts in pyproject.toml). docs/protocol.md is the reference.

Models accept fields they do not know (``extra="ignore"``): an older client keeps working
against a newer hub that adds one.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer


class CloseCode(enum.IntEnum):
    """WebSocket close codes the hub uses (4000-4999 are ours; docs/protocol.md); an event
    stream's ``close`` frame carries the same."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the hub node is shutting down: reconnect (to any node) and resume
    MESSAGE_TOO_BIG = 1009  # a frame over the limit (64 KB)
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012  # uvicorn's shutdown (an event stream's close says it too)
    AUTH_REQUIRED = 4001  # no token in time, a frame before auth, or a token in the URL
    INVALID_TOKEN = 4003  # unknown/malformed token or missing scope
    TOKEN_EXPIRED = 4004
    TOKEN_REVOKED = 4005
    ACCOUNT_INACTIVE = 4006
    PRIVILEGES_CHANGED = 4007  # the user's admin status changed: reconnect
    TOO_SLOW = 4008  # the client fell too far behind: reconnect and resume with `since`
    FLOOD = 4029  # kept sending over the rate limit


#: A frame's ``id``: whatever the client's frame carried (a short string or an integer).
Ref = str | int | None


class ServerFrame(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class ReadyFrame(ServerFrame):
    """The answer to a successful authentication (docs/protocol.md, section 1)."""

    type: Literal["ready"] = "ready"
    connection_id: str
    user_id: uuid.UUID
    admin: bool
    #: The stream's position now.
    cursor: str


class SubscribedFrame(ServerFrame):
    """The answer to ``subscribe`` (section 2). ``recovered: false`` comes with a ``reason``
    (``since_expired``, ``since_unknown``)."""

    type: Literal["subscribed"] = "subscribed"
    id: Ref = None
    scope: str
    sessions: list[uuid.UUID] | None = None
    events: list[str] | None = None
    cursor: str
    recovered: bool = True
    reason: str | None = None

    @model_serializer(mode="wrap")
    def _reason_only_when_given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("reason") is None:
            data.pop("reason", None)
        return data


class UnsubscribedFrame(ServerFrame):
    type: Literal["unsubscribed"] = "unsubscribed"
    id: Ref = None
    scope: str
    sessions: list[uuid.UUID] | None = None


class PongFrame(ServerFrame):
    """The answer to a ``ping`` frame (section 4): ``cursor`` is a safe resume point."""

    type: Literal["pong"] = "pong"
    id: Ref = None
    cursor: str


class ErrorFrame(ServerFrame):
    """A refused frame (section 5); the connection stays open."""

    type: Literal["error"] = "error"
    id: Ref = None
    code: str
    message: str = ""


class EventFrame(ServerFrame):
    """One event (section 3)."""

    type: Literal["event"] = "event"
    #: The event's position; the ``since`` to resume after it.
    cursor: str
    #: Grows with every change of the same entity (session or credit account).
    version: int
    #: A ``str``, not a closed set: a newer hub may add types an older client passes on.
    event_type: str
    user_id: uuid.UUID
    session_id: uuid.UUID | None = None
    root_session_id: uuid.UUID | None = None
    #: When the writing transaction started.
    time: datetime
    #: The payload (the table in section 3); money is a decimal string.
    data: dict[str, Any]


class CloseFrame(ServerFrame):
    """``GET /events`` only (server-sent events; docs/protocol.md, section 11): the hub ends the
    stream, with the code a WebSocket would have been closed with (section 6)."""

    type: Literal["close"] = "close"
    code: int
    reason: str = ""


# --- event payloads (``data``; written by the capture triggers, keen_stream/sql/events.sql) ---
class SessionState(ServerFrame):
    """``data`` of a ``session.*`` event: the session's whole small state (docs/protocol.md,
    section 3). Money is :class:`~decimal.Decimal` (a decimal string on the wire)."""

    session_handle: str
    parent_session_id: uuid.UUID | None
    root_session_id: uuid.UUID
    depth: int
    phase: str
    status: str
    iteration_count: int
    tool_calls_count: int
    tokens_used: int
    context_tokens_used: int
    claude_cost_usd: Decimal
    keen_cost_credits: Decimal
    credit_budget: Decimal | None
    budget_used: Decimal
    files_modified: int
    files_created: int
    files_deleted: int
    start_time: datetime
    end_time: datetime | None
    is_admin_session: bool
    #: ``session.created`` only.
    git_branch: str | None = None
    #: ``session.phase_changed`` only.
    previous_phase: str | None = None
    #: Once the session is no longer running.
    success: bool | None = None
    error_message: str | None = None


class CreditTransaction(ServerFrame):
    """``data`` of a ``credit.*`` event: one ledger row. Money is :class:`~decimal.Decimal`."""

    transaction_id: uuid.UUID
    account_id: uuid.UUID
    transaction_type: str
    amount: Decimal
    balance_after: Decimal
    claude_cost_usd: Decimal | None
    #: The first 200 characters.
    description: str
    is_admin_bypass: bool
    created_at: datetime


def dump_frame(frame: ServerFrame) -> str:
    """A frame as compact JSON, as the hub sends it (``reason`` only when there is one)."""
    return frame.model_dump_json()
