"""Batched deductions at their edges: migration 0005 round trip, bad strings, pre-lock deadlocks."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import asyncpg
import pytest

from keen_stream import migrate
from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from tests.integration.credits_support import account, fund, make_session
from tests.integration.test_credits_batched import held_slot, one_slot, outcome

D = Decimal


async def _catalog(dsn: str) -> dict[str, object]:
    conn = await asyncpg.connect(dsn)
    try:
        procs = await conn.fetch(
            "SELECT p.oid::regprocedure::text AS sig, p.prosecdef, p.proconfig, "
            "p.proacl::text[] AS acl, p.proowner::regrole::text AS owner, p.prosrc, "
            "p.provolatile FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace "
            "ORDER BY 1"
        )
        trig = await conn.fetch(
            "SELECT tgrelid::regclass::text AS rel, tgname, pg_get_triggerdef(oid) AS d "
            "FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2"
        )
        cols = await conn.fetch(
            "SELECT attrelid::regclass::text AS rel, attname, attacl::text[] AS acl "
            "FROM pg_attribute WHERE attrelid = 'credit_accounts'::regclass AND attnum > 0 "
            "ORDER BY attnum"
        )
        return {
            "procs": [dict(r) for r in procs],
            "triggers": [dict(r) for r in trig],
            "cols": [dict(r) for r in cols],
        }
    finally:
        await conn.close()


async def test_0005_down_restores_0004_and_up_again_restores_head(empty_dsn: str) -> None:
    await migrate.upgrade_async(empty_dsn, "0004_events")
    at_0004 = await _catalog(empty_dsn)
    await migrate.upgrade_async(empty_dsn)
    at_head = await _catalog(empty_dsn)
    await asyncio.to_thread(migrate.downgrade, empty_dsn, "0004_events")
    assert await _catalog(empty_dsn) == at_0004
    await migrate.upgrade_async(empty_dsn)
    assert await _catalog(empty_dsn) == at_head


@pytest.mark.parametrize("bad", ["nul\x00byte", "lone \ud800 surrogate"])
async def test_one_callers_unsendable_description_does_not_fail_the_others(
    fresh_dsn: str,
    db: KeenDatabase,
    owner_conn: asyncpg.Connection,
    alice: User,
    bob: User,
    bad: str,
):
    """Alone, a bad description fails only its own call; in a batch it must not fail bob's."""
    await fund(db, alice, "10")
    await fund(db, bob, "10")
    async with one_slot(fresh_dsn) as bdb:
        async with held_slot(bdb, owner_conn, alice) as first:
            pending = [
                asyncio.create_task(
                    outcome(bdb.credits.deduct_credits(alice.id, D("0.2"), None, bad))
                ),
                asyncio.create_task(
                    outcome(bdb.credits.deduct_credits(bob.id, D("0.2"), None, "innocent"))
                ),
            ]
            await asyncio.sleep(0.05)
        await first
        bad_call, good_call = await asyncio.gather(*pending)
    alone = await outcome(db.credits.deduct_credits(alice.id, D("0.2"), None, bad))
    assert type(bad_call) is type(alone), (bad_call, alone)
    assert not isinstance(good_call, BaseException), good_call
    assert (await account(owner_conn, bob))["current_balance"] == D("9")


async def test_a_batch_that_loses_a_deadlock_before_its_items_still_charges_them(
    fresh_dsn: str,
    db: KeenDatabase,
    owner_conn: asyncpg.Connection,
    alice: User,
    bob: User,
    make_user,
):
    """Another transaction touching two session budgets in the other order than the batch's
    pre-lock (``keen_credit_expire_holds`` gives budgets back hold by hold) deadlocks with the
    batch's budget pre-lock, outside any item's subtransaction. Alone, each call would simply
    wait and succeed; batched, neither may fail for it."""
    carol = await make_user()
    for user in (alice, bob, carol):
        await fund(db, user, "10")
    sessions = {u.id: await make_session(owner_conn, u, budget="5") for u in (alice, bob)}
    low, high = sorted(sessions.values(), key=lambda s: s["id"])
    other = await asyncpg.connect(fresh_dsn)
    try:
        await other.execute("SET deadlock_timeout = '10s'")  # the batch detects it (1 s)
        tx = other.transaction()
        await tx.start()
        await other.execute(
            "UPDATE agent_sessions SET budget_used = budget_used WHERE id = $1", high["id"]
        )
        async with one_slot(fresh_dsn) as bdb:
            async with held_slot(bdb, owner_conn, carol) as first:
                pending = [
                    asyncio.create_task(
                        outcome(
                            bdb.credits.deduct_credits(
                                user.id, D("0.2"), sessions[user.id]["session_id"], "x"
                            )
                        )
                    )
                    for user in (alice, bob)
                ]
                await asyncio.sleep(0.05)
            await first
            for _ in range(200):  # the batch now holds `low` and waits for `high`
                if await owner_conn.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'"
                ):
                    break
                await asyncio.sleep(0.01)
            second = asyncio.create_task(
                other.execute(
                    "UPDATE agent_sessions SET budget_used = budget_used WHERE id = $1", low["id"]
                )
            )
            await asyncio.wait_for(second, 10)
            await tx.commit()
            got = await asyncio.gather(*pending)
    finally:
        await other.close()
    assert all(not isinstance(g, BaseException) for g in got), got
    for user in (alice, bob):
        assert (await account(owner_conn, user))["current_balance"] == D("9")


async def test_from_fields_matches_the_servers_own_error_when_fields_are_empty(
    db: KeenDatabase,
):
    """GET STACKED DIAGNOSTICS gives '' for a missing detail/constraint; alone they are None."""
    from keen_stream.dal.pgerrors import from_fields, translate

    async with db.pool.acquire() as conn:
        try:
            await conn.execute("SELECT 1e1000::numeric(5,2)")
        except asyncpg.PostgresError as exc:
            alone = translate(exc)
            fields = (exc.sqlstate, exc.message)
    batched = from_fields(*fields, "", "")
    assert type(batched) is type(alone)
    assert batched.details == alone.details, (batched.details, alone.details)
