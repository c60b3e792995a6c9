"""Turn asyncpg/PostgreSQL errors into keen_stream's domain errors.

Server-side code raises custom SQLSTATEs (``KSxxx``); each :class:`KeenError` subclass that owns
one declares it as ``sqlstate``. Constraint violations are mapped by constraint name.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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
    if isinstance(exc, asyncpg.UniqueViolationError):
        return errors.Conflict(message, constraint=constraint)
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return errors.NotFound(message, constraint=constraint)
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return errors.InsufficientPrivileges(message)
    return None


def from_fields(
    sqlstate: str, message: str, detail: str | None = None, constraint: str | None = None
) -> Exception:
    """The error a statement would have raised, from fields a PL/pgSQL handler caught.

    ``GET STACKED DIAGNOSTICS`` in a batch function hands back an item's error as text; this
    rebuilds the asyncpg exception (asyncpg's own constructor for server errors) and translates
    it like any other, so a batched call fails exactly as the same call made alone would.
    """
    # GET STACKED DIAGNOSTICS reports a missing detail or constraint as '', not NULL: drop
    # them, as the server's own error message would (else e.g. constraint='' in the details).
    fields = {"C": sqlstate, "M": message, "D": detail or None, "n": constraint or None}
    exc = asyncpg.PostgresError.new({k: v for k, v in fields.items() if v is not None})
    return translate(exc) or exc


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
def translating() -> Iterator[None]:
    """Re-raise known PostgreSQL errors as domain errors (``raise ... from exc``)."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        domain = translate(exc)
        if domain is None:
            raise
        raise domain from exc
