"""Analytics rollups: the same figures as the live computation, late writes included.

The admin analytics add stored hours (analytics_hourly) to a live read of the rest of the window
(keen_analytics_rolled). These tests compare that, field by field, with the live computation
(keen_analytics_window) over the same [from, to) on randomized rows placed on and around hour
and day boundaries, before any rollup, after one, after writes to rolled hours, and after the
next rollup.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import SessionCreate, User
from keen_stream.errors import InsufficientPrivileges, InvalidInput, NotFound
from tests.conftest import make_settings

STATUSES = ("running", "completed", "failed", "cancelled", "timed_out")


def _hour(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def random_instants(rng: random.Random, now: datetime, count: int) -> Iterator[datetime]:
    """Instants over the last 9 days, many exactly on or next to an hour or a UTC midnight."""
    for _ in range(count):
        base = now - timedelta(seconds=rng.uniform(0, 9 * 86400))
        match rng.randrange(5):
            case 0:
                yield _hour(base)
            case 1:
                yield base.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(
                    microseconds=rng.choice((1, 0))
                )
            case 2:
                yield _hour(base) - timedelta(microseconds=1)
            case 3:
                yield now - timedelta(seconds=rng.uniform(0, 3600))  # the unrolled current hour
            case _:
                yield base


async def add_sessions(
    conn: asyncpg.Connection,
    rng: random.Random,
    users: list[User],
    at: list[datetime],
    prefix: str = "s",
) -> None:
    """Sessions as the owner, with every trigger in place: roots, and sub-agents of roots
    that are ended after their child started (a sub-agent needs a running parent)."""
    for i, start in enumerate(at):
        user = rng.choice(users)
        status = rng.choice(STATUSES)
        parent = None
        if i % 4 == 3:
            parent = await conn.fetchval(
                """INSERT INTO agent_sessions (user_id, session_id, git_branch, vision,
                       working_directory, start_time)
                   VALUES ($1, $2, 'm', 'v', '/w', $3) RETURNING id""",
                user.id,
                f"{prefix}-p{i}",
                start,
            )
        usd = Decimal(rng.randrange(0, 10_000_000)) / 1_000_000
        await conn.execute(
            """INSERT INTO agent_sessions (user_id, session_id, parent_session_id, git_branch,
                   vision, working_directory, start_time, end_time, execution_status, success,
                   claude_cost_usd, keen_cost_credits, tokens_used, context_tokens_used)
               VALUES ($1, $2, $3, 'm', 'v', '/w', $4,
                       CASE WHEN $5::text = 'running' THEN NULL
                            ELSE $4::timestamptz + $6::float8 * interval '1 second' END,
                       $5::text,
                       CASE WHEN $5::text = 'running' THEN NULL ELSE $5::text = 'completed' END,
                       $7::numeric, $7::numeric * 5, $8::bigint, $8::bigint / 3)""",
            user.id,
            f"{prefix}{i}",
            parent,
            start,
            status,
            rng.uniform(0.5, 7200.0),
            usd,
            rng.randrange(0, 100_000),
        )
        if parent is not None:
            await conn.execute(
                """UPDATE agent_sessions SET execution_status = 'completed', success = true,
                       end_time = start_time + interval '7 minutes 3.25 seconds'
                   WHERE id = $1""",
                parent,
            )


async def add_ledger(
    conn: asyncpg.Connection, rng: random.Random, users: list[User], at: list[datetime]
) -> None:
    """Ledger rows as the owner (created_at in the past), valid per the ledger's checks."""
    for when in at:
        user = rng.choice(users)
        kind = rng.choice(("purchase", "usage", "admin_bypass", "adjustment"))
        amount = Decimal(rng.randrange(1, 5_000_000)) / 1_000_000
        amount = {"usage": -amount, "admin_bypass": Decimal(0)}.get(kind, amount)
        await conn.execute(
            """INSERT INTO credit_transactions (user_id, account_id, transaction_type, amount,
                   balance_after, claude_cost_usd, description, is_admin_bypass, created_at,
                   sequence_number)
               SELECT $1, a.id, $2::text, $3, 0, $4, 'test', $2::text = 'admin_bypass', $5,
                      a.last_sequence + 1
                 FROM credit_accounts a WHERE a.user_id = $1""",
            user.id,
            kind,
            amount,
            Decimal(rng.randrange(0, 3_000_000)) / 1_000_000 if kind != "purchase" else None,
            when,
        )
        await conn.execute(
            "UPDATE credit_accounts SET last_sequence = last_sequence + 1 WHERE user_id = $1",
            user.id,
        )


