"""One exception hierarchy for keen_stream.

Every error the DAL raises derives from :class:`KeenError`. Each class's docstring is its default
message. Errors raised inside PostgreSQL (PL/pgSQL ``RAISE ... USING ERRCODE``) carry a custom
SQLSTATE in the ``KS`` class; :func:`keen_stream.dal.pgerrors.translate` turns them back into
these classes, so a caller never has to look at asyncpg exceptions.
"""

from __future__ import annotations

import inspect
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar

# What a typed attribute's annotation says its value is, and how a detail becomes one. Server-side
# raisers send DETAIL as JSON, where money and times are strings.
_CONVERSIONS: dict[str, Any] = {"Decimal": Decimal, "datetime": datetime.fromisoformat}


class KeenError(Exception):
    """keen_stream error.

    ``details`` holds everything the raiser said, unchanged. The attributes a class annotates
    (``shortfall: Decimal | None``) are the typed view of the details of the same name:
    converted to the annotated type, None when absent (or not of that type).
    """

    #: Custom SQLSTATE raised by server-side code for this error, if any.
    sqlstate: ClassVar[str | None] = None
    #: A short stable code for APIs and WebSocket error frames.
    code: ClassVar[str] = "internal_error"
    #: True when the same call may succeed if simply made again (after a backoff).
    retryable: ClassVar[bool] = False
    #: The typed attributes (name -> conversion), from the annotations of the class and its bases.
    _typed: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        typed = dict(cls._typed)
        for name, annotation in inspect.get_annotations(cls).items():
            text = str(annotation)
            if not text.startswith("ClassVar"):
                typed[name] = next(
                    (convert for kind, convert in _CONVERSIONS.items() if kind in text), None
                )
        cls._typed = typed

    def __init__(self, message: str | None = None, /, **details: Any) -> None:
        self.message = message or (self.__doc__ or self.__class__.__name__).strip()
        for name, convert in self._typed.items():
            setattr(self, name, _typed_value(details.get(name), convert))
        #: As the raiser gave them (JSON-able when they came from the server).
        self.details = details
        super().__init__(self.message)


def _typed_value(value: Any, convert: Any) -> Any:
    """A detail as its attribute's type; None when it is absent or does not convert."""
    if convert is None or value is None or not isinstance(value, str):
        return value
    try:
        return convert(value)
    except (InvalidOperation, ValueError):
        return None


# --- configuration and safety -------------------------------------------------------------
class ConfigurationError(KeenError):
    """keen_stream is misconfigured."""

    code = "configuration_error"


class UnsafeRoleError(ConfigurationError):
    """The tenant role can bypass row-level security; refusing to run tenant work."""

    code = "unsafe_role"


