"""`keen-stream analytics rollup|refresh`, run in-process, and the hub's rollup timer."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from keen_stream import cli
from keen_stream.dal.models import User
from keen_stream.settings import Settings
from tests.conftest import make_settings
from tests.integration.hubkit import running_hub


async def _run(*argv: str, settings: Settings) -> int:
    # cli.main runs its own event loop, so it gets a thread of its own.
    return await asyncio.to_thread(cli.main, list(argv), settings=settings)


async def _backdated_session(owner_conn: asyncpg.Connection, user: User, hours: int) -> None:
    await owner_conn.execute(
        """INSERT INTO agent_sessions (user_id, session_id, git_branch, vision,
               working_directory, start_time)
           VALUES ($1, $2, 'm', 'v', '/w', now() - make_interval(hours => $3))""",
        user.id,
        f"cli-{hours}",
        hours,
    )


async def test_rollup_backfills_then_rolls_only_what_changed(
    fresh_dsn: str,
    alice: User,
    owner_conn: asyncpg.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings(fresh_dsn)
    await _backdated_session(owner_conn, alice, 30)
    assert await _run("analytics", "rollup", settings=settings) == 0
    out = capsys.readouterr().out
    assert "hours rolled" in out
    rolled = await owner_conn.fetchval("SELECT count(*) FROM analytics_hourly")
    assert rolled >= 30
    assert await owner_conn.fetchval("SELECT count(*) FROM daily_analytics") >= 2

    # Nothing new: nothing rolled. A late write to one old hour: that hour and its day.
    assert await _run("analytics", "rollup", settings=settings) == 0
    assert "0 hours rolled; days rewritten: none" in capsys.readouterr().out
    await owner_conn.execute(
        "UPDATE agent_sessions SET tokens_used = 5 WHERE session_id = 'cli-30'"
    )
    assert await _run("analytics", "rollup", settings=settings) == 0
    day = (datetime.now(UTC) - timedelta(hours=30)).date()
    assert f"1 hours rolled; days rewritten: {day.isoformat()}" in capsys.readouterr().out
    assert await owner_conn.fetchval("SELECT sum(tokens)::int FROM analytics_hourly") == 5

    # Backfills: one day, or every day since.
    assert await _run("analytics", "rollup", "--date", day.isoformat(), settings=settings) == 0
    assert f"days rewritten: {day.isoformat()}" in capsys.readouterr().out
    since = (datetime.now(UTC) - timedelta(days=1)).date()
    assert await _run("analytics", "rollup", "--since", since.isoformat(), settings=settings) == 0
    assert since.isoformat() in capsys.readouterr().out
    # Every ended hour from the day's midnight on has its row (the whole day, too, for --date).
    assert await owner_conn.fetchval(
        """SELECT count(*) FROM analytics_hourly
            WHERE hour_bucket >= $1::date::timestamp AT TIME ZONE 'UTC'""",
        day,
    ) == await owner_conn.fetchval(
        """SELECT count(*) FROM generate_series($1::date::timestamp AT TIME ZONE 'UTC',
                  date_trunc('hour', now()) - interval '1 hour', interval '1 hour')""",
        day,
    )


async def test_rollup_refuses_a_bad_date_with_exit_2(
    fresh_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(fresh_dsn)
    assert await _run("analytics", "rollup", "--date", "yesterday", settings=settings) == 2
    err = capsys.readouterr().err
    assert "--date must be a date, YYYY-MM-DD" in err and "Traceback" not in err


async def test_refresh_fills_the_dashboard_view(
    fresh_dsn: str,
    alice: User,
    owner_conn: asyncpg.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await _backdated_session(owner_conn, alice, 2)
    assert await owner_conn.fetchval("SELECT count(*) FROM admin_dashboard_metrics") == 0
    assert await _run("analytics", "refresh", settings=make_settings(fresh_dsn)) == 0
    assert "refreshed" in capsys.readouterr().out
    assert (
        await owner_conn.fetchval("SELECT sum(sessions_started) FROM admin_dashboard_metrics") == 1
    )


async def test_the_hub_rolls_ended_hours_on_its_timer(
    fresh_dsn: str, alice: User, owner_conn: asyncpg.Connection
) -> None:
    await _backdated_session(owner_conn, alice, 3)
    async with running_hub(fresh_dsn, analytics_rollup_interval=0.05) as hub:
        for _ in range(400):
            if await owner_conn.fetchval("SELECT count(*) FROM analytics_hourly") >= 3:
                break
            await asyncio.sleep(0.025)
        assert hub.service.maintenance_errors == 0
    assert await owner_conn.fetchval("SELECT sum(total_sessions)::int FROM analytics_hourly") == 1
