"""What a caller's misuse of the driver is called (docs/operations.md, "When the database fails").

``pgerrors.classify`` maps every ``asyncpg.InterfaceError`` to ``DatabaseUnavailable``: "the
database cannot be reached", retryable, and the DAL terminates the connection. Most of
asyncpg's InterfaceErrors say nothing about the database: a result type the driver cannot
decode, an argument it cannot encode, a second query on a busy connection. The caller told to
"retry with exponential backoff" retries a bug for ever, the hub answers ``unavailable``
instead of ``internal_error``, and a healthy backend is thrown away each time.
"""

from __future__ import annotations

import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.errors import DatabaseError


@pytest.mark.xfail(
    strict=True,
    reason="review1: an asyncpg UnsupportedClientFeatureError (a caller's query the driver "
    "cannot decode) is classified DatabaseUnavailable (retryable) and its connection killed",
)
async def test_a_result_the_driver_cannot_decode_is_not_an_outage(db: KeenDatabase) -> None:
    with pytest.raises(DatabaseError) as raised:
        async with db.system_transaction() as conn:
            # A row type with a jsonb column: the DAL gives jsonb a text codec, and asyncpg
            # cannot decode a composite with a text-format field.
            await conn.fetch("SELECT t FROM credit_transactions t")
    assert not raised.value.retryable, raised.value
