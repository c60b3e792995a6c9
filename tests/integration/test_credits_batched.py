"""Batched deductions (migration 0005, ``dal/batching.py``) against real PostgreSQL.

Deductions that wait for a free slot leave together in one statement; each must still succeed
or fail exactly as it would alone, as its own user, without touching the others. To make a
batch deterministic the tests allow one statement in flight and hold it on a row lock: every
call made meanwhile waits, and they leave as one batch when the lock goes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from keen_stream.dal.credits import SQL
from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.errors import (
    IdempotencyConflict,
    InsufficientCredits,
    InsufficientPrivileges,
    InvalidInput,
    NotFound,
    SessionBudgetExceeded,
)
from tests.conftest import UserFactory, make_settings
from tests.integration.credits_support import account, fund, ledger_state, make_session

D = Decimal


@asynccontextmanager
async def one_slot(fresh_dsn: str) -> AsyncIterator[KeenDatabase]:
    db = await KeenDatabase.connect(
        settings=make_settings(fresh_dsn, ledger_max_in_flight=1), migrate=False
    )
    try:
        yield db
    finally:
        await db.close()


async def outcome(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except Exception as exc:
        return exc


@asynccontextmanager
async def held_slot(
    db: KeenDatabase, owner_conn: asyncpg.Connection, blocker: User
) -> AsyncIterator[asyncio.Task[Any]]:
    """The one slot busy with a deduction of ``blocker``'s that waits on a row lock."""
    batcher = db.credits._deductions
    assert batcher is not None
    tx = owner_conn.transaction()
    await tx.start()
    await owner_conn.execute(
        "SELECT 1 FROM credit_accounts WHERE user_id = $1 FOR UPDATE", blocker.id
    )
    first = asyncio.create_task(db.credits.deduct_credits(blocker.id, D("0.2"), None, "first"))
    while batcher._in_flight == 0:  # noqa: ASYNC110 - polling a counter, no event to wait on
        await asyncio.sleep(0.005)
    try:
        yield first
    finally:
        await tx.rollback()  # the lock goes: the first call finishes, the batch leaves


async def test_waiting_deductions_leave_together_each_with_its_own_outcome(
    fresh_dsn: str,
    db: KeenDatabase,
    owner_conn: asyncpg.Connection,
    alice: User,
    bob: User,
    make_user: UserFactory,
):
    carol = await make_user()
    await fund(db, alice, "10")
    await fund(db, bob, "1")
    await fund(db, carol, "10")
    bob_before = await account(owner_conn, bob)
    async with one_slot(fresh_dsn) as bdb:
        batcher = bdb.credits._deductions
        assert batcher is not None
        async with held_slot(bdb, owner_conn, alice) as first:
            calls = [
                (alice, D("0.2"), None),
                (bob, D("1"), None),  # 5 credits of 1: refused, alone
                (carol, D("0.2"), None),
                (alice, D("0.4"), "key-1"),
                (alice, D("0.4"), "key-1"),  # a retry inside the same batch: charged once
                (carol, D("0.6"), None),
                (alice, D("0.6"), None),
            ]
            pending = [
                asyncio.create_task(
                    outcome(
                        bdb.credits.deduct_credits(
                            user.id, cost, None, key or f"call {n}", idempotency_key=key
                        )
                    )
                )
                for n, (user, cost, key) in enumerate(calls)
            ]
            await asyncio.sleep(0.05)
            assert not any(task.done() for task in pending)  # all waiting for the slot
        await first
        got = await asyncio.gather(*pending)

    assert (batcher.batches, batcher.batched_items) == (1, len(calls))
    assert isinstance(got[1], InsufficientCredits)
    assert got[1].required == D("5") and got[1].shortfall == D("4")
    assert await account(owner_conn, bob) == bob_before  # nothing written for bob

    alice_txs = [got[0], got[3], got[4], got[6]]
    assert [t.user_id for t in alice_txs] == [alice.id] * 4
    assert got[3].id == got[4].id  # the retry returned the original
    # alice's calls keep their order: sequence numbers and balances chain (10 + 0.2 first)
    assert [t.sequence_number for t in (got[0], got[3], got[6])] == [3, 4, 5]
    assert [t.balance_after for t in (got[0], got[3], got[6])] == [D("8"), D("6"), D("3")]
    assert [t.amount for t in (got[2], got[5])] == [D("-1"), D("-3")]
    assert got[5].balance_after == D("6") and got[5].user_id == carol.id
    report = await db.credits.verify_ledger()
    assert report.ok, report.problems


async def test_an_item_refused_for_its_session_or_key_is_undone_alone(
    fresh_dsn: str,
    db: KeenDatabase,
    owner_conn: asyncpg.Connection,
    alice: User,
    bob: User,
):
    await fund(db, alice, "10")
    await fund(db, bob, "10")
    await db.credits.deduct_credits(alice.id, D("0.2"), None, "original", idempotency_key="k")
    bobs = await make_session(owner_conn, bob, budget="2")
    before = await ledger_state(owner_conn)
    async with one_slot(fresh_dsn) as bdb:
        async with held_slot(bdb, owner_conn, bob) as first:
            pending = [
                asyncio.create_task(outcome(call))
                for call in (
                    # same key, other parameters
                    bdb.credits.deduct_credits(
                        alice.id, D("0.4"), None, "other", idempotency_key="k"
                    ),
                    # bob's session, but charged as alice
                    bdb.credits.deduct_credits(alice.id, D("0.2"), bobs["session_id"], "x"),
                    # over the session's budget of 2 credits: the budget is taken back too
                    bdb.credits.deduct_credits(bob.id, D("0.6"), bobs["session_id"], "x"),
                    bdb.credits.deduct_credits(bob.id, D("0.2"), bobs["session_id"], "fits"),
                )
            ]
            await asyncio.sleep(0.05)
        await first
        conflict, foreign, over_budget, fits = await asyncio.gather(*pending)
        assert bdb.credits._deductions is not None
        assert bdb.credits._deductions.batches == 1

    assert isinstance(conflict, IdempotencyConflict)
    assert isinstance(foreign, NotFound)
    assert isinstance(over_budget, SessionBudgetExceeded)
    assert fits.amount == D("-1") and fits.user_id == bob.id
    after = await ledger_state(owner_conn)
    # exactly two rows more: bob's blocked first call and the one that fitted
    assert after["transactions"] == before["transactions"] + 2
    assert after["budgets_used"] == before["budgets_used"] + D("1")
    assert (await db.credits.verify_ledger()).ok


