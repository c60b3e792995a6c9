"""The hub node runs the platform's periodic jobs: session sweep, hold expiry, dashboard."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal

import asyncpg

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.dal.models.sessions import SessionCreate
from tests.integration.hubkit import running_hub


async def _eventually(check, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.05)


async def test_hub_sweeps_idle_sessions_expires_holds_and_refreshes_the_dashboard(
    db: KeenDatabase, fresh_dsn: str, owner_conn: asyncpg.Connection, alice: User
) -> None:
    await db.billing.purchase(alice.id, Decimal("50"), description="top-up")
    await db.sessions.create_session(
        alice.id,
        SessionCreate(
            session_handle="idle-one", vision="v", working_directory="/w", git_branch="m"
        ),
    )
    await owner_conn.execute(
        "UPDATE agent_sessions SET last_activity_at = now() - interval '1 hour'"
    )
    hold = await db.credits.reserve(alice.id, Decimal("1"), ttl=timedelta(minutes=1))
    await owner_conn.execute(
        "UPDATE credit_holds SET expires_at = now() - interval '1 second' WHERE id = $1", hold.id
    )
    async with running_hub(
        fresh_dsn,
        session_sweep_interval=0.05,
        session_idle_timeout=60,
        hold_sweep_interval=0.05,
        dashboard_refresh_interval=0.05,
    ) as hub:

        async def swept() -> bool:
            status: str | None = await owner_conn.fetchval(
                "SELECT execution_status FROM agent_sessions WHERE session_id = 'idle-one'"
            )
            hold_status: str | None = await owner_conn.fetchval(
                "SELECT status FROM credit_holds WHERE id = $1", hold.id
            )
            buckets: int = await owner_conn.fetchval("SELECT count(*) FROM admin_dashboard_metrics")
            return status == "timed_out" and hold_status == "expired" and buckets >= 1

        await _eventually(swept)
        assert hub.service.maintenance_errors == 0
    balance = await db.credits.get_balance(alice.id)
    assert balance.available == Decimal("50.000000")
