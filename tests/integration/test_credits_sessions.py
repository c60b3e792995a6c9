"""Charges that name a session: handle resolution, tenancy, and session-tree budgets."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal

import pytest

from keen_stream.errors import InsufficientCredits, SessionBudgetExceeded
from tests.integration.credits_support import (
    budget_used,
    fund,
    ledger_state,
    make_session,
)

D = Decimal


async def test_a_charge_records_the_session_id(db, alice, owner_conn):
    await fund(db, alice, "100")
    session = await make_session(owner_conn, alice)
    tx = await db.credits.deduct_credits(alice.id, D("1"), session["session_id"], "call")
    assert tx.session_id == session["id"]
    async with db.user_transaction(alice.id) as conn:
        inside = await db.credits.deduct_in(
            conn, alice.id, D("1"), session_id=session["id"], description="end"
        )
    assert inside.session_id == session["id"]


async def test_an_unbudgeted_root_row_is_never_touched(db, alice, owner_conn):
    await fund(db, alice, "100")
    root = await make_session(owner_conn, alice)
    child = await make_session(owner_conn, alice, parent=root["id"])
    xmin = "SELECT xmin::text FROM agent_sessions WHERE id = $1"
    before = await owner_conn.fetchval(xmin, root["id"])
    await db.credits.deduct_credits(alice.id, D("1"), child["session_id"], "call")
    hold = await db.credits.reserve(alice.id, D("1"), session_handle=root["session_id"])
    await db.credits.settle(hold, D("0.5"))
    assert await owner_conn.fetchval(xmin, root["id"]) == before
    assert await budget_used(owner_conn, root["id"]) == 0


async def test_charges_in_a_tree_use_the_roots_budget(db, alice, owner_conn):
    await fund(db, alice, "100")
    root = await make_session(owner_conn, alice, budget="10")
    child = await make_session(owner_conn, alice, parent=root["id"])
    grandchild = await make_session(owner_conn, alice, parent=child["id"])

    await db.credits.deduct_credits(alice.id, D("1"), root["session_id"], "root")  # 5
    await db.credits.deduct_credits(alice.id, D("0.6"), grandchild["session_id"], "deep")  # 3
    assert await budget_used(owner_conn, root["id"]) == D("8")

    before = await ledger_state(owner_conn)
    with pytest.raises(SessionBudgetExceeded) as raised:
        await db.credits.deduct_credits(alice.id, D("0.5"), child["session_id"], "2.5 more")
    error = raised.value
    assert (error.budget, error.used, error.required) == (D(10), D(8), D("2.5"))
    assert error.details["root_session_id"] == str(root["id"])
    assert await ledger_state(owner_conn) == before

    await db.credits.deduct_credits(alice.id, D("0.4"), child["session_id"], "exactly 2")
    assert await budget_used(owner_conn, root["id"]) == D("10")


async def test_a_budget_refusal_beats_nothing_else_and_an_insufficient_balance_undoes_it(
    db, alice, owner_conn
):
    await fund(db, alice, "4")
    root = await make_session(owner_conn, alice, budget="100")
    before = await ledger_state(owner_conn)
    with pytest.raises(InsufficientCredits):
        await db.credits.deduct_credits(alice.id, D("1"), root["session_id"], "5 > 4")
    assert await ledger_state(owner_conn) == before  # budget_used included


async def test_concurrent_charges_never_overrun_a_budget(db, alice, owner_conn):
    await fund(db, alice, "1000")
    root = await make_session(owner_conn, alice, budget="10")
    results = await asyncio.gather(
        *(db.credits.deduct_credits(alice.id, D("0.4"), root["session_id"], "2") for _ in range(9)),
        return_exceptions=True,
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert len(ok) == 5
    assert all(isinstance(r, SessionBudgetExceeded) for r in results if r not in ok)
    assert await budget_used(owner_conn, root["id"]) == D("10")
    assert (await db.credits.get_balance(alice.id)).current == D("990")


async def test_holds_take_and_give_back_budget(db, alice, owner_conn):
    await fund(db, alice, "100")
    root = await make_session(owner_conn, alice, budget="20")
    child = await make_session(owner_conn, alice, parent=root["id"])

    low = await db.credits.reserve(alice.id, D("2"), session_handle=child["session_id"])  # 10
    assert low.budget_root_id == root["id"]
    assert await budget_used(owner_conn, root["id"]) == D("10")
    with pytest.raises(SessionBudgetExceeded):
        await db.credits.reserve(alice.id, D("2.2"), session_handle=root["session_id"])  # 11

    await db.credits.settle(low, D("1"))  # 5 charged, 5 given back
    assert await budget_used(owner_conn, root["id"]) == D("5")

    released = await db.credits.reserve(alice.id, D("1"), session_handle=root["session_id"])
    await db.credits.release(released)
    assert await budget_used(owner_conn, root["id"]) == D("5")

    expiring = await db.credits.reserve(
        alice.id, D("1"), session_handle=root["session_id"], ttl=timedelta(milliseconds=1)
    )
    assert await budget_used(owner_conn, root["id"]) == D("10")
    await asyncio.sleep(0.01)
    assert await db.credits.expire_holds() == 1
    assert (await db.credits.get_hold(alice.id, expiring.id)).status == "expired"
    assert await budget_used(owner_conn, root["id"]) == D("5")

    over = await db.credits.reserve(alice.id, D("1"), session_handle=root["session_id"])  # 5
    with pytest.raises(SessionBudgetExceeded):  # 16: the 11 above the hold must fit the budget
        await db.credits.settle(over, D("3.2"))
    await db.credits.settle(over, D("3"))  # 15: 10 above the hold, exactly the budget
    assert await budget_used(owner_conn, root["id"]) == D("20")


async def test_refunds_give_budget_back(db, alice, owner_conn):
    await fund(db, alice, "100")
    root = await make_session(owner_conn, alice, budget="10")
    usage = await db.credits.deduct_credits(alice.id, D("2"), root["session_id"], "10")
    await db.billing.refund(alice.id, usage.id, amount=D("4"), reason="partly bad")
    assert await budget_used(owner_conn, root["id"]) == D("6")


async def test_admin_bypass_counts_against_a_budget_at_notional_value(db, admin, owner_conn):
    root = await make_session(owner_conn, admin, budget="10")
    tx = await db.credits.deduct_credits(admin.id, D("1.5"), root["session_id"], "7.5 notional")
    assert tx.is_admin_bypass and tx.amount == 0 and tx.session_id == root["id"]
    assert await budget_used(owner_conn, root["id"]) == D("7.5")
    with pytest.raises(SessionBudgetExceeded):
        await db.credits.deduct_credits(admin.id, D("0.6"), root["session_id"], "3 more")
