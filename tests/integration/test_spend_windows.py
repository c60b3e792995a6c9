"""A change of time zone never raises what can be spent within a day or a month.

The spending limits count spend in windows that end at a local midnight (or the first of a
month) of the user's zone (docs/ledger.md, "Spending limits"). The behaviour tests run the
issue's scenario through the DAL at whatever time the suite runs; the rule itself is checked at
fixed instants by calling the one SQL definition of a window's end with an explicit "now".
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from keen_stream import migrate
from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.errors import SpendingLimitExceeded
from tests.integration.credits_support import fund

D = Decimal
# At any instant, UTC+14 and UTC-12 are 26 hours apart: they never share a local date, so at
# least one of the two switches below lands on a different "today" than UTC's.
ZONES = ("Pacific/Kiritimati", "Etc/GMT+12")

WINDOW_END = "SELECT keen_spend_window_end($1, $2, $3, $4)"
REZONED = "SELECT keen_spend_window_rezoned($1, $2, $3, $4)"


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.mark.parametrize("period", ["day", "month"])
async def test_switching_zones_never_raises_the_limit(
    db: KeenDatabase, alice: User, owner_conn, period: str
):
    """The issue's scenario: UTC -> Pacific/Kiritimati -> Etc/GMT+12 let a user with a limit
    of 5 spend 15 in one day."""
    await fund(db, alice, "100")
    limit = {"day": "daily_limit", "month": "monthly_limit"}[period]
    limits: dict[str, Any] = {limit: D("5")}
    await db.credits.set_spending_limits(alice.id, **limits)
    await db.credits.deduct_credits(alice.id, D("1"), None, "5 credits in UTC")
    for zone in ZONES:
        await db.users.update_profile(alice.id, timezone=zone)
        with pytest.raises(SpendingLimitExceeded) as refused:
            await db.credits.deduct_credits(alice.id, D("1"), None, f"5 more in {zone}")
        assert refused.value.spent == D("5")
    balance = await db.credits.get_balance(alice.id)
    spent = balance.spent_today if period == "day" else balance.spent_this_month
    assert spent == D("5") and balance.lifetime_spent == D("5")
    assert (
        await owner_conn.fetchval(
            "SELECT count(*) FROM credit_transactions WHERE transaction_type = 'usage'"
        )
        == 1
    )


async def test_a_zone_change_keeps_the_spend_and_never_ends_a_window_earlier(
    db: KeenDatabase, alice: User, owner_conn
):
    await fund(db, alice, "100")
    await db.credits.deduct_credits(alice.id, D("1"), None, "x")
    before = await owner_conn.fetchrow(
        "SELECT spend_day_end, spend_month_end FROM credit_accounts WHERE user_id = $1",
        alice.id,
    )
    for zone in (*ZONES, "UTC"):
        await db.users.update_profile(alice.id, timezone=zone)
        after = await owner_conn.fetchrow(
            "SELECT spent_day, spend_day_end, spent_month, spend_month_end"
            "  FROM credit_accounts WHERE user_id = $1",
            alice.id,
        )
        assert after["spend_day_end"] >= before["spend_day_end"]
        assert after["spend_month_end"] >= before["spend_month_end"]
        assert (after["spent_day"], after["spent_month"]) == (D("5"), D("5"))
        before = after


async def test_window_ends_at_fixed_instants(owner_conn):
    async def end(period: str, previous: str | None, zone: str, now: str) -> datetime:
        ends: datetime = await owner_conn.fetchval(
            WINDOW_END, period, previous and at(previous), zone, at(now)
        )
        return ends

    async def rezoned(period: str, previous: str, zone: str, now: str) -> datetime:
        ends: datetime = await owner_conn.fetchval(REZONED, period, at(previous), zone, at(now))
        return ends

    now = "2026-01-31T13:00:00Z"
    # A first charge opens a window to the end of the local day / month.
    assert await end("day", None, "UTC", now) == at("2026-02-01T00:00:00Z")
    assert await end("month", None, "UTC", now) == at("2026-02-01T00:00:00Z")
    # A charge inside a window keeps it.
    assert await end("day", "2026-02-01T00:00Z", "Etc/GMT+12", now) == at("2026-02-01T00:00Z")
    # The switches, at one instant: each extends the open window, none shortens it.
    day = await rezoned("day", "2026-02-01T00:00Z", "Pacific/Kiritimati", now)  # Feb 1, 03:00
    assert day == at("2026-02-01T10:00:00Z")  # the end of Kiritimati's Feb 1
    day = await rezoned("day", day.isoformat(), "Etc/GMT+12", now)  # Jan 31, 01:00 there
    assert day == at("2026-02-01T12:00:00Z")  # the end of Jan 31 at UTC-12
    day = await rezoned("day", day.isoformat(), "UTC", now)
    assert day == at("2026-02-01T12:00:00Z")  # UTC's day ends earlier: kept
    month = await rezoned("month", "2026-02-01T00:00Z", "Pacific/Kiritimati", now)
    assert month == at("2026-02-28T10:00:00Z")  # it is already February there
    assert await rezoned("month", month.isoformat(), "Etc/GMT+12", now) == month
    # A fixed zone across a DST change: windows are exactly its local days.
    ny = "America/New_York"
    assert await end("day", None, ny, "2026-03-08T16:00Z") == at("2026-03-09T04:00Z")
    assert await end("day", "2026-03-09T04:00Z", ny, "2026-03-09T14:00Z") == at("2026-03-10T04:00Z")


@pytest.mark.parametrize(
    ("period", "length"), [("day", timedelta(days=1)), ("month", timedelta(days=28))]
)
async def test_hopping_zones_never_opens_windows_faster_than_one_per_period(
    owner_conn, period: str, length: timedelta
):
    """After a window ends, a user who moves one zone west every hour (or every day, for
    months) would, with "the end of the new zone's current day", get a fresh window (and a
    fresh limit) each time. Each new window ends at least a period after the last one."""
    step = timedelta(hours=1) if period == "day" else timedelta(days=1)
    now = at("2026-03-09T23:30:00Z")
    window_end: datetime | None = None
    ends: list[datetime] = []
    for hop in range(72):
        zone = f"Etc/GMT+{hop % 12}"  # UTC, UTC-1, ..., UTC-11, and round again
        opens = window_end is None or now >= window_end
        if window_end is not None:  # the zone change (the trigger on users.timezone)
            window_end = await owner_conn.fetchval(REZONED, period, window_end, zone, now)
        # then a charge
        window_end = await owner_conn.fetchval(WINDOW_END, period, window_end, zone, now)
        if opens:
            ends.append(window_end)
        else:
            ends[-1] = window_end  # the same window, perhaps extended
        now += step
    assert len(ends) >= 2
    assert all(later - earlier >= length for earlier, later in itertools.pairwise(ends))


async def test_the_migration_carries_todays_spend_over_and_back(empty_dsn: str):
    """0007 turns each account's local day / month into the end of its window, and back."""
    await migrate.upgrade_async(empty_dsn, "0006_stream_latency")
    conn = await asyncpg.connect(empty_dsn)
    try:
        local = "(now() AT TIME ZONE 'Pacific/Kiritimati')"
        await conn.execute(
            "INSERT INTO users (email, username, password_hash, timezone)"
            " VALUES ('k@example.com', 'kiri', 'x', 'Pacific/Kiritimati')"
        )
        await conn.execute(
            "INSERT INTO credit_accounts (user_id, spend_day, spent_day, spend_month, spent_month)"
            f" SELECT id, {local}::date, 3, date_trunc('month', {local})::date, 4 FROM users"
        )
        await migrate.upgrade_async(empty_dsn)
        row = await conn.fetchrow(
            f"SELECT spend_day_end = (date_trunc('day', {local}) + interval '1 day')"
            "                       AT TIME ZONE 'Pacific/Kiritimati' AS day_ok,"
            f"       spend_month_end = (date_trunc('month', {local}) + interval '1 month')"
            "                         AT TIME ZONE 'Pacific/Kiritimati' AS month_ok,"
            "       keen_spend_in_window(spent_day, spend_day_end, now()) AS today,"
            "       keen_spend_in_window(spent_month, spend_month_end, now()) AS month"
            "  FROM credit_accounts"
        )
        assert (row["day_ok"], row["month_ok"], row["today"], row["month"]) == (
            True,
            True,
            D(3),
            D(4),
        )
        await asyncio.to_thread(migrate.downgrade, empty_dsn, "0006_stream_latency")
        row = await conn.fetchrow(
            f"SELECT spend_day = {local}::date AS day_ok,"
            f"       spend_month = date_trunc('month', {local})::date AS month_ok"
            "  FROM credit_accounts"
        )
        assert (row["day_ok"], row["month_ok"]) == (True, True)
    finally:
        await conn.close()