async def test_a_caller_cancelled_while_waiting_is_never_charged(
    fresh_dsn: str, db: KeenDatabase, owner_conn: asyncpg.Connection, alice: User, bob: User
):
    await fund(db, alice, "10")
    await fund(db, bob, "10")
    async with one_slot(fresh_dsn) as bdb:
        async with held_slot(bdb, owner_conn, bob) as first:
            waiting = asyncio.create_task(bdb.credits.deduct_credits(alice.id, D("1"), None, "x"))
            await asyncio.sleep(0.05)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        await first
        await bdb.credits.drain()
    assert (await account(owner_conn, alice))["current_balance"] == D("10")
    assert (await account(owner_conn, bob))["current_balance"] == D("9")


async def test_tenants_cannot_run_a_batch(db: KeenDatabase, alice: User, bob: User):
    await fund(db, bob, "10")
    with pytest.raises(InsufficientPrivileges):
        async with db.user_transaction(alice.id) as conn:
            await conn.fetch(SQL["deduct_many"], [bob.id], [D("1")], [None], ["x"], [None])
    assert (await db.credits.get_balance(bob.id)).current == D("10")


async def test_each_item_acts_as_its_own_user_and_the_context_ends_with_the_statement(
    db: KeenDatabase, owner_conn: asyncpg.Connection, alice: User, bob: User
):
    await fund(db, alice, "10")
    await fund(db, bob, "10")
    rows = await db.system_call(
        SQL["deduct_many"],
        [alice.id, bob.id],
        [D("0.2"), D("0.4")],
        [None, None],
        ["a", "b"],
        [None, None],
    )
    assert [(r["ord"], r["error_state"], r["user_id"], r["amount"]) for r in rows] == [
        (1, None, alice.id, D("-1")),
        (2, None, bob.id, D("-2")),
    ]
    # one event per ledger row, each for its own user
    events = await owner_conn.fetch(
        "SELECT user_id FROM stream_events WHERE event_type LIKE 'credit%' ORDER BY id"
    )
    assert [e["user_id"] for e in events][-2:] == [alice.id, bob.id]
    async with db.pool.acquire() as conn:
        assert await conn.fetchval("SELECT current_setting('app.current_user_id', true)") in (
            None,
            "",
        )


@pytest.mark.parametrize("size", [0, 51])
async def test_malformed_batches_are_refused_and_write_nothing(
    db: KeenDatabase, owner_conn: asyncpg.Connection, alice: User, size: int
):
    await fund(db, alice, "10")
    before = await ledger_state(owner_conn)
    users = [alice.id] * max(size, 1)
    costs = [D("0.1")] * size  # lengths differ when size is 0
    with pytest.raises(InvalidInput):
        await db.system_call(
            SQL["deduct_many"],
            users,
            costs,
            [None] * len(users),
            ["x"] * len(users),
            [None] * len(users),
        )
    assert await ledger_state(owner_conn) == before


async def test_a_batch_takes_key_locks_before_account_rows_so_single_calls_cannot_deadlock_it(
    fresh_dsn: str, db: KeenDatabase, owner_conn: asyncpg.Connection, alice: User, bob: User
):
    """A single keyed deduction takes its key's lock, then the account row. A batch holding
    alice's row (an earlier item) and only then asking for a key lock would deadlock with it."""
    await fund(db, alice, "10")
    await fund(db, bob, "10")
    single = await asyncpg.connect(fresh_dsn)  # plays a single keyed call on alice's account
    try:
        await single.execute("SET deadlock_timeout = '100ms'")  # it would be the victim
        tx = single.transaction()
        await tx.start()
        await single.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('keen_ledger:' || id || ':k', 0))"
            " FROM credit_accounts WHERE user_id = $1",
            alice.id,
        )
        async with one_slot(fresh_dsn) as bdb:
            async with held_slot(bdb, owner_conn, bob) as first:
                pending = [
                    asyncio.create_task(
                        outcome(bdb.credits.deduct_credits(alice.id, D("0.2"), None, "plain"))
                    ),
                    asyncio.create_task(
                        outcome(
                            bdb.credits.deduct_credits(
                                alice.id, D("0.2"), None, "keyed", idempotency_key="k"
                            )
                        )
                    ),
                ]
                await asyncio.sleep(0.05)
            await first
            # the batch is now waiting for the key lock
            for _ in range(200):
                if await owner_conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory'"
                    " AND datname = current_database()"
                ):
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("the batch never waited for the key lock")
            # the single call goes on to alice's row: free, because the batch has not taken it
            await single.execute(
                "SELECT 1 FROM credit_accounts WHERE user_id = $1 FOR UPDATE", alice.id
            )
            await tx.commit()
            plain, keyed = await asyncio.gather(*pending)
        assert plain.amount == keyed.amount == D("-1")
        assert bdb.credits.batch_stats()["batches"] == 1
    finally:
        await single.close()
    assert (await db.credits.verify_ledger()).ok
