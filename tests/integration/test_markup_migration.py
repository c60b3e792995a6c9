"""Migration 0007 on a database with a ledger: the price it seeds and the holds it inherits.

Before 0007 every tenant transaction could call ``keen_credit_deduct`` / ``keen_credit_reserve``
with a markup of its choice (docs/ledger.md, "Who may move money": "0.01 charged $1 as 0.01
credits"), so nothing written to the ledger before 0007 says what the operator's price was: the
newest charge can be a tenant's own. 0007 seeds ``credit_pricing`` with the markup the operator
configured (``keen-stream migrate --markup``, ``alembic -x markup=``, ``KEEN_CREDIT_MARKUP``;
5.00 by default), never from ledger rows, and every active hold whose markup differs takes the
seeded price (what it reserved is unchanged), so a hold reserved through the hole settles at
the server's price.
"""

from __future__ import annotations

import logging
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
        await conn.execute("SELECT keen_credit_purchase($1, 1000, 5.00, 'paid', NULL, NULL)", user)
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


async def test_a_hold_reserved_through_the_old_hole_does_not_settle_at_its_markup(
    empty_dsn: str,
) -> None:
    await migrate.upgrade_async(empty_dsn, "0006_stream_latency")
    conn = await asyncpg.connect(empty_dsn)
    try:
        user = await _ledger_at_0006(conn)
        await _as_tenant(
            conn,
            user,
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


async def test_the_operator_gives_the_price_the_deployment_charged(empty_dsn: str) -> None:
    """``keen-stream migrate --markup 4.50`` (a deployment that ran with KEEN_CREDIT_MARKUP=4.50):
    the price is 4.50, recorded with where it came from; holds at 4.50 keep it, the tenant's
    0.01 hold takes it, and nothing else of the ledger moves."""
    await migrate.upgrade_async(empty_dsn, "0006_stream_latency")
    conn = await asyncpg.connect(empty_dsn)
    try:
        user = await _ledger_at_0006(conn)
        for markup in ("4.50", "0.01"):
            await _as_tenant(
                conn,
                user,
                f"SELECT keen_credit_reserve($1, 1, {markup}, NULL, NULL, interval '1 hour',"
                f" 'hold at {markup}', NULL)",
            )
        account_before = await conn.fetchrow("SELECT * FROM credit_accounts")
        await migrate.upgrade_async(empty_dsn, credit_markup="4.50")
        pricing = await conn.fetchrow("SELECT markup, reason FROM credit_pricing")
        assert pricing["markup"] == D("4.50")
        assert "keen-stream migrate --markup" in pricing["reason"]
        holds = await conn.fetch(
            "SELECT description, keen_markup_multiplier, amount, estimated_credits"
            "  FROM credit_holds ORDER BY description"
        )
        assert [(h["description"], h["keen_markup_multiplier"], h["amount"]) for h in holds] == [
            ("hold at 0.01", D("4.50"), D("0.010000")),
            ("hold at 4.50", D("4.50"), D("4.500000")),
        ]
        account_after = await conn.fetchrow("SELECT * FROM credit_accounts")
        for column in ("current_balance", "held_amount", "lifetime_spent", "last_sequence"):
            assert account_after[column] == account_before[column], column
        assert await conn.fetch("SELECT * FROM keen_ledger_verify()") == []
    finally:
        await conn.close()


async def test_a_markup_that_is_not_a_price_stops_the_upgrade(empty_dsn: str) -> None:
    await migrate.upgrade_async(empty_dsn, "0006_stream_latency")
    for bad in ("0", "4.505", "NaN", "100", "five"):
        with pytest.raises(RuntimeError, match="is not a markup"):
            await migrate.upgrade_async(empty_dsn, credit_markup=bad)
    conn = await asyncpg.connect(empty_dsn)
    try:
        assert await conn.fetchval("SELECT version_num FROM alembic_version") == (
            "0006_stream_latency"
        )
    finally:
        await conn.close()


async def test_no_markup_given_seeds_the_default_and_warns_when_charges_used_another(
    empty_dsn: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger is never the price, but an operator who forgot ``--markup`` is told."""
    monkeypatch.delenv("KEEN_CREDIT_MARKUP", raising=False)
    await migrate.upgrade_async(empty_dsn, "0006_stream_latency")
    conn = await asyncpg.connect(empty_dsn)
    try:
        user = await _ledger_at_0006(conn)
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.current_user_id', $1, true)", str(user))
            for n in range(5):
                await conn.execute(
                    "SELECT keen_credit_deduct($1, 1, 4.50, NULL, NULL, $2, NULL)", user, f"x{n}"
                )
        with caplog.at_level(logging.WARNING):
            await migrate.upgrade_async(empty_dsn)
        assert await conn.fetchval("SELECT markup FROM credit_pricing") == D("5.00")
        warned = [r.getMessage() for r in caplog.records if "0007" in r.getMessage()]
        assert len(warned) == 1 and "4.50" in warned[0] and "set-markup" in warned[0], warned
    finally:
        await conn.close()
