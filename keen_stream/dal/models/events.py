"""Stream events: the outbox rows the hub fans out, and the cursor that orders them.

These two are plain tuples/slotted dataclasses rather than pydantic models: the hub builds
thousands per second on its hot path and never needs validation for rows read from its own table.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Final, NamedTuple

from keen_stream.errors import InvalidInput

_CURSOR: Final = re.compile(r"^(0|[1-9][0-9]{0,18})-(0|[1-9][0-9]{0,18})$")
_INT64_MAX: Final = 2**63 - 1

#: Event types the triggers write (docs/protocol.md describes each payload).
SESSION_EVENT_TYPES: Final = (
    "session.created",
    "session.phase_changed",
    "session.progress",
    "session.status_changed",
    "session.completed",
)
CREDIT_EVENT_TYPES: Final = (
    "credit.purchase",
    "credit.usage",
    "credit.refund",
    "credit.adjustment",
    "credit.admin_bypass",
)
EVENT_TYPES: Final = SESSION_EVENT_TYPES + CREDIT_EVENT_TYPES


class Cursor(NamedTuple):
    """A position in the stream: (transaction id, event id), compared as a tuple.

    Delivery order is cursor order. Text form ``"<xid>-<id>"``; clients treat it as opaque.
    """

    xid: int
    id: int

    def __str__(self) -> str:
        return f"{self.xid}-{self.id}"

    @classmethod
    def parse(cls, text: object) -> Cursor:
        """The cursor in ``text``; InvalidInput (field ``since``) if it is not one."""
        if not isinstance(text, str) or not _CURSOR.match(text):
            raise InvalidInput("malformed cursor", field="since")
        xid, _, event_id = text.partition("-")
        cursor = cls(int(xid), int(event_id))
        if cursor.xid > _INT64_MAX or cursor.id > _INT64_MAX:
            raise InvalidInput("malformed cursor", field="since")
        return cursor


#: Before every event.
ORIGIN: Final = Cursor(0, 0)


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One captured change. ``data`` is the payload's JSON text, encoded once by PostgreSQL."""

    cursor: Cursor
    user_id: uuid.UUID
    session_id: uuid.UUID | None
    root_session_id: uuid.UUID | None
    event_type: str
    data: str
    created_at: datetime

    @property
    def version(self) -> int:
        """Per-entity version: newer state of the same session/account has a larger one."""
        return self.cursor.id


@dataclass(frozen=True, slots=True)
class TailBatch:
    """One read of the released stream.

    ``pending`` says committed rows exist beyond the horizon (an older transaction is still
    running): re-read soon, they will be released when it ends.
    """

    events: list[StreamEvent]
    horizon: int
    pending: bool
