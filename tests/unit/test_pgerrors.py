"""What the driver raises becomes one keen_stream error class: the rule, case by case."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import pytest

from keen_stream import errors
from keen_stream.dal.pgerrors import classify, from_fields, translating


def server_error(sqlstate: str, message: str = "boom", **fields: str) -> asyncpg.PostgresError:
    """The exception asyncpg builds from a server's ErrorResponse (C: SQLSTATE, S: severity)."""
    return asyncpg.PostgresError.new({"C": sqlstate, "M": message, **fields})


UNAVAILABLE = {
    "connection refused": ConnectionRefusedError(111, "Connect call failed"),
    "connection reset": ConnectionResetError(104, "reset by peer"),
    "pool acquire timeout": TimeoutError(),
    "connection closed mid-operation": asyncpg.ConnectionDoesNotExistError(
        "connection was closed in the middle of operation"
    ),
    "closed connection used": asyncpg.InterfaceError("connection is closed"),
    "protocol state after a killed backend": asyncpg.InternalClientError(
        "cannot switch to state 15; another operation (2) is in progress"
    ),
    "protocol error": asyncpg.ProtocolError("unexpected message"),
    "08006 connection failure": server_error("08006"),
    "57P01 admin shutdown": server_error("57P01", "terminating connection due to administrator"),
    "57P02 crash shutdown": server_error("57P02"),
    "57P03 cannot connect now": server_error("57P03", "the database system is starting up"),
    "53300 too many connections": server_error("53300"),
    "53100 disk full": server_error("53100"),
    "57014 statement timeout": server_error("57014", "canceling statement due to timeout"),
    "55P03 lock timeout": server_error("55P03"),
    "any FATAL (28P01 bad password)": server_error("28P01", "auth failed", S="FATAL"),
}


@pytest.mark.parametrize("name", sorted(UNAVAILABLE))
def test_connection_level_failures_are_database_unavailable(name: str) -> None:
    exc = UNAVAILABLE[name]
    error = classify(exc)
    assert type(error) is errors.DatabaseUnavailable
    assert error.retryable
    if isinstance(exc, asyncpg.PostgresError):
        assert error.details["sqlstate"] == exc.sqlstate


def test_the_driver_errors_of_the_outage_are_classified_by_type() -> None:
    """The two classes that reached callers in the outage (issue 'guarantees', finding 8)."""
    assert isinstance(
        classify(asyncpg.CannotConnectNowError("starting up")), errors.DatabaseUnavailable
    )
    assert isinstance(classify(asyncpg.InternalClientError("state")), errors.DatabaseUnavailable)


@pytest.mark.parametrize("sqlstate", ["40001", "40P01"])
def test_serialization_failures_and_deadlocks_are_retryable_conflicts(sqlstate: str) -> None:
    error = classify(server_error(sqlstate))
    assert type(error) is errors.TransactionConflict
    assert error.retryable
    assert error.details == {"sqlstate": sqlstate}


@pytest.mark.parametrize("sqlstate", ["42P01", "XX000", "22012", "0A000", "25P02"])
def test_an_unexpected_server_error_keeps_its_sqlstate_and_is_not_retryable(
    sqlstate: str,
) -> None:
    error = classify(server_error(sqlstate, "unexpected"))
    assert type(error) is errors.DatabaseError
    assert not error.retryable
    assert error.details == {"sqlstate": sqlstate}
    assert "unexpected" in error.message


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.UnsupportedClientFeatureError("cannot decode a text-format field"),
        asyncpg.exceptions.UnsupportedServerFeatureError("no such feature"),
        asyncpg.ClientConfigurationError("bad setting"),
    ],
    ids=type,
)
def test_the_driver_refusing_a_call_is_not_an_outage(exc: Exception) -> None:
    error = classify(exc)
    assert type(error) is errors.DatabaseError
    assert not error.retryable


def test_a_prepared_statement_lost_from_the_session_is_retryable() -> None:
    """The connection is useless (the DAL closes it); the call succeeds on another one."""
    error = classify(server_error("26000", 'prepared statement "__asyncpg_stmt_1__" is gone'))
    assert type(error) is errors.DatabaseUnavailable
    assert error.retryable


