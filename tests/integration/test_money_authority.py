"""Money authority sits with the server, not tenant code (docs/ledger.md, "Who may move money").

Every attack is tried as tenant code really runs: SQL as keen_app in a tenant transaction,
calling the ledger's functions directly with hostile arguments (both the signatures they had
before migration 0007 and the ones they have now), and through the DAL.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.dal.users import upsert_super_admin
from keen_stream.errors import (
    DatabaseError,
    InsufficientCredits,
    InsufficientPrivileges,
    InvalidAmount,
    InvalidInput,
)
from tests.integration.credits_support import account, fund, ledger_state

D = Decimal

#: SQLSTATE of "no such function" (the signature that took a markup is gone).
UNDEFINED_FUNCTION = "42883"


async def _refused(db: KeenDatabase, actor: User, query: str, *args: object) -> None:
    """What "tenant code cannot call it" looks like: no EXECUTE, or no such function at all."""
    with pytest.raises((InsufficientPrivileges, DatabaseError)) as refused:
        async with db.user_transaction(actor.id) as conn:
            await conn.fetchrow(query, *args)
    if not isinstance(refused.value, InsufficientPrivileges):
        assert refused.value.details.get("sqlstate") == UNDEFINED_FUNCTION, refused.value


# --- the price ------------------------------------------------------------------------------
async def test_tenant_code_cannot_choose_the_markup(db: KeenDatabase, alice: User, owner_conn):
    await fund(db, alice, "100")
    before = await ledger_state(owner_conn)
    for query in (
        # 0.01 charged $1 as 0.01 credits.
        "SELECT id FROM keen_credit_deduct($1, 1.00, 0.01, NULL, NULL, 'cheap', NULL)",
        "SELECT id FROM keen_credit_reserve($1, 1.00, 0.01, NULL, NULL, '1 minute', 'cheap', NULL)",
    ):
        await _refused(db, alice, query, alice.id)
    assert await ledger_state(owner_conn) == before
    # No function keen_app may execute that writes (VOLATILE) takes a markup at all; the pure
    # rounding rule keen_credits_for(cost, markup) moves nothing.
    assert (
        await owner_conn.fetch(
            "SELECT p.oid::regprocedure::text FROM pg_proc p"
            " WHERE p.pronamespace = 'public'::regnamespace AND 'p_markup' = ANY (p.proargnames)"
            "   AND p.provolatile = 'v' AND has_function_privilege('keen_app', p.oid, 'EXECUTE')"
        )
        == []
    )
    tx = await db.credits.deduct_credits(alice.id, D("1.00"), None, "priced by the server")
    assert (tx.amount, tx.keen_markup_multiplier) == (D("-5"), D("5.00"))


async def test_the_markup_is_the_servers_and_each_change_is_audited(
    db: KeenDatabase, alice: User, admin: User, owner_conn
):
    await fund(db, alice, "100")
    hold = await db.credits.reserve(alice.id, D("1"))  # at 5.00
    assert await db.billing.get_markup() == D("5.00")

    changed = await db.billing.set_markup(D("2.50"), reason="spring promotion", actor_id=admin.id)
    assert changed == D("2.50")
    assert await db.billing.get_markup() == D("2.50")
    tx = await db.credits.deduct_credits(alice.id, D("0.000001"), None, "tie")
    assert (tx.amount, tx.keen_markup_multiplier) == (D("-0.000003"), D("2.50"))  # rounds up
    settled = await db.credits.settle(hold, D("1"))  # a hold keeps the markup it was made at
    assert (settled.amount, settled.keen_markup_multiplier) == (D("-5"), D("5.00"))
    check = await db.credits.validate_sufficient_credits(alice.id, D("2"))
    assert (check.required, check.markup_multiplier) == (D("5"), D("2.50"))

    audit = await owner_conn.fetchrow(
        "SELECT actor_user_id, db_role, changes -> 'markup' ->> 'old' AS old_markup,"
        "       changes -> 'markup' ->> 'new' AS new_markup,"
        "       changes -> 'reason' ->> 'new' AS reason"
        "  FROM audit_log WHERE table_name = 'credit_pricing' AND action = 'UPDATE'"
    )
    assert audit["actor_user_id"] == admin.id
    assert audit["db_role"].endswith("/keen_billing")
    assert (audit["old_markup"], audit["new_markup"]) == ("5.00", "2.50")
    assert audit["reason"] == "spring promotion"


async def test_only_an_admin_in_the_billing_context_changes_the_markup(
    db: KeenDatabase, alice: User, admin: User, owner_conn
):
    with pytest.raises(InsufficientPrivileges):
        await db.billing.set_markup(D("0.01"), reason="my own price", actor_id=alice.id)
    for query in (
        "UPDATE credit_pricing SET markup = 0.01",
        "SELECT keen_credit_set_markup(0.01, 'my own price')",
    ):
        for actor in (alice, admin):  # an admin's tenant transaction is tenant code too
            with pytest.raises(InsufficientPrivileges):
                async with db.user_transaction(actor.id) as conn:
                    await conn.execute(query)
    for bad in (D("0"), D("-1"), D("NaN"), D("100"), D("1.234"), 5.0, "five"):
        with pytest.raises(InvalidAmount):
            await db.billing.set_markup(bad, reason="bad", actor_id=admin.id)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        await db.billing.set_markup(D("4"), reason=" ", actor_id=admin.id)
    assert await db.billing.get_markup() == D("5.00")
    assert (
        await owner_conn.fetchval(
            "SELECT count(*) FROM audit_log WHERE table_name = 'credit_pricing'"
            " AND action = 'UPDATE'"
        )
        == 0
    )


# --- minting --------------------------------------------------------------------------------
async def test_tenant_code_cannot_mint_credits(
    db: KeenDatabase, alice: User, admin: User, owner_conn
):
    before = await ledger_state(owner_conn)
    attempts = [
        # The issue's: 999,999,999 credits for nothing, with a NaN markup on the row.
        "SELECT id FROM keen_credit_purchase($1, 999999999, 'NaN', 'free', NULL, NULL)",
        "SELECT id FROM keen_credit_purchase($1, 999999999, 'free', NULL, NULL)",
        "SELECT id FROM keen_credit_adjust($1, 999999999, 5, 'free', NULL)",
        "SELECT id FROM keen_credit_adjust($1, 999999999, 'free', NULL)",
    ]
    for actor in (alice, admin):
        for query in attempts:
            await _refused(db, actor, query, alice.id)
    assert await ledger_state(owner_conn) == before
    assert (await account(owner_conn, alice))["current_balance"] == 0


async def test_a_user_cannot_refund_their_own_usage(
    db: KeenDatabase, alice: User, admin: User, owner_conn
):
    await fund(db, alice, "10")
    usage = await db.credits.deduct_credits(alice.id, D("1"), None, "a real charge")
    before = await ledger_state(owner_conn)
    await _refused(
        db,
        alice,
        "SELECT id FROM keen_credit_refund($1, $2, NULL, 'mine', NULL)",
        alice.id,
        usage.id,
    )
    assert await ledger_state(owner_conn) == before
    with pytest.raises(InsufficientPrivileges):  # naming herself as the acting admin
        await db.billing.refund(alice.id, usage.id, reason="mine", actor_id=alice.id)
    assert await ledger_state(owner_conn) == before

    refund = await db.billing.refund(alice.id, usage.id, reason="support", actor_id=admin.id)
    assert refund.amount == D("5") and refund.metadata == {"admin_user_id": str(admin.id)}


async def test_a_tenant_cannot_squat_another_customers_payment_intent(
    db: KeenDatabase, alice: User, bob: User, owner_conn
):
    before = await ledger_state(owner_conn)
    for query in (
        "SELECT id FROM keen_credit_purchase($1, 1, 5, 'squat', 'pi_bobs_payment', NULL)",
        "SELECT id FROM keen_credit_purchase($1, 1, 'squat', 'pi_bobs_payment', NULL)",
    ):
        await _refused(db, alice, query, alice.id)
    assert await ledger_state(owner_conn) == before
    paid = await db.billing.purchase(
        bob.id, D("50"), description="card payment", stripe_payment_intent_id="pi_bobs_payment"
    )
    assert (paid.user_id, paid.amount, paid.stripe_payment_intent_id) == (
        bob.id,
        D("50"),
        "pi_bobs_payment",
    )


async def test_adjustments_need_an_admin_actor_and_record_who(
    db: KeenDatabase, alice: User, bob: User, admin: User, owner_conn
):
    await fund(db, alice, "10")
    before = await ledger_state(owner_conn)
    for actor in (bob, alice):
        with pytest.raises(InsufficientPrivileges):
            await db.billing.adjust(alice.id, D("5"), reason="a gift", actor_id=actor.id)
    with pytest.raises(InsufficientPrivileges):  # the billing context, nobody acting
        async with db.billing_transaction() as conn:
            await conn.fetchrow("SELECT id FROM keen_credit_adjust($1, 5, 'x', NULL)", alice.id)
    assert await ledger_state(owner_conn) == before

    up = await db.billing.adjust(alice.id, D("2.5"), reason="goodwill", actor_id=admin.id)
    assert up.metadata == {"admin_user_id": str(admin.id)} and up.balance_after == D("12.5")


async def test_the_billing_role_is_the_only_one_that_may_mint(owner_conn):
    minting = await owner_conn.fetch(
        "SELECT p.oid::regprocedure::text AS function,"
        "       array(SELECT r.rolname::text FROM pg_roles r"
        "              WHERE r.rolname IN ('keen_app', 'keen_system', 'keen_billing')"
        "                AND has_function_privilege(r.oid, p.oid, 'EXECUTE')"
        "              ORDER BY 1) AS callers"
        "  FROM pg_proc p WHERE p.proname IN ('keen_credit_purchase', 'keen_credit_refund',"
        "                                     'keen_credit_adjust', 'keen_credit_set_markup')"
    )
    assert len(minting) == 4
    assert {r["function"].split("(")[0]: r["callers"] for r in minting} == {
        name: ["keen_billing"]
        for name in (
            "keen_credit_purchase",
            "keen_credit_refund",
            "keen_credit_adjust",
            "keen_credit_set_markup",
        )
    }


# --- the admin bypass is decided when the charge is made ------------------------------------
async def test_a_hold_made_as_an_admin_is_paid_if_the_admin_is_demoted_before_it_settles(
    db: KeenDatabase, make_user, owner_conn
):
    """An admin's hold holds nothing (``is_admin_bypass``); settling it used to write an
    ``admin_bypass`` row on the strength of the reservation alone. Settling is the charge, so
    who pays is decided then, as for a deduction: demoted in between, the user pays (the whole
    charge must fit, nothing was held); promoted in between, the user pays nothing and the
    held credits are freed."""
    carol = await make_user()
    await owner_conn.execute(
        "UPDATE users SET role = 'admin', is_admin = true WHERE id = $1", carol.id
    )
    await fund(db, carol, "100")
    hold = await db.credits.reserve(carol.id, D("2"))
    assert hold.is_admin_bypass and hold.amount == 0
    async with db.system_transaction() as conn:
        await conn.execute(
            "UPDATE users SET role = 'user', is_admin = false WHERE id = $1", carol.id
        )
    tx = await db.credits.settle(hold, D("2"))
    assert (tx.transaction_type, tx.amount, tx.balance_after) == ("usage", D("-10"), D("90"))
    balance = await db.credits.get_balance(carol.id)
    assert (balance.current, balance.held, balance.lifetime_spent) == (D("90"), D("0"), D("10"))

    # ...and a charge larger than what is left is refused like a deduction; the hold stays.
    big = await db.credits.reserve(carol.id, D("1"))  # 5 held, as a user now
    await owner_conn.execute(
        "UPDATE users SET role = 'admin', is_admin = true WHERE id = $1", carol.id
    )
    bypass_hold = await db.credits.reserve(carol.id, D("100"))  # 500 notional, 0 held
    await owner_conn.execute(
        "UPDATE users SET role = 'user', is_admin = false WHERE id = $1", carol.id
    )
    with pytest.raises(InsufficientCredits):
        await db.credits.settle(bypass_hold, D("100"))
    assert (await db.credits.get_hold(carol.id, bypass_hold.id)).status == "active"

    # Promoted between reserve and settle: nothing to pay, the 5 held are freed.
    await owner_conn.execute(
        "UPDATE users SET role = 'admin', is_admin = true WHERE id = $1", carol.id
    )
    freed = await db.credits.settle(big, D("1"))
    assert (freed.transaction_type, freed.amount) == ("admin_bypass", D("0"))
    balance = await db.credits.get_balance(carol.id)
    assert (balance.current, balance.held) == (D("90"), D("0"))
    assert (await db.credits.verify_ledger()).ok


async def _charge_kind(db: KeenDatabase, user_id: uuid.UUID) -> str:
    tx = await db.credits.deduct_credits(user_id, D("1"), None, "after the change")
    return tx.transaction_type


async def test_an_unlimited_account_stops_being_free_when_its_admin_is_demoted(
    db: KeenDatabase, alice: User, owner_conn
) -> None:
    """The system role made alice admin for a moment and opened her account unlimited."""
    await fund(db, alice, "10")
    async with db.system_transaction() as conn:
        await conn.execute(
            "UPDATE users SET is_admin = true, role = 'admin' WHERE id = $1", alice.id
        )
        await conn.execute("SELECT keen_credit_open_account($1, true)", alice.id)
        await conn.execute(
            "UPDATE users SET is_admin = false, role = 'user' WHERE id = $1", alice.id
        )
    flags = await owner_conn.fetchrow(
        "SELECT unlimited_credits, bypass_billing FROM credit_accounts WHERE user_id = $1", alice.id
    )
    assert tuple(flags) == (False, False)
    assert await _charge_kind(db, alice.id) == "usage"


async def test_a_super_admin_suspended_and_reactivated_as_a_user_pays(
    db: KeenDatabase, owner_conn
) -> None:
    admin = await upsert_super_admin(db, "root@example.com", "a long enough password 1")
    await fund(db, admin, "10")
    assert await _charge_kind(db, admin.id) == "admin_bypass"
    async with db.system_transaction() as conn:
        await conn.execute(
            "UPDATE users SET role = 'user', is_admin = false, account_status = 'suspended'"
            " WHERE id = $1",
            admin.id,
        )
        await conn.execute("UPDATE users SET account_status = 'active' WHERE id = $1", admin.id)
    assert await _charge_kind(db, admin.id) == "usage"
