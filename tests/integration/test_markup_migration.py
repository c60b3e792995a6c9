"""Migration 0007 on a database with a ledger: the price it seeds and the holds it inherits.

Before 0007 every tenant transaction could call ``keen_credit_deduct`` / ``keen_credit_reserve``
with a markup of its choice (docs/ledger.md, "Who may move money": "0.01 charged $1 as 0.01
credits"). 0007 closes that hole, and seeds ``credit_pricing`` with "the markup of the newest
charge in the ledger, so upgrading changed no one's price". On a database where a tenant used
the hole, the newest charge can be the tenant's own.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

import asyncpg
import pytest

from keen_stream import migrate

D = Decimal


async def _ledger_at_0006(conn: asyncpg.Connection) -> uuid.UUID:
    """A funded user charged at the operator's price (5.00) a few times, as the 0006 DAL did."""
    user: uuid.UUID = await conn.fetchval(
        "INSERT INTO users (email, username, password_hash)"
        " VALUES ('m@example.com', 'mallory', 'x') RETURNING id"
    )
    await conn.execute("INSERT INTO credit_accounts (user_id) VALUES ($1)", user)
    async with conn.transaction():
        await conn.execute("SELECT set_config('app.current_user_id', $1, true)", str(user))
        await conn.execute(
            "SELECT keen_credit_purchase($1, 1000, 5.00, 'paid', NULL, NULL)", user
        )
        for n in range(3):
            await conn.execute(
                "SELECT keen_credit_deduct($1, 1, 5.00, NULL, NULL, $2, NULL)", user, f"call {n}"
            )
    return user


async def _as_tenant(conn: asyncpg.Connection, user: uuid.UUID, statement: str) -> None:
    """``statement`` in a 0006 tenant transaction (keen_app, the user set), as the DAL ran it."""
    async with conn.transaction():
        await conn.execute(
            "SELECT set_config('role', 'keen_app', true),"
            " set_config('app.current_user_id', $1, true)",
            str(user),
        )
        await conn.execute(statement, user)


@pytest.mark.xfail(
    strict=True,
    reason="review1: 0007 seeds credit_pricing from the newest usage row, whose markup a "
    "tenant chose before 0007 (the hole 0007 closes): the whole deployment's price becomes it",
)
async def test_the_seeded_price_is_not_the_one_a_tenant_chose_through_the_old_hole(
    empty_dsn: str,
) -> None:
    await migrate.upgrade_async(empty_dsn, "0006_stream_latency")
    conn = await asyncpg.connect(empty_dsn)
    try:
        user = await _ledger_at_0006(conn)
        # The last charge before the upgrade: the tenant's own, at its own price.
        await _as_tenant(
            conn, user, "SELECT keen_credit_deduct($1, 1, 0.01, NULL, NULL, 'cheap', NULL)"
        )
        await migrate.upgrade_async(empty_dsn)
        assert await conn.fetchval("SELECT markup FROM credit_pricing") == D("5.00")
    finally:
        await conn.close()


@pytest.mark.xfail(
    strict=True,
    reason="review1: a hold a tenant reserved before 0007 at its own markup survives the "
    "upgrade, and settles after it at that markup for any actual cost (up to a day later)",
)
async def test_a_hold_reserved_through_the_old_hole_does_not_settle_at_its_markup(
    empty_dsn: str,
) -> None:
    await migrate.upgrade_async(empty_dsn, "0006_stream_latency")
    conn = await asyncpg.connect(empty_dsn)
    try:
        user = await _ledger_at_0006(conn)
        await _as_tenant(
            conn, user,
            "SELECT keen_credit_reserve($1, 0.000001, 0.01, NULL, NULL, interval '1 day',"
            " 'cheap hold', NULL)",
        )
        await migrate.upgrade_async(empty_dsn)
        hold = await conn.fetchval("SELECT id FROM credit_holds WHERE status = 'active'")
        async with conn.transaction():
            await conn.execute(
                "SELECT set_config('role', 'keen_app', true),"
                " set_config('app.current_user_id', $1, true)",
                str(user),
            )
            charged = await conn.fetchval(
                "SELECT -amount FROM keen_credit_settle($1, 100, NULL)", hold
            )
        price = await conn.fetchval("SELECT markup FROM credit_pricing")
        # $100 of provider cost at the server's price (5.00 unless the seed above went wrong).
        assert charged >= D(100) * min(price, D("5.00"))
    finally:
        await conn.close()
