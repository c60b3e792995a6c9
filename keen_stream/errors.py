"""One exception hierarchy for keen_stream.

Every error the DAL raises derives from :class:`KeenError`. Each class's docstring is its default
message. Errors raised inside PostgreSQL (PL/pgSQL ``RAISE ... USING ERRCODE``) carry a custom
SQLSTATE in the ``KS`` class; :func:`keen_stream.dal.pgerrors.translate` turns them back into
these classes, so a caller never has to look at asyncpg exceptions.
"""

from __future__ import annotations

from contextlib import suppress
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar


class KeenError(Exception):
    """keen_stream error."""

    #: Custom SQLSTATE raised by server-side code for this error, if any.
    sqlstate: ClassVar[str | None] = None
    #: A short stable code for APIs and WebSocket error frames.
    code: ClassVar[str] = "internal_error"
    #: True when the same call may succeed if simply made again (after a backoff).
    retryable: ClassVar[bool] = False

    def __init__(self, message: str | None = None, **details: Any) -> None:
        self.message = message or (self.__doc__ or self.__class__.__name__).strip()
        self.details = details
        super().__init__(self.message)


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


class ImmutableRecord(KeenError):
    """This record is append-only and cannot be changed or deleted."""

    code = "immutable_record"
    sqlstate = "KS405"


# --- credit ledger -------------------------------------------------------------------------
class _MoneyDetails(KeenError):
    """Server-side raisers send money in DETAIL as JSON strings; they become Decimals here."""

    money_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, message: str | None = None, **details: Any) -> None:
        for key in self.money_fields:
            value = details.get(key)
            if isinstance(value, str):
                with suppress(InvalidOperation):
                    details[key] = Decimal(value)
        super().__init__(message, **details)


class InsufficientCredits(_MoneyDetails):
    """Not enough available credits for this charge."""

    code = "insufficient_credits"
    sqlstate = "KS402"
    money_fields = ("balance", "available", "held", "required", "shortfall")


class SpendingLimitExceeded(_MoneyDetails):
    """This charge would exceed the account's daily or monthly spending limit."""

    code = "spending_limit_exceeded"
    sqlstate = "KS461"
    money_fields = ("limit", "spent", "held", "required")


class SessionBudgetExceeded(_MoneyDetails):
    """This charge would exceed the credit budget of the session tree."""

    code = "session_budget_exceeded"
    sqlstate = "KS462"
    money_fields = ("budget", "used", "required")


class IdempotencyConflict(Conflict):
    """This idempotency key was already used with different parameters."""

    code = "idempotency_conflict"
    sqlstate = "KS412"


class HoldNotActive(Conflict):
    """The credit hold is no longer active (settled, released or expired)."""

    code = "hold_not_active"
    sqlstate = "KS410"


# --- agent sessions ------------------------------------------------------------------------
class SessionExists(Conflict):
    """A session with this session_id already exists."""

    code = "session_exists"
    sqlstate = "KS441"


class SessionAlreadyEnded(Conflict):
    """The session has already ended with a different outcome."""

    code = "session_already_ended"
    sqlstate = "KS442"


class SessionDepthExceeded(InvalidInput):
    """The new session would be nested deeper than the configured maximum."""

    code = "session_depth_exceeded"
    sqlstate = "KS443"