async def roll_retrying(conn: asyncpg.Connection) -> None:
    """Until a roll is waiting for an hour's lock: retrying it (or queued for it, as the rolls
    did before they retried)."""
    waiting = (
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
        " AND query = 'SELECT keen_analytics_roll_hour($1)'"
        " AND wait_event IN ('advisory', 'PgSleep')"
    )
    for _ in range(500):
        if await conn.fetchval(waiting):
            break
        await asyncio.sleep(0.01)
    assert await conn.fetchval(waiting) == 1


async def assert_same_as_live(db: KeenDatabase, windows: list[tuple[datetime, datetime]]) -> None:
    async with db.system_transaction() as conn:
        for start, end in windows:
            live = await conn.fetchrow("SELECT * FROM keen_analytics_window($1, $2)", start, end)
            rolled = await conn.fetchrow("SELECT * FROM keen_analytics_rolled($1, $2)", start, end)
            assert dict(rolled) == dict(live), (start, end)
            # The same digits too (scale included), not only equal values.
            assert {k: str(v) for k, v in rolled.items()} == {k: str(v) for k, v in live.items()}


def windows_around(rng: random.Random, now: datetime) -> list[tuple[datetime, datetime]]:
    fixed = [(now - timedelta(days=d), now) for d in (1, 7, 30)]
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    fixed += [
        (midnight - timedelta(days=3), midnight),  # whole UTC days
        (_hour(now) - timedelta(hours=5), _hour(now)),  # whole hours
        (midnight - timedelta(hours=2, microseconds=1), midnight + timedelta(microseconds=1)),
        (_hour(now), now),  # inside the current hour
    ]
    for _ in range(12):
        a, b = sorted(now - timedelta(seconds=rng.uniform(0, 10 * 86400)) for _ in range(2))
        fixed.append((a, b))
    return fixed


async def test_rollups_give_the_live_figures_before_and_after_late_writes(
    db: KeenDatabase,
    admin: User,
    alice: User,
    bob: User,
    owner_conn: asyncpg.Connection,
) -> None:
    rng = random.Random(20261201)
    now = await owner_conn.fetchval("SELECT now()")
    users = [alice, bob, admin]
    await add_sessions(owner_conn, rng, users, list(random_instants(rng, now, 60)))
    await add_ledger(owner_conn, rng, users, list(random_instants(rng, now, 120)))
    # Nothing rolled yet: all of it is read live.
    await assert_same_as_live(db, windows_around(rng, now))

    report = await db.analytics.rollup()
    assert report.hours >= 9 * 24  # every ended hour since the first row
    assert await owner_conn.fetchval("SELECT count(*) FROM analytics_dirty_hours") == 0
    await assert_same_as_live(db, windows_around(rng, now))

    # Late writes to rolled hours: sessions ending, costs changing, rows arriving for old hours,
    # sessions moved to another hour, sessions deleted.
    await owner_conn.execute(
        """UPDATE agent_sessions SET execution_status = 'failed', success = false,
               end_time = start_time + interval '1 minute', claude_cost_usd = 0.123457
           WHERE execution_status = 'running'"""
    )
    await owner_conn.execute(
        """UPDATE agent_sessions SET start_time = start_time - interval '1 day 3 hours'
            WHERE session_id IN ('s1', 's2')"""
    )
    await add_ledger(owner_conn, rng, users, list(random_instants(rng, now, 20)))
    await add_sessions(owner_conn, rng, users, list(random_instants(rng, now, 8)), "late")
    await db.analytics.rollup()  # the late sessions' hours are rolled with them ...
    deleted = await owner_conn.execute(
        "DELETE FROM agent_sessions WHERE session_id IN ('late0', 'late1', 'late2')"
    )
    assert deleted == "DELETE 3"  # ... then they are deleted (no ledger row names them)
    await add_ledger(owner_conn, rng, users, list(random_instants(rng, now, 5)))
    dirty = await owner_conn.fetchval("SELECT count(*) FROM analytics_dirty_hours")
    assert dirty > 0
    await assert_same_as_live(db, windows_around(rng, now))

    again = await db.analytics.rollup()
    assert again.hours >= dirty
    assert await owner_conn.fetchval("SELECT count(*) FROM analytics_dirty_hours") == 0
    await assert_same_as_live(db, windows_around(rng, now))
    # The public call is the rolled one, and the live one gives the same figures.
    for time_range, days in (("day", 1), ("week", 7), ("month", 30)):
        result = await db.analytics.get_admin_analytics(time_range, actor_id=admin.id)  # type: ignore[arg-type]
        async with db.system_transaction() as conn:
            live = await conn.fetchrow(
                "SELECT * FROM keen_analytics_window($1, $2)",
                result.window_start,
                result.window_end,
            )
        assert result.session_metrics.total_sessions == live["total_sessions"]
        assert result.cost_analysis.total_claude_costs == live["total_claude_costs_usd"]
        assert result.cost_analysis.credits_used == live["credits_used"]
        assert result.window_end - result.window_start == timedelta(days=days)


