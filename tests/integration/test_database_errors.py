"""The transaction helpers raise keen_stream errors for what the database did, and only for that.

(The outage itself, with every public call, is tests/faults/test_database_faults.py.)
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.errors import (
    DatabaseError,
    DatabaseUnavailable,
    NotFound,
    TransactionConflict,
)

RAISE = "DO $$ BEGIN RAISE EXCEPTION 'raised for the test' USING ERRCODE = '{}'; END $$"


async def test_an_unexpected_server_error_is_a_database_error_with_its_sqlstate(
    db: KeenDatabase,
) -> None:
    with pytest.raises(DatabaseError) as raised:
        async with db.system_transaction() as conn:
            await conn.execute("SELECT * FROM no_such_table")
    assert type(raised.value) is DatabaseError
    assert raised.value.details["sqlstate"] == "42P01"
    assert isinstance(raised.value.__cause__, asyncpg.UndefinedTableError)
    assert not raised.value.retryable


@pytest.mark.parametrize("sqlstate", ["40P01", "40001"])
async def test_a_deadlock_or_serialization_failure_is_a_retryable_conflict(
    db: KeenDatabase, alice: User, sqlstate: str
) -> None:
    with pytest.raises(TransactionConflict) as raised:
        async with db.user_transaction(alice.id) as conn:
            await conn.execute(RAISE.format(sqlstate))
    assert raised.value.retryable
    assert raised.value.details["sqlstate"] == sqlstate


@pytest.mark.parametrize(
    "own",
    [ValueError("mine"), OSError("my file"), TimeoutError("my deadline"), NotFound("mine")],
    ids=lambda e: type(e).__name__,
)
async def test_a_callers_own_exception_passes_through_untouched(
    db: KeenDatabase, alice: User, own: Exception
) -> None:
    """Only the driver's errors are translated: an OSError or TimeoutError raised by the code
    inside the block, on a live connection, is the caller's."""
    with pytest.raises(type(own)) as raised:
        async with db.user_transaction(alice.id) as conn:
            await conn.fetchval("SELECT 1")
            raise own
    assert raised.value is own
    async with db.user_transaction(alice.id) as conn:  # and the pool is fine afterwards
        assert await conn.fetchval("SELECT 1") == 1


async def test_a_cancelled_call_stays_cancelled_and_gives_its_connection_back(
    db: KeenDatabase, alice: User
) -> None:
    started = asyncio.Event()

    async def slow() -> None:
        async with db.user_transaction(alice.id) as conn:
            started.set()
            await conn.execute("SELECT pg_sleep(30)")

    task = asyncio.create_task(slow())
    await started.wait()
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with db.user_transaction(alice.id) as conn:
        assert await conn.fetchval("SELECT 1") == 1
    assert db.pool.get_size() - db.pool.get_idle_size() == 0


async def _kill_backend(db: KeenDatabase, conn: asyncpg.Connection) -> None:
    """Terminate ``conn``'s backend from another connection and wait until asyncpg sees it."""
    pid = conn.get_server_pid()
    other = await asyncpg.connect(db.dsn)
    try:
        await other.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await other.close()
    for _ in range(200):
        try:
            if conn.is_closed():
                return
        except asyncpg.InterfaceError:  # released by asyncpg as it died
            return
        await asyncio.sleep(0.01)


async def test_a_cancellation_on_a_dead_connection_stays_a_cancellation(
    db: KeenDatabase, alice: User
) -> None:
    """asyncpg cannot roll back on the dead connection and raises InterfaceError over the
    CancelledError; the caller must see its cancellation, not a database error."""
    with pytest.raises(asyncio.CancelledError):
        async with db.user_transaction(alice.id) as conn:
            await _kill_backend(db, conn)
            raise asyncio.CancelledError
    async with db.user_transaction(alice.id) as conn:
        assert await conn.fetchval("SELECT 1") == 1


async def test_a_killed_backend_is_database_unavailable_and_the_next_call_works(
    db: KeenDatabase, alice: User
) -> None:
    with pytest.raises(DatabaseUnavailable):
        async with db.user_transaction(alice.id) as conn:
            await _kill_backend(db, conn)
            await conn.fetchval("SELECT 1")
    assert (await db.users.get(alice.id)).id == alice.id
