"""What a caller's misuse of the driver is called (docs/operations.md, "When the database fails").

``pgerrors.classify`` maps every ``asyncpg.InterfaceError`` to ``DatabaseUnavailable``: "the
database cannot be reached", retryable, and the DAL terminates the connection. Most of
asyncpg's InterfaceErrors say nothing about the database: a result type the driver cannot
decode, an argument it cannot encode, a second query on a busy connection. The caller told to
"retry with exponential backoff" retries a bug for ever, the hub answers ``unavailable``
instead of ``internal_error``, and a healthy backend is thrown away each time. Only a
connection that is gone is an outage.
"""

from __future__ import annotations

import asyncio

import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.errors import DatabaseError


async def test_a_result_the_driver_cannot_decode_is_not_an_outage(db: KeenDatabase) -> None:
    with pytest.raises(DatabaseError) as raised:
        async with db.system_transaction() as conn:
            # A row type with a jsonb column: the DAL gives jsonb a text codec, and asyncpg
            # cannot decode a composite with a text-format field.
            await conn.fetch("SELECT t FROM credit_transactions t")
    assert not raised.value.retryable, raised.value


async def test_a_second_query_on_a_busy_connection_is_misuse_and_keeps_the_connection(
    db: KeenDatabase,
) -> None:
    with pytest.raises(DatabaseError) as raised:
        async with db.system_transaction() as conn:
            pid = conn.get_server_pid()
            slow = asyncio.ensure_future(conn.fetchval("SELECT pg_sleep(0.2)"))
            try:
                await asyncio.sleep(0.05)
                await conn.fetchval("SELECT 1")  # asyncpg: another operation is in progress
            finally:
                await slow
    assert not raised.value.retryable, raised.value
    assert "another operation is in progress" in str(raised.value)
    async with db.pool.acquire() as conn:  # the one healthy backend was not thrown away
        assert conn.get_server_pid() == pid


async def test_a_connection_that_is_gone_is_still_an_outage(db: KeenDatabase) -> None:
    with pytest.raises(DatabaseError) as raised:
        async with db.system_transaction() as conn:
            conn.terminate()
            await conn.fetchval("SELECT 1")
    assert raised.value.retryable, raised.value