async def test_rolling_again_writes_the_same_rows(
    db: KeenDatabase, alice: User, owner_conn: asyncpg.Connection
) -> None:
    rng = random.Random(7)
    now = await owner_conn.fetchval("SELECT now()")
    await add_sessions(owner_conn, rng, [alice], list(random_instants(rng, now, 20)))
    await add_ledger(owner_conn, rng, [alice], list(random_instants(rng, now, 20)))
    day = (now - timedelta(days=2)).date()
    first = await db.analytics.rollup(since=day)
    hourly = "SELECT * FROM analytics_hourly ORDER BY hour_bucket"
    daily = "SELECT * FROM daily_analytics ORDER BY date_bucket"

    def figures(rows: list[asyncpg.Record], *volatile: str) -> list[dict[str, object]]:
        return [{k: v for k, v in r.items() if k not in volatile} for r in rows]

    hours = figures(await owner_conn.fetch(hourly), "rolled_at")
    days = figures(await owner_conn.fetch(daily), "id", "created_at", "updated_at")
    second = await db.analytics.rollup(since=day)
    # Both the forced ones, from `day` on (older hours are not marked: never rolled, read live).
    assert second.days == [day + timedelta(days=i) for i in range(len(second.days))]
    assert 0 < second.hours == first.hours
    assert figures(await owner_conn.fetch(hourly), "rolled_at") == hours
    assert figures(await owner_conn.fetch(daily), "id", "created_at", "updated_at") == days
    assert [d.date_bucket for d in [await db.analytics.rollup_daily(day)]] == [day]
    with pytest.raises(InvalidInput):
        await db.analytics.rollup(since=day, day=day)
    with pytest.raises(InvalidInput):
        await db.analytics.rollup(since="2026-01-01")  # type: ignore[arg-type]


async def test_a_roll_waits_for_a_writer_to_its_hour_without_queueing_the_others(
    db: KeenDatabase, alice: User, bob: User, fresh_dsn: str, owner_conn: asyncpg.Connection
) -> None:
    """The advisory lock: a writer that has touched an ended hour holds it shared until it
    commits; the roll of that hour waits for it, then reads its row. It waits by retrying, not
    in the lock's queue: queued, its exclusive request made every later writer to that hour
    (each progress report of a session started then) wait behind it, for as long as the first
    writer's transaction stayed open (up to the roll's statement_timeout, every run)."""
    hour = _hour(datetime.now(UTC)) - timedelta(hours=3)
    await add_ledger(owner_conn, random.Random(2), [alice], [hour + timedelta(minutes=1)])
    await db.analytics.rollup(since=hour.date())
    writer, other = await asyncpg.connect(fresh_dsn), await asyncpg.connect(fresh_dsn)
    try:
        tx = writer.transaction()
        await tx.start()
        await add_ledger(writer, random.Random(1), [alice], [hour + timedelta(minutes=5)])
        roll = asyncio.create_task(db.analytics.rollup(day=hour.date()))
        await roll_retrying(owner_conn)
        assert not roll.done()
        # Another writer to the same hour goes through meanwhile.
        await other.execute("SET lock_timeout = '2s'")
        await add_ledger(other, random.Random(6), [bob], [hour + timedelta(minutes=7)])
        assert not roll.done()
        await tx.commit()
        await roll
    finally:
        await writer.close()
        await other.close()
    # Stored and not marked: so only equal to the live figures if the roll counted the rows.
    assert await owner_conn.fetchval(
        "SELECT count(*) FROM analytics_hourly WHERE hour_bucket = $1", hour
    )
    assert not await owner_conn.fetchval(
        "SELECT count(*) FROM analytics_dirty_hours WHERE hour_bucket = $1", hour
    )
    await assert_same_as_live(db, [(hour - timedelta(hours=1), hour + timedelta(hours=2))])


