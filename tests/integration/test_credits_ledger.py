"""The credit ledger against real PostgreSQL: the seed's tests ported, and the ledger's rules."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.errors import (
    Conflict,
    IdempotencyConflict,
    InsufficientCredits,
    InsufficientPrivileges,
    InvalidAmount,
    InvalidInput,
    NotFound,
    SpendingLimitExceeded,
)
from tests.integration.credits_support import account, fund, ledger_state

D = Decimal


# --- the seed's tests, ported ---------------------------------------------------------------
async def test_admin_user_bypasses_credit_deductions(db: KeenDatabase, admin: User, owner_conn):
    tx = await db.credits.deduct_credits(admin.id, D("10.50"), None, "Admin test execution")

    assert tx.transaction_type == "admin_bypass"
    assert tx.amount == 0
    assert tx.is_admin_bypass is True
    assert tx.claude_cost_usd == D("10.50")
    assert tx.keen_markup_multiplier == D("5.00")
    assert tx.balance_after == 0
    row = await account(owner_conn, admin)
    assert row["current_balance"] == 0
    assert row["lifetime_spent"] == 0
    assert row["last_sequence"] == 1


async def test_unlimited_account_gets_bypass_rows_too(db, alice, owner_conn):
    await owner_conn.execute(
        "UPDATE credit_accounts SET unlimited_credits = true WHERE user_id = $1", alice.id
    )
    tx = await db.credits.deduct_credits(alice.id, D("3"), None, "unlimited")
    assert tx.is_admin_bypass and tx.amount == 0 and tx.claude_cost_usd == D("3.000000")


async def test_regular_user_gets_5x_markup(db: KeenDatabase, alice: User):
    await db.billing.purchase(alice.id, D("100.0"), description="purchase")

    tx = await db.credits.deduct_credits(alice.id, D("2.00"), None, "Regular user test")

    assert tx.transaction_type == "usage"
    assert abs(tx.amount) == D("10.00")
    assert tx.amount == D("-10.000000")
    assert tx.claude_cost_usd == D("2.00")
    assert tx.keen_markup_multiplier == D("5.0")
    assert tx.balance_after == D("90")
    balance = await db.credits.get_balance(alice.id)
    assert balance.current == D("90") and balance.lifetime_spent == D("10")


async def test_the_markup_is_the_servers_and_recorded(db, alice, admin):
    await db.billing.set_markup(D("2.50"), reason="a cheaper month", actor_id=admin.id)
    await db.billing.purchase(alice.id, D("10"), description="buy")
    tx = await db.credits.deduct_credits(alice.id, D("0.000001"), None, "tie")
    # 0.0000025 rounds up to the micro-credit.
    assert tx.amount == D("-0.000003")
    assert tx.keen_markup_multiplier == D("2.50")


async def test_concurrent_double_spend_exactly_one_succeeds(db, alice, owner_conn):
    await db.billing.purchase(alice.id, D("10.0"), description="purchase")

    results = await asyncio.gather(
        db.credits.deduct_credits(alice.id, D("1.50"), None, "session1"),  # 7.50 credits
        db.credits.deduct_credits(alice.id, D("1.00"), None, "session2"),  # 5.00 credits
        return_exceptions=True,
    )

    successes = [r for r in results if not isinstance(r, BaseException)]
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(successes) == 1
    assert len(failures) == 1 and isinstance(failures[0], InsufficientCredits)
    row = await account(owner_conn, alice)
    assert row["current_balance"] == D("10") + successes[0].amount
    assert row["current_balance"] in (D("2.5"), D("5.0"))
    assert await owner_conn.fetchval("SELECT count(*) FROM credit_transactions") == 2


# --- deductions -----------------------------------------------------------------------------
async def test_insufficient_credits_reports_and_writes_nothing(db, alice, owner_conn):
    await fund(db, alice, "4")
    before = await ledger_state(owner_conn)

    with pytest.raises(InsufficientCredits) as raised:
        await db.credits.deduct_credits(alice.id, D("1"), None, "too much")

    error = raised.value
    assert error.balance == D("4") and error.required == D("5")
    assert error.shortfall == D("1") and error.available == D("4")
    assert isinstance(error.shortfall, Decimal)
    assert error.details["shortfall"] == "1.000000"  # as the server sent it
    assert await ledger_state(owner_conn) == before


async def test_deduction_can_take_the_balance_to_exactly_zero(db, alice):
    await fund(db, alice, "5")
    tx = await db.credits.deduct_credits(alice.id, D("1"), None, "all of it")
    assert tx.balance_after == 0


async def test_deduct_in_runs_inside_the_callers_transaction(db, alice, owner_conn):
    await fund(db, alice, "20")
    with pytest.raises(RuntimeError):
        async with db.user_transaction(alice.id) as conn:
            tx = await db.credits.deduct_in(
                conn, alice.id, D("1"), session_id=None, description="inside"
            )
            assert tx.amount == D("-5")
            raise RuntimeError("the caller rolls back")
    # Rolled back with the caller's transaction: no charge, no ledger row.
    assert (await account(owner_conn, alice))["current_balance"] == D("20")
    assert (
        await owner_conn.fetchval(
            "SELECT count(*) FROM credit_transactions WHERE transaction_type = 'usage'"
        )
        == 0
    )

    async with db.user_transaction(alice.id) as conn:
        await db.credits.deduct_in(conn, alice.id, D("1"), session_id=None, description="x")
    assert (await account(owner_conn, alice))["current_balance"] == D("15")


async def test_deduct_in_raises_typed_errors_on_the_callers_connection(db, alice):
    async with db.user_transaction(alice.id) as conn:
        with pytest.raises(InsufficientCredits):
            async with conn.transaction():  # a savepoint lets the caller carry on
                await db.credits.deduct_in(conn, alice.id, D("1"), session_id=None, description="x")
        assert await conn.fetchval("SELECT 1") == 1


async def test_sequence_numbers_and_balance_after_chain(db, alice, owner_conn):
    await fund(db, alice, "50")
    await db.credits.deduct_credits(alice.id, D("1"), None, "a")
    await db.credits.deduct_credits(alice.id, D("2"), None, "b")
    await fund(db, alice, "7.25")
    rows = await owner_conn.fetch(
        "SELECT sequence_number, amount, balance_after FROM credit_transactions"
        " WHERE user_id = $1 ORDER BY sequence_number",
        alice.id,
    )
    assert [r["sequence_number"] for r in rows] == [1, 2, 3, 4]
    running = D(0)
    for r in rows:
        running += r["amount"]
        assert r["balance_after"] == running
    assert (await account(owner_conn, alice))["last_sequence"] == 4


# --- idempotency ----------------------------------------------------------------------------
async def test_idempotent_retry_returns_the_original_and_charges_once(db, alice, owner_conn):
    await fund(db, alice, "100")
    first = await db.credits.deduct_credits(alice.id, D("1"), None, "call", idempotency_key="k1")
    again = await db.credits.deduct_credits(alice.id, D("1"), None, "call", idempotency_key="k1")

    assert again == first
    assert (await account(owner_conn, alice))["current_balance"] == D("95")
    assert (
        await owner_conn.fetchval(
            "SELECT count(*) FROM credit_transactions WHERE idempotency_key = 'k1'"
        )
        == 1
    )


async def test_same_key_different_parameters_conflicts(db, alice, owner_conn):
    await fund(db, alice, "100")
    await db.credits.deduct_credits(alice.id, D("1"), None, "call", idempotency_key="k1")
    before = await ledger_state(owner_conn)

    with pytest.raises(IdempotencyConflict):
        await db.credits.deduct_credits(alice.id, D("2"), None, "call", idempotency_key="k1")
    with pytest.raises(IdempotencyConflict):
        await db.credits.deduct_credits(alice.id, D("1"), None, "other", idempotency_key="k1")
    with pytest.raises(IdempotencyConflict):  # keys are per account, across operation types
        await db.billing.purchase(alice.id, D("1"), description="call", idempotency_key="k1")
    assert await ledger_state(owner_conn) == before


async def test_keys_are_per_account(db, alice, bob):
    await fund(db, alice, "10")
    await fund(db, bob, "10")
    a = await db.credits.deduct_credits(alice.id, D("1"), None, "x", idempotency_key="same")
    b = await db.credits.deduct_credits(bob.id, D("1"), None, "x", idempotency_key="same")
    assert a.id != b.id and a.user_id == alice.id and b.user_id == bob.id


async def test_concurrent_retries_with_one_key_charge_once(db, alice, owner_conn):
    await fund(db, alice, "100")
    results = await asyncio.gather(
        *(
            db.credits.deduct_credits(alice.id, D("1"), None, "retry", idempotency_key="once")
            for _ in range(8)
        )
    )
    assert len({r.id for r in results}) == 1
    assert (await account(owner_conn, alice))["current_balance"] == D("95")


async def test_idempotent_purchase_refund_and_adjust(db, alice, admin, owner_conn):
    p1 = await db.billing.purchase(alice.id, D("20"), description="buy", idempotency_key="p")
    p2 = await db.billing.purchase(alice.id, D("20"), description="buy", idempotency_key="p")
    assert p1 == p2
    usage = await db.credits.deduct_credits(alice.id, D("1"), None, "call")
    r1 = await db.billing.refund(alice.id, usage.id, reason="bad", idempotency_key="r")
    r2 = await db.billing.refund(alice.id, usage.id, reason="bad", idempotency_key="r")
    assert r1 == r2
    a1 = await db.billing.adjust(
        alice.id, D("3"), reason="fix", idempotency_key="a", actor_id=admin.id
    )
    a2 = await db.billing.adjust(
        alice.id, D("3"), reason="fix", idempotency_key="a", actor_id=admin.id
    )
    assert a1 == a2
    assert (await account(owner_conn, alice))["current_balance"] == D("23")


# --- purchases, refunds, adjustments --------------------------------------------------------
async def test_purchase_raises_lifetime_purchased(db, alice, owner_conn):
    tx = await db.billing.purchase(
        alice.id, D("12.345678"), description="stripe", stripe_payment_intent_id="pi_1"
    )
    assert tx.transaction_type == "purchase" and tx.stripe_payment_intent_id == "pi_1"
    row = await account(owner_conn, alice)
    assert row["lifetime_purchased"] == D("12.345678") == row["current_balance"]


async def test_a_stripe_payment_is_credited_once(db, alice, owner_conn):
    await db.billing.purchase(alice.id, D("5"), description="a", stripe_payment_intent_id="pi")
    before = await ledger_state(owner_conn)
    with pytest.raises(Conflict):
        await db.billing.purchase(alice.id, D("5"), description="a", stripe_payment_intent_id="pi")
    assert await ledger_state(owner_conn) == before


async def test_refunds_never_exceed_the_charge(db, alice, owner_conn):
    await fund(db, alice, "100")
    usage = await db.credits.deduct_credits(alice.id, D("2"), None, "call")  # 10 credits

    part = await db.billing.refund(alice.id, usage.id, amount=D("4"), reason="partial")
    assert part.amount == D("4") and part.refunded_transaction_id == usage.id
    assert part.balance_after == D("94")
    before = await ledger_state(owner_conn)
    with pytest.raises(InvalidAmount) as raised:
        await db.billing.refund(alice.id, usage.id, amount=D("6.000001"), reason="too much")
    assert raised.value.details["refundable"] == "6.000000"
    assert await ledger_state(owner_conn) == before

    rest = await db.billing.refund(alice.id, usage.id, reason="the rest")
    assert rest.amount == D("6")
    with pytest.raises(InvalidAmount):
        await db.billing.refund(alice.id, usage.id, reason="again")
    row = await account(owner_conn, alice)
    assert row["current_balance"] == D("100") and row["lifetime_spent"] == 0


async def test_concurrent_refunds_of_one_charge_stay_within_it(db, alice, owner_conn):
    await fund(db, alice, "100")
    usage = await db.credits.deduct_credits(alice.id, D("2"), None, "call")  # 10 credits
    results = await asyncio.gather(
        *(db.billing.refund(alice.id, usage.id, amount=D("3"), reason="r") for _ in range(5)),
        return_exceptions=True,
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert len(ok) == 3
    assert all(isinstance(r, InvalidAmount) for r in results if isinstance(r, BaseException))
    assert (await account(owner_conn, alice))["current_balance"] == D("99")


async def test_only_usage_can_be_refunded(db, alice):
    purchase = await db.billing.purchase(alice.id, D("5"), description="buy")
    with pytest.raises(InvalidInput):
        await db.billing.refund(alice.id, purchase.id, reason="no")


async def test_adjust_is_admin_only_and_signed(db, alice, bob, admin, owner_conn):
    await fund(db, alice, "10")
    before = await ledger_state(owner_conn)
    with pytest.raises(InsufficientPrivileges):
        await db.billing.adjust(alice.id, D("5"), reason="gift to a friend", actor_id=bob.id)
    with pytest.raises(InsufficientPrivileges):
        await db.billing.adjust(alice.id, D("5"), reason="gift to myself", actor_id=alice.id)
    assert await ledger_state(owner_conn) == before

    up = await db.billing.adjust(alice.id, D("2.5"), reason="goodwill", actor_id=admin.id)
    down = await db.billing.adjust(alice.id, D("-12.5"), reason="clawback", actor_id=admin.id)
    assert (up.amount, down.amount, down.balance_after) == (D("2.5"), D("-12.5"), D(0))
    assert down.metadata == {"admin_user_id": str(admin.id)}
    with pytest.raises(InsufficientCredits):
        await db.billing.adjust(alice.id, D("-0.000001"), reason="below zero", actor_id=admin.id)


# --- reading --------------------------------------------------------------------------------
async def test_history_is_newest_first_with_keyset_pages(db, alice):
    await fund(db, alice, "100")
    for i in range(5):
        await db.credits.deduct_credits(alice.id, D("0.1"), None, f"call {i}")
    page1 = await db.credits.get_transaction_history(alice.id, limit=4)
    page2 = await db.credits.get_transaction_history(
        alice.id, limit=4, before=page1[-1].sequence_number
    )
    assert [t.sequence_number for t in page1] == [6, 5, 4, 3]
    assert [t.sequence_number for t in page2] == [2, 1]
    purchases = await db.credits.get_transaction_history(alice.id, limit=10, types=["purchase"])
    assert [t.transaction_type for t in purchases] == ["purchase"]
    with pytest.raises(InvalidInput):
        await db.credits.get_transaction_history(alice.id, types=["gift"])
    with pytest.raises(InvalidInput):
        await db.credits.get_transaction_history(alice.id, limit=0)


async def test_validate_sufficient_credits(db, alice, admin):
    await fund(db, alice, "10")
    ok = await db.credits.validate_sufficient_credits(alice.id, D("1"))
    assert ok.sufficient and ok.required == D("5") and ok.shortfall == 0
    assert not ok.is_admin and not ok.unlimited

    short = await db.credits.validate_sufficient_credits(alice.id, D("3"))
    assert not short.sufficient and short.shortfall == D("5")
    assert short.reason == "insufficient_credits"

    await db.credits.reserve(alice.id, D("1"))  # holds 5 of the 10
    held = await db.credits.validate_sufficient_credits(alice.id, D("1.2"))
    assert held.available_balance == D("5") and held.current_balance == D("10")
    assert not held.sufficient and held.shortfall == D("1")

    await db.credits.set_spending_limits(alice.id, daily_limit=D("7"))
    limited = await db.credits.validate_sufficient_credits(alice.id, D("0.5"))
    assert not limited.sufficient and limited.reason == "spending_limit_exceeded"
    assert limited.daily_remaining == D("2")

    boss = await db.credits.validate_sufficient_credits(admin.id, D("1000"))
    assert boss.sufficient and boss.is_admin and boss.unlimited and boss.shortfall == 0


async def test_get_balance(db, alice):
    await fund(db, alice, "10")
    await db.credits.deduct_credits(alice.id, D("1"), None, "x")
    await db.credits.reserve(alice.id, D("0.5"))
    b = await db.credits.get_balance(alice.id)
    assert (b.current, b.held, b.available) == (D("5"), D("2.5"), D("2.5"))
    assert (b.lifetime_purchased, b.lifetime_spent, b.spent_today) == (D(10), D(5), D(5))
    assert not b.unlimited and b.last_sequence == 2


# --- spending limits and auto-recharge ------------------------------------------------------
async def test_daily_limit_is_enforced_atomically(db, alice, owner_conn):
    await fund(db, alice, "100")
    await db.credits.set_spending_limits(alice.id, daily_limit=D("10"))
    await db.credits.deduct_credits(alice.id, D("1.5"), None, "7.5 credits")
    before = await ledger_state(owner_conn)

    with pytest.raises(SpendingLimitExceeded) as raised:
        await db.credits.deduct_credits(alice.id, D("0.6"), None, "3 more")
    assert raised.value.period == "day"
    assert raised.value.spent == D("7.5")
    assert await ledger_state(owner_conn) == before

    results = await asyncio.gather(
        *(db.credits.deduct_credits(alice.id, D("0.2"), None, "1 credit") for _ in range(5)),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 2
    assert (await db.credits.get_balance(alice.id)).spent_today == D("9.5")


async def test_daily_spend_resets_on_a_new_day(db, alice, owner_conn):
    await fund(db, alice, "100")
    await db.credits.set_spending_limits(alice.id, daily_limit=D("5"), monthly_limit=D("8"))
    await db.credits.deduct_credits(alice.id, D("1"), None, "today")
    # Yesterday's spend, as the counters would hold it once the day has passed: the window
    # ended at the start of today (UTC, alice's zone).
    await owner_conn.execute(
        "UPDATE credit_accounts"
        "   SET spend_day_end = date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
        " WHERE user_id = $1",
        alice.id,
    )
    assert (await db.credits.get_balance(alice.id)).spent_today == 0
    await db.credits.deduct_credits(alice.id, D("0.6"), None, "new day")  # 3 credits
    with pytest.raises(SpendingLimitExceeded) as raised:  # the month still counts both days
        await db.credits.deduct_credits(alice.id, D("0.2"), None, "1 more")
    assert raised.value.period == "month"


async def test_days_are_counted_in_the_users_time_zone(db, make_user):
    for zone in ("Pacific/Kiritimati", "Pacific/Pago_Pago"):  # UTC+14 and UTC-11
        user = await make_user(timezone=zone)
        await fund(db, user, "10")
        await db.credits.deduct_credits(user.id, D("0.1"), None, "x")
        balance = await db.credits.get_balance(user.id)
        assert balance.today == datetime.now(ZoneInfo(zone)).date()
        assert balance.spent_today == D("0.5")


async def test_limits_setters(db, alice, bob):
    b = await db.credits.set_spending_limits(alice.id, daily_limit=D("3"), monthly_limit=D("50"))
    assert (b.daily_limit, b.monthly_limit) == (D("3"), D("50"))
    b = await db.credits.set_spending_limits(alice.id, daily_limit=None)
    assert (b.daily_limit, b.monthly_limit) == (None, D("50"))
    with pytest.raises(InvalidAmount):
        await db.credits.set_spending_limits(alice.id, daily_limit=D("0"))
    with pytest.raises(InvalidAmount):
        await db.credits.set_spending_limits(alice.id, monthly_limit=1.5)  # a float: refused
    with pytest.raises(NotFound):  # bob cannot see alice's account
        await db.credits.set_spending_limits(alice.id, daily_limit=D("1"), actor_id=bob.id)
    assert (await db.credits.get_balance(alice.id)).monthly_limit == D("50")


async def test_one_auto_recharge_request_per_threshold_crossing(db, alice, owner_conn):
    await fund(db, alice, "20")
    await db.credits.set_auto_recharge(alice.id, enabled=True, threshold=D("10"), amount=D("25"))
    await db.credits.deduct_credits(alice.id, D("1.6"), None, "to 12")
    assert await db.credits.list_auto_recharge_requests(alice.id) == []
    crossing = await db.credits.deduct_credits(alice.id, D("0.8"), None, "to 8: crosses")
    await db.credits.deduct_credits(alice.id, D("0.4"), None, "to 6: already below")
    requests = await db.credits.list_auto_recharge_requests(alice.id)
    assert len(requests) == 1
    assert requests[0].transaction_id == crossing.id and requests[0].status == "requested"
    assert requests[0].balance_after == D("8") and requests[0].recharge_amount == D("25")

    await fund(db, alice, "25")  # 31: back above
    await db.credits.deduct_credits(alice.id, D("5"), None, "to 6: crosses again")
    assert len(await db.credits.list_auto_recharge_requests(alice.id)) == 2


async def test_concurrent_deductions_record_one_request_per_crossing(db, alice, owner_conn):
    await fund(db, alice, "20")
    await db.credits.set_auto_recharge(alice.id, enabled=True, threshold=D("10"))
    await asyncio.gather(
        *(db.credits.deduct_credits(alice.id, D("0.1"), None, "x") for _ in range(30))
    )  # 20 -> 5, crossing 10 once
    assert await owner_conn.fetchval("SELECT count(*) FROM credit_auto_recharge_requests") == 1


async def test_auto_recharge_disabled_records_nothing(db, alice, owner_conn):
    await fund(db, alice, "20")
    await db.credits.deduct_credits(alice.id, D("3"), None, "to 5")
    assert await owner_conn.fetchval("SELECT count(*) FROM credit_auto_recharge_requests") == 0


# --- isolation and immutability -------------------------------------------------------------
async def test_a_user_cannot_read_another_users_ledger(db, alice, bob):
    await fund(db, alice, "10")
    await db.credits.deduct_credits(alice.id, D("1"), None, "private")
    hold = await db.credits.reserve(alice.id, D("0.1"))
    async with db.user_transaction(bob.id) as conn:
        assert await conn.fetchval("SELECT count(*) FROM credit_transactions") == 0
        assert await conn.fetchval("SELECT count(*) FROM credit_holds") == 0
        assert await conn.fetchval("SELECT count(*) FROM credit_accounts") == 1
    with pytest.raises(NotFound):
        await db.credits.get_balance(alice.id, actor_id=bob.id)
    assert await db.credits.get_transaction_history(alice.id, actor_id=bob.id) == []
    with pytest.raises(NotFound):
        await db.credits.get_hold(alice.id, hold.id, actor_id=bob.id)
    with pytest.raises(NotFound):  # nor as their own
        await db.credits.get_hold(bob.id, hold.id)
    with pytest.raises(NotFound):
        await db.credits.get_transaction(alice.id, hold.id, actor_id=bob.id)


async def test_money_functions_refuse_another_users_account(db, alice, bob, owner_conn):
    await fund(db, alice, "10")
    usage = await db.credits.deduct_credits(alice.id, D("1"), None, "mine")
    hold = await db.credits.reserve(alice.id, D("0.1"))
    before = await ledger_state(owner_conn)
    calls = [
        ("SELECT id FROM keen_credit_deduct($1, 1, NULL, NULL, 'x', NULL)", alice.id),
        ("SELECT id FROM keen_credit_reserve($1, 1, NULL, NULL, '1 minute', 'x', NULL)", alice.id),
        ("SELECT id FROM keen_credit_settle($1, 1, NULL)", hold.id),
        ("SELECT id FROM keen_credit_release($1)", hold.id),
    ]
    for query, *args in calls:
        with pytest.raises(NotFound):
            async with db.user_transaction(bob.id) as conn:
                await conn.fetchrow(query, *args)
    # A refund naming bob for alice's charge: not his (the billing context checks it too).
    with pytest.raises(NotFound):
        await db.billing.refund(bob.id, usage.id, reason="steal")
    with pytest.raises(NotFound):
        await db.credits.settle(hold, D("0.1"), actor_id=bob.id)
    assert await ledger_state(owner_conn) == before


async def test_an_admin_may_act_on_any_account(db, alice, admin):
    tx = await db.billing.purchase(alice.id, D("5"), description="comp", actor_id=admin.id)
    assert tx.user_id == alice.id and tx.metadata == {"admin_user_id": str(admin.id)}
    assert (await db.credits.get_balance(alice.id, actor_id=admin.id)).current == D("5")


async def test_tenant_role_cannot_write_balances_or_the_ledger(db, alice, owner_conn):
    before = await ledger_state(owner_conn)
    with pytest.raises(InsufficientPrivileges):
        async with db.user_transaction(alice.id) as conn:
            await conn.execute(
                "UPDATE credit_accounts SET current_balance = 1000 WHERE user_id = $1", alice.id
            )
    with pytest.raises(InsufficientPrivileges):
        async with db.user_transaction(alice.id) as conn:
            await conn.execute(
                "INSERT INTO credit_transactions (user_id, account_id, transaction_type, amount,"
                " balance_after, description, sequence_number)"
                " SELECT user_id, id, 'purchase', 1000, 1000, 'free', 1 FROM credit_accounts"
            )
    with pytest.raises(InsufficientPrivileges):
        async with db.user_transaction(alice.id) as conn:
            await conn.execute("SELECT keen_credit_expire_holds(10)")
    assert await ledger_state(owner_conn) == before


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE credit_transactions SET amount = amount * 2",
        "DELETE FROM credit_transactions",
    ],
)
async def test_the_ledger_is_append_only_even_for_the_system_role(db, alice, owner_conn, statement):
    await fund(db, alice, "10")
    with pytest.raises(InsufficientPrivileges):  # 0007: keen_system writes no money table
        async with db.system_transaction() as conn:
            await conn.execute(statement)
    # keen_ledger, which writes ledger rows, may only INSERT them
    with pytest.raises(asyncpg.PostgresError) as raised:
        await owner_conn.execute(f"SET ROLE keen_ledger; {statement}")
    await owner_conn.execute("RESET ROLE")
    assert raised.value.sqlstate == "42501"
    with pytest.raises(asyncpg.PostgresError) as raised:  # the owning superuser too
        await owner_conn.execute(statement)
    assert raised.value.sqlstate == "KS405"
    assert await owner_conn.fetchval("SELECT sum(amount) FROM credit_transactions") == D("10")


async def test_unknown_user_or_account(db, alice, owner_conn):
    nobody = uuid.uuid4()
    with pytest.raises(NotFound):
        await db.credits.deduct_credits(nobody, D("1"), None, "x")
    with pytest.raises(NotFound):
        await db.credits.get_balance(nobody)
    with pytest.raises(NotFound):
        await db.billing.refund(alice.id, uuid.uuid4(), reason="x")
    with pytest.raises(NotFound):
        await db.credits.settle(uuid.uuid4(), D("1"), actor_id=alice.id)
    # A user whose account row is gone.
    await owner_conn.execute("DELETE FROM credit_accounts WHERE user_id = $1", alice.id)
    with pytest.raises(NotFound):
        await db.credits.deduct_credits(alice.id, D("1"), None, "x")
    with pytest.raises(NotFound):
        await db.billing.purchase(alice.id, D("1"), description="x")
    assert await owner_conn.fetchval("SELECT count(*) FROM credit_transactions") == 0
