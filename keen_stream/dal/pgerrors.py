"""Turn asyncpg/PostgreSQL errors into keen_stream errors: a caller never sees the driver's.

Server-side code raises custom SQLSTATEs (``KSxxx``); each :class:`KeenError` subclass that owns
one declares it as ``sqlstate``. Constraint violations are mapped by constraint name. Everything
else the driver raises is a :class:`~keen_stream.errors.DatabaseError`: unavailable (retry with
a backoff), a transaction conflict (retry at once) or an unexpected server error.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import asyncpg

from keen_stream import errors
from keen_stream.errors import KeenError


# The most specific class wins: subclasses that share a parent's SQLSTATE (e.g. DuplicateEmail
# under Conflict) are reached through CONSTRAINT_ERRORS instead.
def _sqlstate_map() -> dict[str, type[KeenError]]:
    found: dict[str, type[KeenError]] = {}
    stack: list[type[KeenError]] = [KeenError]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.sqlstate and cls.__dict__.get("sqlstate"):
            found.setdefault(cls.sqlstate, cls)
    return found


CONSTRAINT_ERRORS: dict[str, type[KeenError]] = {
    "users_email_key": errors.DuplicateEmail,
    "users_username_key": errors.DuplicateUsername,
}


def translate(exc: asyncpg.PostgresError) -> KeenError | None:
    """The domain error for ``exc``, or None when it is not one we know."""
    sqlstate = getattr(exc, "sqlstate", None) or ""
    constraint = getattr(exc, "constraint_name", None)
    message = getattr(exc, "message", None) or str(exc)
    if constraint and constraint in CONSTRAINT_ERRORS:
        return CONSTRAINT_ERRORS[constraint]()
    cls = _sqlstate_map().get(sqlstate)
    if cls is not None:
        return cls(message, **_details(exc))
    if isinstance(
        exc,
        asyncpg.CheckViolationError
        | asyncpg.StringDataRightTruncationError
        | asyncpg.NotNullViolationError
        | asyncpg.InvalidTextRepresentationError
        | asyncpg.NumericValueOutOfRangeError
        | asyncpg.InvalidDatetimeFormatError
        | asyncpg.DatetimeFieldOverflowError
        | asyncpg.CharacterNotInRepertoireError
        | asyncpg.UntranslatableCharacterError,
    ):
        return errors.InvalidInput(message, constraint=constraint)
    if type(exc) is asyncpg.DataError:
        # Raised by the driver itself: an argument it cannot encode for its parameter's type
        # (a str where an integer goes, a lone surrogate in a text).
        return errors.InvalidInput(message)
    if isinstance(exc, asyncpg.UniqueViolationError):
        return errors.Conflict(message, constraint=constraint)
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return errors.NotFound(message, constraint=constraint)
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return errors.InsufficientPrivileges(message)
    return None


#: What the driver raises besides the socket's OSError (a TimeoutError is one): server errors,
#: misuse of a closed connection, and protocol states it cannot handle (a killed backend's FATAL
#: read while the connection was idle fails the next query with InternalClientError).
DRIVER_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)

# After these the same call may well succeed later: the connection or the server went away
# (08 connection exception; 57P01-57P05 shutdown, crash, starting up, database dropped, idle
# session timeout), the server is short of resources (53: connections, memory, disk), or the
# statement gave up (57014 statement_timeout or a cancel, 55P03 lock_timeout); it rolled back.
_UNAVAILABLE_CLASSES: Final = frozenset({"08", "53"})
_UNAVAILABLE: Final = frozenset({"57P01", "57P02", "57P03", "57P04", "57P05", "57014", "55P03"})
# Serialization failure and deadlock: the transaction was rolled back because of a concurrent
# one; PostgreSQL's advice is to run it again.
_CONFLICTS: Final = frozenset({"40001", "40P01"})


# The driver refusing what the caller asked of it, on a live connection: a result type it
# cannot decode, a feature it or the server lacks, a bad client setting. The database is fine
# and retrying repeats the refusal, so these are not an outage (and keep their connection).
_DRIVER_REFUSALS: Final = (
    asyncpg.UnsupportedClientFeatureError,
    asyncpg.exceptions.UnsupportedServerFeatureError,
    asyncpg.ClientConfigurationError,
)
# A prepared statement the driver cached is gone from the session (a borrower's DEALLOCATE):
# every later use of that statement on this connection fails, so the connection is useless
# and must be closed; the same call on another connection succeeds.
_STATEMENT_LOST: Final = "26000"


def classify(exc: BaseException) -> KeenError | None:
    """The keen_stream error for ``exc`` if the driver raised it, else None.

    An OSError (TimeoutError included) counts as the driver's: call this only on what came
    from the driver (see :func:`translating`).
    """
    if isinstance(exc, asyncpg.PostgresError):
        return translate(exc) or _server_error(exc)
    if isinstance(exc, _DRIVER_REFUSALS):
        return errors.DatabaseError(f"the driver refused the call: {_describe(exc)}")
    if isinstance(exc, (*DRIVER_ERRORS, OSError)):
        return errors.DatabaseUnavailable(f"database connection failed: {_describe(exc)}")
    return None


def connect_error(exc: BaseException) -> KeenError | None:
    """What connecting (and migrating on connect) failed with, as a keen_stream error, or None.

    Only the driver runs there, but the migrations run under SQLAlchemy, which wraps the
    driver's errors: the first of the driver's in the chain of causes decides.
    """
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, KeenError):
        error = classify(cause)
        if error is not None:
            return error
        cause = cause.__cause__
    return None


def _server_error(exc: asyncpg.PostgresError) -> errors.DatabaseError:
    sqlstate = getattr(exc, "sqlstate", None) or ""
    text = _describe(exc)
    if sqlstate in _CONFLICTS:
        return errors.TransactionConflict(f"transaction conflict: {text}", sqlstate=sqlstate)
    # FATAL ends the session whatever its SQLSTATE (e.g. 28P01 or 3D000 while connecting).
    fatal = (getattr(exc, "severity_en", None) or getattr(exc, "severity", None)) in (
        "FATAL",
        "PANIC",
    )
    if sqlstate == _STATEMENT_LOST:
        return errors.DatabaseUnavailable(
            f"the connection lost a prepared statement and is closed: {text}", sqlstate=sqlstate
        )
    if fatal or sqlstate in _UNAVAILABLE or sqlstate[:2] in _UNAVAILABLE_CLASSES:
        return errors.DatabaseUnavailable(f"database unavailable: {text}", sqlstate=sqlstate)
    return errors.DatabaseError(f"database error: {text}", sqlstate=sqlstate)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def from_fields(
    sqlstate: str, message: str, detail: str | None = None, constraint: str | None = None
) -> KeenError:
    """The error a statement would have raised, from fields a PL/pgSQL handler caught.

    ``GET STACKED DIAGNOSTICS`` in a batch function hands back an item's error as text; this
    rebuilds the asyncpg exception (asyncpg's own constructor for server errors) and translates
    it like any other, so a batched call fails exactly as the same call made alone would.
    """
    # GET STACKED DIAGNOSTICS reports a missing detail or constraint as '', not NULL: drop
    # them, as the server's own error message would (else e.g. constraint='' in the details).
    fields = {"C": sqlstate, "M": message, "D": detail or None, "n": constraint or None}
    exc = asyncpg.PostgresError.new({k: v for k, v in fields.items() if v is not None})
    return _classified(exc)


def _details(exc: asyncpg.PostgresError) -> dict[str, Any]:
    """Server-side raisers may put a JSON object in DETAIL; it becomes the error's details."""
    detail = getattr(exc, "detail", None)
    if not detail:
        return {}
    try:
        parsed = json.loads(detail)
    except ValueError:
        return {"detail": detail}
    return parsed if isinstance(parsed, dict) else {"detail": parsed}


@contextmanager
def translating(conn: asyncpg.Connection | None = None) -> Iterator[None]:
    """Re-raise the driver's errors in the block as keen_stream errors (``raise ... from exc``).

    Without ``conn`` only the driver runs in the block, so an OSError or TimeoutError is its.
    With ``conn`` the block also runs the caller's code: such an error is then the driver's only
    if ``conn`` died (a caller's own, on a live connection, passes untouched, as does any error
    that is not the driver's). A cancellation stays one, even when asyncpg then fails to roll
    back on a dead connection (its InterfaceError would otherwise replace the CancelledError).
    """
    try:
        yield
    except DRIVER_ERRORS as exc:
        if isinstance(exc.__context__, asyncio.CancelledError):
            raise exc.__context__ from None
        if type(exc) is asyncpg.InterfaceError and conn is not None and not connection_lost(conn):
            # Plain InterfaceError on a live connection is misuse ("another operation is in
            # progress"), not an outage: the caller's bug, and the connection is fine.
            raise errors.DatabaseError(f"the driver refused the call: {_describe(exc)}") from exc
        raise _classified(exc) from exc
    except OSError as exc:
        if conn is not None and not connection_lost(conn):
            raise
        raise _classified(exc) from exc


def _classified(exc: BaseException) -> KeenError:
    error = classify(exc)
    if error is None:  # pragma: no cover -- only called with the driver's errors
        raise exc
    return error


def connection_lost(conn: asyncpg.Connection) -> bool:
    """Whether ``conn`` (a pooled one included) is closed or already given back by asyncpg."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:  # the pool's proxy: asyncpg released it when it died
        return True