# --- the database itself ------------------------------------------------------------------
# What the driver or the server raised that no domain error describes. ``details["sqlstate"]``
# keeps the server's SQLSTATE when there was one; ``__cause__`` is the driver's exception.
class DatabaseError(KeenError):
    """The database failed unexpectedly."""

    code = "database_error"


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached."""

    code = "database_unavailable"
    retryable = True


class TransactionConflict(DatabaseError):
    """The transaction lost a race with a concurrent one and was rolled back; make it again."""

    code = "transaction_conflict"
    retryable = True


# --- input ---------------------------------------------------------------------------------
class InvalidInput(KeenError, ValueError):
    """The input is not valid."""

    code = "invalid_input"
    sqlstate = "KS400"
    #: The argument (or model field) that is not valid, when one is to blame.
    field: str | None


class InvalidIdentifier(InvalidInput):
    """The identifier is malformed."""

    code = "invalid_identifier"


class InvalidAmount(InvalidInput):
    """The amount is not a valid money value."""

    code = "invalid_amount"
    sqlstate = "KS422"


# --- lookup and conflicts ------------------------------------------------------------------
class NotFound(KeenError):
    """No such record (or it belongs to someone else)."""

    code = "not_found"
    sqlstate = "KS404"


class Conflict(KeenError):
    """The change conflicts with existing data."""

    code = "conflict"
    sqlstate = "KS409"


class DuplicateEmail(Conflict):
    """A user with this email already exists."""

    code = "duplicate_email"


class DuplicateUsername(Conflict):
    """A user with this username already exists."""

    code = "duplicate_username"


class CursorExpired(KeenError):
    """The events after this stream cursor are no longer kept (retention): reload state."""

    code = "since_expired"


class CursorUnknown(KeenError):
    """This stream cursor was not issued by this database (e.g. by the old cluster after the
    backup a restore came from): reload state."""

    code = "since_unknown"


# --- authorization -------------------------------------------------------------------------
class InsufficientPrivileges(KeenError):
    """Insufficient privileges for this operation."""

    code = "insufficient_privileges"
    sqlstate = "KS403"


class AuthenticationError(KeenError):
    """Authentication failed."""

    code = "authentication_failed"


class InvalidCredentials(AuthenticationError):
    """Invalid email or password."""

    code = "invalid_credentials"


class AccountInactive(AuthenticationError):
    """The account is not active."""

    code = "account_inactive"


class InvalidToken(AuthenticationError):
    """The token is not valid."""

    code = "invalid_token"


class TokenExpired(InvalidToken):
    """The token has expired."""

    code = "token_expired"


class TokenRevoked(InvalidToken):
    """The token has been revoked."""

    code = "token_revoked"


class TokenScopeError(InvalidToken):
    """The token lacks a required scope."""

    code = "token_scope"


class TicketRejected(InvalidToken):
    """The stream ticket is not valid."""

    code = "ticket_invalid"


class TicketUnknown(TicketRejected):
    """The stream ticket is unknown (forged, or issued by another deployment)."""

    code = "ticket_unknown"


class TicketExpired(TicketRejected):
    """The stream ticket has expired; request a new one (they last seconds)."""

    code = "ticket_expired"


class TicketUsed(TicketRejected):
    """The stream ticket was already used; a ticket opens one stream."""

    code = "ticket_used"


class StreamCredentialRejected(TicketRejected):
    """The stream credential (cookie) is unknown or expired; open the stream with a new ticket."""

    code = "credential_invalid"


class ImmutableRecord(KeenError):
    """This record is append-only and cannot be changed or deleted."""

    code = "immutable_record"
    sqlstate = "KS405"


# --- credit ledger -------------------------------------------------------------------------
class InsufficientCredits(KeenError):
    """Not enough available credits for this charge."""

    code = "insufficient_credits"
    sqlstate = "KS402"
    balance: Decimal | None
    held: Decimal | None
    #: balance - held
    available: Decimal | None
    required: Decimal | None
    #: required - available: what a purchase must add at least.
    shortfall: Decimal | None


class SpendingLimitExceeded(KeenError):
    """This charge would exceed the account's daily or monthly spending limit."""

    code = "spending_limit_exceeded"
    sqlstate = "KS461"
    #: 'day' or 'month'
    period: str | None
    limit: Decimal | None
    #: Spent in the open window, and held by active holds.
    spent: Decimal | None
    held: Decimal | None
    required: Decimal | None
    #: When the open window ends (None: no window is open).
    window_end: datetime | None


class SessionBudgetExceeded(KeenError):
    """This charge would exceed the credit budget of the session tree."""

    code = "session_budget_exceeded"
    sqlstate = "KS462"
    budget: Decimal | None
    used: Decimal | None
    required: Decimal | None


class IdempotencyConflict(Conflict):
    """This idempotency key was already used with different parameters."""

    code = "idempotency_conflict"
    sqlstate = "KS412"
    idempotency_key: str | None


class HoldNotActive(Conflict):
    """The credit hold is no longer active (settled, released or expired)."""

    code = "hold_not_active"
    sqlstate = "KS410"
    hold_id: str | None
    #: What the hold is now: settled, released or expired.
    status: str | None


# --- agent sessions ------------------------------------------------------------------------
class _SessionError(KeenError):
    #: The caller's handle of the session (``agent_sessions.session_id`` in the schema).
    session_handle: str | None

    def __init__(self, message: str | None = None, **details: Any) -> None:
        # The server-side raisers name the handle by its column, session_id.
        if isinstance(details.get("session_id"), str):
            details["session_handle"] = details.pop("session_id")
        super().__init__(message, **details)


class SessionExists(_SessionError, Conflict):
    """A session with this handle already exists."""

    code = "session_exists"
    sqlstate = "KS441"


class SessionAlreadyEnded(_SessionError, Conflict):
    """The session has already ended with a different outcome."""

    code = "session_already_ended"
    sqlstate = "KS442"
    #: How it ended.
    status: str | None


class SessionDepthExceeded(InvalidInput):
    """The new session would be nested deeper than the configured maximum."""

    code = "session_depth_exceeded"
    sqlstate = "KS443"
    depth: int | None
    max_depth: int | None
