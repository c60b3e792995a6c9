"""Holds: reserve / settle / release / expire never leak available balance."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from decimal import Decimal

import pytest

from keen_stream.errors import (
    HoldNotActive,
    IdempotencyConflict,
    InsufficientCredits,
    SpendingLimitExceeded,
)
from tests.integration.credits_support import account, fund, ledger_state

D = Decimal


async def assert_no_leak(db, owner_conn, user) -> None:
    """held_amount equals the active holds, and the ledger proves the balance."""
    row = await account(owner_conn, user)
    active = await owner_conn.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM credit_holds"
        " WHERE user_id = $1 AND status = 'active'",
        user.id,
    )
    ledger = await owner_conn.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM credit_transactions WHERE user_id = $1", user.id
    )
    assert row["held_amount"] == active
    assert row["current_balance"] == ledger
    assert row["current_balance"] >= row["held_amount"] >= 0
    assert (await db.credits.verify_ledger()).problems == []


async def test_reserve_holds_available_but_not_current(db, alice, owner_conn):
    await fund(db, alice, "20")
    hold = await db.credits.reserve(alice.id, D("2"), description="model call")
    assert (hold.status, hold.amount, hold.estimated_credits) == ("active", D("10"), D("10"))
    balance = await db.credits.get_balance(alice.id)
    assert (balance.current, balance.held, balance.available) == (D("20"), D("10"), D("10"))
    # A plain deduction cannot eat held credits.
    with pytest.raises(InsufficientCredits) as raised:
        await db.credits.deduct_credits(alice.id, D("2.2"), None, "11 credits")
    assert raised.value.held == D("10")
    # Nor can a second hold.
    with pytest.raises(InsufficientCredits):
        await db.credits.reserve(alice.id, D("2.2"))
    await assert_no_leak(db, owner_conn, alice)


async def test_settle_below_estimate_charges_actual_and_frees_the_rest(db, alice, owner_conn):
    await fund(db, alice, "20")
    hold = await db.credits.reserve(alice.id, D("2"))
    tx = await db.credits.settle(hold, D("1.2"))
    assert (tx.transaction_type, tx.amount, tx.hold_id) == ("usage", D("-6"), hold.id)
    assert tx.claude_cost_usd == D("1.2") and tx.keen_markup_multiplier == D("5")
    balance = await db.credits.get_balance(alice.id)
    assert (balance.current, balance.held, balance.available) == (D("14"), 0, D("14"))
    settled = await db.credits.get_hold(alice.id, hold.id)
    assert settled.status == "settled" and settled.settled_transaction_id == tx.id
    assert settled.settled_credits == D("6") and settled.resolved_at is not None
    await assert_no_leak(db, owner_conn, alice)


async def test_settle_is_idempotent(db, alice, owner_conn):
    await fund(db, alice, "20")
    hold = await db.credits.reserve(alice.id, D("1"))
    first = await db.credits.settle(hold, D("0.5"))
    again = await db.credits.settle(hold, D("0.5"))
    assert again == first
    with pytest.raises(IdempotencyConflict):
        await db.credits.settle(hold, D("0.7"))
    with pytest.raises(HoldNotActive):
        await db.credits.release(hold)
    assert (await account(owner_conn, alice))["current_balance"] == D("17.5")
    await assert_no_leak(db, owner_conn, alice)


async def test_concurrent_settles_charge_once(db, alice, owner_conn):
    await fund(db, alice, "20")
    hold = await db.credits.reserve(alice.id, D("1"))
    results = await asyncio.gather(*(db.credits.settle(hold, D("0.8")) for _ in range(6)))
    assert len({r.id for r in results}) == 1
    assert (await account(owner_conn, alice))["current_balance"] == D("16")
    await assert_no_leak(db, owner_conn, alice)


async def test_settle_above_estimate_charges_the_excess_when_it_fits(db, alice, owner_conn):
    await fund(db, alice, "20")
    hold = await db.credits.reserve(alice.id, D("1"))  # 5 held
    tx = await db.credits.settle(hold, D("3"))  # 15: 10 more than held, 15 available
    assert tx.amount == D("-15") and tx.balance_after == D("5")
    await assert_no_leak(db, owner_conn, alice)


async def test_settle_above_estimate_that_does_not_fit_changes_nothing(db, alice, owner_conn):
    await fund(db, alice, "20")
    hold = await db.credits.reserve(alice.id, D("1"))  # 5 held, 15 available
    before = await ledger_state(owner_conn)
    with pytest.raises(InsufficientCredits) as raised:
        await db.credits.settle(hold, D("4.2"))  # 21 credits: 16 more than held
    assert raised.value.required == D("16")
    assert await ledger_state(owner_conn) == before
    assert (await db.credits.get_hold(alice.id, hold.id)).status == "active"
    # The caller may still settle within what was reserved.
    tx = await db.credits.settle(hold, D("1"))
    assert tx.amount == D("-5")
    await assert_no_leak(db, owner_conn, alice)


async def test_release_frees_the_hold_and_is_idempotent(db, alice, owner_conn):
    await fund(db, alice, "20")
    hold = await db.credits.reserve(alice.id, D("2"))
    released = await db.credits.release(hold)
    assert released.status == "released" and released.resolved_at is not None
    assert await db.credits.release(hold) == released
    with pytest.raises(HoldNotActive) as raised:
        await db.credits.settle(hold, D("1"))
    assert raised.value.details["status"] == "released"
    balance = await db.credits.get_balance(alice.id)
    assert (balance.current, balance.available) == (D("20"), D("20"))
    await assert_no_leak(db, owner_conn, alice)


async def test_expired_holds_are_swept_and_cannot_be_settled(db, alice, owner_conn):
    await fund(db, alice, "20")
    stale = await db.credits.reserve(alice.id, D("1"), ttl=timedelta(minutes=1))
    fresh = await db.credits.reserve(alice.id, D("1"), ttl=timedelta(minutes=5))
    await owner_conn.execute(
        "UPDATE credit_holds SET expires_at = now() - interval '1 second' WHERE id = $1", stale.id
    )
    with pytest.raises(HoldNotActive) as raised:
        await db.credits.settle(stale, D("0.5"))
    assert raised.value.details["status"] == "expired"

    assert await db.credits.expire_holds() == 1
    assert await db.credits.expire_holds() == 0
    swept = await db.credits.get_hold(alice.id, stale.id)
    assert swept.status == "expired"
    assert (await db.credits.release(stale)).status == "expired"
    assert (await db.credits.get_balance(alice.id)).held == D("5")
    await db.credits.settle(fresh, D("1"))
    await assert_no_leak(db, owner_conn, alice)


async def test_holds_count_as_spent_for_limits(db, alice, owner_conn):
    await fund(db, alice, "100")
    await db.credits.set_spending_limits(alice.id, daily_limit=D("10"))
    hold = await db.credits.reserve(alice.id, D("1.5"))  # 7.5 held
    with pytest.raises(SpendingLimitExceeded):
        await db.credits.deduct_credits(alice.id, D("0.6"), None, "3 credits")
    with pytest.raises(SpendingLimitExceeded):
        await db.credits.reserve(alice.id, D("0.6"))
    await db.credits.settle(hold, D("1.5"))  # always fits: it was held
    assert (await db.credits.get_balance(alice.id)).spent_today == D("7.5")
    await assert_no_leak(db, owner_conn, alice)


async def test_admin_holds_hold_nothing_and_settle_as_bypass(db, admin, owner_conn):
    hold = await db.credits.reserve(admin.id, D("3"))
    assert hold.is_admin_bypass and hold.amount == 0 and hold.estimated_credits == D("15")
    tx = await db.credits.settle(hold, D("4"))
    assert tx.is_admin_bypass and tx.amount == 0 and tx.claude_cost_usd == D("4")
    assert tx.hold_id == hold.id
    await assert_no_leak(db, owner_conn, admin)


async def test_reserve_idempotency(db, alice, owner_conn):
    await fund(db, alice, "20")
    a = await db.credits.reserve(alice.id, D("1"), idempotency_key="h1")
    b = await db.credits.reserve(alice.id, D("1"), idempotency_key="h1")
    assert a == b
    with pytest.raises(IdempotencyConflict):
        await db.credits.reserve(alice.id, D("2"), idempotency_key="h1")
    assert (await account(owner_conn, alice))["held_amount"] == D("5")


async def test_random_hold_sequences_never_leak(db, alice, owner_conn):
    """Concurrent reserve / settle / release / expire in random order on one account."""
    await fund(db, alice, "50")
    rng = random.Random(20261125)

    async def one(n: int) -> None:
        action = rng.choice(["settle_low", "settle_high", "release", "expire", "twice"])
        ttl = timedelta(milliseconds=1) if action == "expire" else timedelta(minutes=5)
        try:
            hold = await db.credits.reserve(alice.id, D(rng.randint(1, 400)) / 100, ttl=ttl)
        except InsufficientCredits:
            return
        await asyncio.sleep(rng.random() / 100)
        try:
            if action == "settle_low":
                await db.credits.settle(hold, hold.estimated_claude_cost_usd / 2)
            elif action == "settle_high":
                try:
                    await db.credits.settle(hold, hold.estimated_claude_cost_usd * 2)
                except InsufficientCredits:  # the overrun does not fit: charge what was held
                    await db.credits.settle(hold, hold.estimated_claude_cost_usd)
            elif action == "release":
                await db.credits.release(hold)
            elif action == "expire":
                await asyncio.sleep(0.01)
                await db.credits.settle(hold, D("0.01"))  # too late: HoldNotActive
            else:
                await db.credits.settle(hold, D("0.01"))
                await db.credits.release(hold)
        except (InsufficientCredits, HoldNotActive):
            pass

    await asyncio.gather(*(one(n) for n in range(60)))
    await db.credits.expire_holds()
    balance = await db.credits.get_balance(alice.id)
    assert balance.held == 0 and balance.available == balance.current
    assert balance.current >= 0
    await assert_no_leak(db, owner_conn, alice)