async def test_writers_to_a_rolled_hour_do_not_wait_for_each_others_marks(
    db: KeenDatabase, alice: User, bob: User, fresh_dsn: str, owner_conn: asyncpg.Connection
) -> None:
    """The first write to a rolled hour marks it. With a unique mark and ON CONFLICT, every
    other writer to that hour waited for the first one's commit (its uncommitted mark), however
    long; and two writers marking two hours in opposite orders deadlocked."""
    hours = [_hour(datetime.now(UTC)) - timedelta(hours=h) for h in (3, 4)]
    await add_ledger(owner_conn, random.Random(2), [alice], hours)
    await db.analytics.rollup(since=hours[1].date())
    first, second = await asyncpg.connect(fresh_dsn), await asyncpg.connect(fresh_dsn)
    try:
        await second.execute("SET lock_timeout = '2s'")
        async with first.transaction(), second.transaction():
            await add_ledger(first, random.Random(1), [alice], [hours[0]])
            await add_ledger(second, random.Random(1), [bob], [hours[1]])
            await add_ledger(second, random.Random(1), [bob], [hours[0]])
            await add_ledger(first, random.Random(1), [alice], [hours[1]])
    finally:
        await first.close()
        await second.close()
    marked = "SELECT DISTINCT hour_bucket FROM analytics_dirty_hours ORDER BY 1"
    assert [r[0] for r in await owner_conn.fetch(marked)] == sorted(hours)
    await assert_same_as_live(db, [(hours[1], hours[0] + timedelta(hours=1))])
    assert (await db.analytics.rollup()).hours == 2
    assert not await owner_conn.fetchval("SELECT count(*) FROM analytics_dirty_hours")
    await assert_same_as_live(db, [(hours[1], hours[0] + timedelta(hours=1))])


async def test_a_repeatable_read_writer_marks_an_hour_rolled_after_its_snapshot(
    db: KeenDatabase, alice: User, bob: User, fresh_dsn: str, owner_conn: asyncpg.Connection
) -> None:
    """A writer whose snapshot predates the roll cannot see the roll's row or that it cleared
    the old mark: it must mark the hour anyway, or its row is missing from the stored hour."""
    hour = _hour(datetime.now(UTC)) - timedelta(hours=3)
    await add_ledger(owner_conn, random.Random(2), [alice], [hour])
    await db.analytics.rollup(since=hour.date())
    writer = await asyncpg.connect(fresh_dsn)
    try:
        await add_ledger(owner_conn, random.Random(3), [alice], [hour])  # marks the hour
        async with writer.transaction(isolation="repeatable_read"):
            await writer.fetchval("SELECT count(*) FROM analytics_dirty_hours")  # the snapshot
            assert (await db.analytics.rollup()).hours == 1  # clears the mark
            await add_ledger(writer, random.Random(4), [bob], [hour + timedelta(minutes=9)])
    finally:
        await writer.close()
    assert await owner_conn.fetchval(
        "SELECT count(*) FROM analytics_dirty_hours WHERE hour_bucket = $1", hour
    )
    await assert_same_as_live(db, [(hour, hour + timedelta(hours=1))])


async def test_tenants_cannot_read_or_write_the_rollups(
    db: KeenDatabase, admin: User, alice: User, owner_conn: asyncpg.Connection
) -> None:
    await add_ledger(
        owner_conn, random.Random(3), [alice], [datetime.now(UTC) - timedelta(hours=5)]
    )
    # Older than alice: only a backfill rolls it.
    await db.analytics.rollup(since=(datetime.now(UTC) - timedelta(days=1)).date())
    async with db.user_transaction(alice.id) as conn:
        assert await conn.fetch("SELECT * FROM analytics_hourly") == []
    async with db.user_transaction(admin.id) as conn:
        assert len(await conn.fetch("SELECT * FROM analytics_hourly")) > 0
    for sql in (
        "SELECT * FROM analytics_dirty_hours",
        "SELECT * FROM keen_analytics_rolled(now() - interval '1 day', now())",
        "SELECT keen_analytics_roll_hour(date_trunc('hour', now()) - interval '2 hours')",
        "DELETE FROM analytics_hourly",
        "INSERT INTO analytics_dirty_hours (hour_bucket) VALUES (now())",
    ):
        for who in (alice, admin):
            with pytest.raises(InsufficientPrivileges):
                async with db.user_transaction(who.id) as conn:
                    await conn.execute(sql)


