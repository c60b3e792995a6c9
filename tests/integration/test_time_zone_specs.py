"""Which time zones the database accepts, and what the spend windows then promise.

The DAL accepts IANA zone names only (``UserCreate`` / ``UserProfileUpdate``: ``ZoneInfo``).
``keen_app`` may UPDATE ``users.timezone`` itself, and the database's own check
(``keen_users_check_timezone``) accepts whatever ``AT TIME ZONE`` does, POSIX specs included:
``'AAA0BBB-23,J335/1,J365/0'`` is UTC that jumps 23 hours ahead on 1 December at 01:00. The
window rule adds "a day" in local time, so across such a jump a new window ends an hour after
the previous one (docs/ledger.md: "windows are never closer together than a day").
"""

from __future__ import annotations

from datetime import datetime

import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.errors import InvalidInput

JUMPING = "AAA0BBB-23,J335/1,J365/0"


@pytest.mark.xfail(
    strict=True,
    reason="review1: the database accepts POSIX time-zone specs the DAL refuses; with one, "
    "daily spend windows one hour apart (three daily limits within an hour)",
)
async def test_the_database_refuses_a_time_zone_the_dal_refuses(
    db: KeenDatabase, alice: User, owner_conn
) -> None:
    # What the rule gives in that zone: the window after one that ended at midnight UTC is
    # one hour long.
    end = await owner_conn.fetchval(
        "SELECT keen_spend_window_end('day', $1, $2, $3)",
        datetime.fromisoformat("2026-12-01T00:00Z"), JUMPING,
        datetime.fromisoformat("2026-12-01T00:30Z"),
    )
    assert end == datetime.fromisoformat("2026-12-01T01:00Z")
    with pytest.raises(InvalidInput):
        async with db.user_transaction(alice.id) as conn:
            await conn.execute("UPDATE users SET timezone = $2 WHERE id = $1", alice.id, JUMPING)