def test_an_argument_the_driver_cannot_encode_is_invalid_input() -> None:
    assert type(classify(asyncpg.DataError("invalid input for query argument $1"))) is (
        errors.InvalidInput
    )


def test_every_database_error_is_one_hierarchy_under_keen_error() -> None:
    for cls in (errors.DatabaseUnavailable, errors.TransactionConflict):
        assert issubclass(cls, errors.DatabaseError)
    assert issubclass(errors.DatabaseError, errors.KeenError)
    # DatabaseError owns no SQLSTATE of its own: the domain mapping is unchanged by it
    assert errors.DatabaseError.sqlstate is None


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"C": "KS402", "M": "no money"}, errors.InsufficientCredits),
        ({"C": "KS404", "M": "gone"}, errors.NotFound),
        ({"C": "23505", "M": "dup", "n": "users_email_key"}, errors.DuplicateEmail),
        ({"C": "23505", "M": "dup", "n": "some_other_key"}, errors.Conflict),
        ({"C": "23514", "M": "check"}, errors.InvalidInput),
        ({"C": "42501", "M": "denied"}, errors.InsufficientPrivileges),
    ],
)
def test_domain_errors_keep_their_mapping(fields: dict[str, str], expected: type) -> None:
    assert type(classify(asyncpg.PostgresError.new(fields))) is expected


def test_a_batched_items_unknown_error_is_a_database_error_not_the_drivers() -> None:
    assert type(from_fields("XX000", "internal")) is errors.DatabaseError
    assert type(from_fields("40P01", "deadlock")) is errors.TransactionConflict
    assert type(from_fields("KS402", "no money", '{"balance": "1"}')) is (
        errors.InsufficientCredits
    )


def test_what_the_driver_did_not_raise_is_not_classified() -> None:
    for exc in (ValueError("x"), RuntimeError("x"), errors.NotFound()):
        assert classify(exc) is None


def test_translating_keeps_the_cause_and_passes_other_errors_through() -> None:
    cause = asyncpg.CannotConnectNowError("the database system is shutting down")
    with pytest.raises(errors.DatabaseUnavailable) as raised, translating():
        raise cause
    assert raised.value.__cause__ is cause
    for own in (ValueError("mine"), errors.NotFound()):
        with pytest.raises(type(own)) as passed, translating():
            raise own
        assert passed.value is own


def test_a_cancellation_stays_one_when_the_driver_fails_while_unwinding_it() -> None:
    """asyncpg's rollback on a dead connection raises InterfaceError while a CancelledError
    unwinds: the caller must still see its cancellation."""
    with pytest.raises(asyncio.CancelledError), translating():
        try:
            raise asyncio.CancelledError
        finally:
            raise asyncpg.InterfaceError("cannot call Transaction.__aexit__(): closed")


def test_domain_errors_carry_their_details_as_typed_attributes() -> None:
    """What the server-side raisers send in DETAIL (JSON strings) arrives typed."""
    detail = (
        '{"balance": "1.5", "held": "0.5", "available": "1.0", "required": "3", "shortfall": "2"}'
    )
    error = classify(server_error("KS402", "insufficient credits", D=detail))
    assert isinstance(error, errors.InsufficientCredits)
    assert error.shortfall == Decimal("2") and error.available == Decimal("1.0")
    limit = classify(
        server_error(
            "KS461",
            "daily limit",
            D=(
                '{"period": "day", "limit": "5", "spent": "4", "held": "0", "required": "2",'
                ' "window_end": "2026-12-02T00:00:00+00:00"}'
            ),
        )
    )
    assert isinstance(limit, errors.SpendingLimitExceeded)
    assert (limit.period, limit.limit) == ("day", Decimal("5"))
    assert limit.window_end == datetime(2026, 12, 2, tzinfo=UTC)
    taken = classify(server_error("KS441", "taken", D='{"session_id": "s-1"}'))
    assert isinstance(taken, errors.SessionExists) and taken.session_handle == "s-1"
    unnamed = errors.InsufficientCredits()
    assert unnamed.shortfall is None and unnamed.details == {}