async def test_user_usage_per_day_in_the_users_time_zone_under_rls(
    db: KeenDatabase, admin: User, alice: User, bob: User, owner_conn: asyncpg.Connection
) -> None:
    await owner_conn.execute("UPDATE users SET timezone = 'Asia/Kolkata' WHERE id = $1", alice.id)
    today = await owner_conn.fetchval("SELECT (now() AT TIME ZONE 'Asia/Kolkata')::date")
    # 00:10 local on each of the last three days: 18:40 UTC the day before.
    for back, tokens in ((0, 100), (1, 200), (2, 400)):
        local = datetime.combine(today - timedelta(days=back), datetime.min.time())
        await owner_conn.execute(
            """INSERT INTO agent_sessions (user_id, session_id, git_branch, vision,
                   working_directory, start_time, tokens_used, context_tokens_used)
               VALUES ($1, $2, 'm', 'v', '/w',
                       ($3::timestamp + interval '10 minutes') AT TIME ZONE 'Asia/Kolkata',
                       $4::bigint, $4::bigint / 2)""",
            alice.id,
            f"u{back}",
            local,
            tokens,
        )
    await db.sessions.create_session(
        bob.id,
        SessionCreate(session_handle="bob1", vision="v", working_directory="/w", git_branch="m"),
    )
    await db.billing.purchase(alice.id, Decimal("20.5"), description="top-up")
    await db.credits.deduct_credits(alice.id, Decimal("0.5"), "u0", "model call")

    week = await db.analytics.get_user_usage(alice.id, "week")
    assert week.timezone == "Asia/Kolkata"
    assert [d.day for d in week.days] == [today - timedelta(days=6 - i) for i in range(7)]
    assert [d.sessions for d in week.days][-3:] == [1, 1, 1]
    assert [d.tokens_used for d in week.days][-3:] == [400, 200, 100]
    assert week.days[-1].credits_purchased == Decimal("20.5")
    assert week.days[-1].credits_used == Decimal("2.5")  # 0.5 USD at the 5.00 markup
    assert isinstance(week.total_credits_used, Decimal)
    assert (week.total_sessions, week.total_tokens_used) == (3, 700)
    day = await db.analytics.get_user_usage(alice.id, "day")
    assert [(d.day, d.sessions) for d in day.days] == [(today, 1)]
    # Bob's session is not in alice's figures; an admin reads alice's; bob may not.
    assert (await db.analytics.get_user_usage(alice.id, "month", actor_id=admin.id)) == (
        await db.analytics.get_user_usage(alice.id, "month")
    )
    with pytest.raises(InsufficientPrivileges):
        await db.analytics.get_user_usage(alice.id, actor_id=bob.id)
    with pytest.raises(NotFound):
        await db.analytics.get_user_usage("00000000-0000-0000-0000-000000000000", actor_id=admin.id)
    with pytest.raises(InvalidInput):
        await db.analytics.get_user_usage(alice.id, "year")  # type: ignore[arg-type]
    # RLS, not the DAL's check, is what keeps bob out of alice's rows.
    async with db.user_transaction(bob.id) as conn:
        assert not await conn.fetchval(
            "SELECT count(*) FROM agent_sessions WHERE user_id = $1", alice.id
        )


async def test_rollups_do_not_depend_on_the_connections_time_zone(
    fresh_dsn: str, alice: User, owner_conn: asyncpg.Connection
) -> None:
    """Hours are UTC hours whatever TimeZone the connections run with (+05:30 here, where a
    local hour starts at :30 UTC), and the figures stay the live ones."""
    await owner_conn.execute(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET TimeZone = %L',"
        " current_database(), 'Asia/Kolkata'); END $$"
    )
    db = await KeenDatabase.connect(settings=make_settings(fresh_dsn), migrate=False)
    try:
        async with db.system_transaction() as conn:
            assert await conn.fetchval("SHOW TimeZone") == "Asia/Kolkata"
        rng = random.Random(530)
        now = await owner_conn.fetchval("SELECT now()")
        await add_sessions(owner_conn, rng, [alice], list(random_instants(rng, now, 30)))
        await add_ledger(owner_conn, rng, [alice], list(random_instants(rng, now, 30)))
        await db.analytics.rollup()
        assert not await owner_conn.fetchval(
            "SELECT count(*) FROM analytics_hourly"
            " WHERE hour_bucket <> date_trunc('hour', hour_bucket, 'UTC')"
        )
        await assert_same_as_live(db, windows_around(rng, now))
    finally:
        await db.close()


async def test_a_tenant_cannot_mark_hours_the_roll_would_then_walk_through(
    db: KeenDatabase, alice: User, owner_conn: asyncpg.Connection
) -> None:
    """Marking is for the triggers. Called directly, a mark on year 1 became a stored hour at the
    next roll, and every roll after it started its never-rolled walk there: 17 million hours,
    one transaction each, for ever."""
    await add_ledger(
        owner_conn, random.Random(4), [alice], [datetime.now(UTC) - timedelta(hours=5)]
    )
    await db.analytics.rollup(since=(datetime.now(UTC) - timedelta(days=1)).date())
    rolled = await owner_conn.fetchval("SELECT min(hour_bucket) FROM analytics_hourly")
    for hour in (datetime(1, 1, 1, tzinfo=UTC), rolled):
        with pytest.raises(InsufficientPrivileges):
            async with db.user_transaction(alice.id) as conn:
                await conn.execute("SELECT keen_analytics_mark_hour($1)", hour)
    assert await owner_conn.fetchval("SELECT count(*) FROM analytics_dirty_hours") == 0
    # A write to an ended hour never rolled marks nothing: it is read live until rolled.
    await add_ledger(owner_conn, random.Random(5), [alice], [datetime(2001, 1, 1, tzinfo=UTC)])
    assert await owner_conn.fetchval("SELECT count(*) FROM analytics_dirty_hours") == 0
    await assert_same_as_live(
        db, [(datetime(2000, 12, 31, tzinfo=UTC), datetime.now(UTC) - timedelta(hours=1))]
    )
    assert (await db.analytics.rollup()).hours == 0


async def test_a_roll_reads_after_its_lock_whatever_the_databases_default_isolation(
    fresh_dsn: str, alice: User, bob: User, owner_conn: asyncpg.Connection
) -> None:
    """The roll reads the hour after taking its lock, in statements of their own: READ
    COMMITTED. Under a database default of REPEATABLE READ its snapshot was the transaction's
    first, taken before a writer it waited for committed: that writer's row (it had found the
    hour already marked) was left out of the stored hour, and the mark cleared."""
    await owner_conn.execute(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET default_transaction_isolation = %L',"
        " current_database(), 'repeatable read'); END $$"
    )
    db = await KeenDatabase.connect(settings=make_settings(fresh_dsn), migrate=False)
    writer = await asyncpg.connect(
        fresh_dsn, server_settings={"default_transaction_isolation": "read committed"}
    )
    try:
        hour = _hour(datetime.now(UTC)) - timedelta(hours=3)
        await add_ledger(owner_conn, random.Random(2), [alice], [hour])
        await db.analytics.rollup(since=hour.date())
        await add_ledger(owner_conn, random.Random(3), [alice], [hour])  # marks the hour
        async with writer.transaction():
            await add_ledger(writer, random.Random(4), [bob], [hour + timedelta(minutes=9)])
            roll = asyncio.create_task(db.analytics.rollup(day=hour.date()))
            await roll_retrying(owner_conn)
        await roll
        await assert_same_as_live(db, [(hour, hour + timedelta(hours=1))])
        # Called in a transaction of another level, the roll refuses.
        with pytest.raises(asyncpg.ActiveSQLTransactionError):
            async with owner_conn.transaction(isolation="repeatable_read"):
                await owner_conn.execute("SELECT keen_analytics_roll_hour($1)", hour)
    finally:
        await writer.close()
        await db.close()


async def test_the_roll_clears_marks_in_a_logically_replicated_database(
    db: KeenDatabase, alice: User, owner_conn: asyncpg.Connection
) -> None:
    """A table published for deletes needs a replica identity: without a key, clearing the marks
    failed every roll once the database was published (FOR ALL TABLES)."""
    await owner_conn.execute("CREATE PUBLICATION keen_everything FOR ALL TABLES")
    try:
        hour = _hour(datetime.now(UTC)) - timedelta(hours=3)
        await add_ledger(owner_conn, random.Random(2), [alice], [hour])
        await db.analytics.rollup(since=hour.date())
        await add_ledger(owner_conn, random.Random(3), [alice], [hour])  # marks the hour
        assert (await db.analytics.rollup()).hours == 1
        assert not await owner_conn.fetchval("SELECT count(*) FROM analytics_dirty_hours")
    finally:
        await owner_conn.execute("DROP PUBLICATION keen_everything")
