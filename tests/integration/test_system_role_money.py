"""The system role and the money it must not move (docs/ledger.md, "Who may move money").

``keen_system`` (every ``db.system_transaction()``: registration, the hub's maintenance loops)
does maintenance only. Taking EXECUTE on the minting functions away was not enough while it kept
the table privileges those functions need (UPDATE on ``credit_pricing``, INSERT / UPDATE on
``credit_accounts`` and ``credit_transactions``) and owned the functions (an owner can grant
itself EXECUTE back). Since 0007 the role ``keen_ledger`` owns every function of the ledger and
alone writes the money tables; ``keen_system`` reads them and executes what it is granted.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.errors import InsufficientPrivileges
from tests.integration.credits_support import fund

D = Decimal


async def test_the_system_role_cannot_change_the_price(db: KeenDatabase, owner_conn) -> None:
    with pytest.raises(InsufficientPrivileges):
        async with db.system_transaction() as conn:
            await conn.execute("UPDATE credit_pricing SET markup = 0.01, reason = 'maintenance'")
    assert await owner_conn.fetchval("SELECT markup FROM credit_pricing") == D("5.00")


async def test_the_system_role_cannot_mint(db: KeenDatabase, alice: User, owner_conn) -> None:
    await fund(db, alice, "1")
    with pytest.raises(InsufficientPrivileges):
        async with db.system_transaction() as conn:
            await conn.execute(
                "GRANT EXECUTE ON FUNCTION keen_credit_purchase(uuid, numeric, text, text, text)"
                " TO keen_system"
            )
            await conn.execute(
                "SELECT id FROM keen_credit_purchase($1, 1000000, 'minted', NULL, NULL)",
                alice.id,
            )
    assert await owner_conn.fetchval(
        "SELECT current_balance FROM credit_accounts WHERE user_id = $1", alice.id
    ) == D("1")


async def test_the_system_role_writes_no_money_table_and_owns_no_ledger_function(
    db: KeenDatabase, alice: User, owner_conn
) -> None:
    await fund(db, alice, "1")
    for statement in (
        "UPDATE credit_accounts SET current_balance = current_balance + 1000",
        "UPDATE credit_accounts SET unlimited_credits = true",
        "INSERT INTO credit_transactions (user_id, account_id, transaction_type, amount,"
        " balance_after, keen_markup_multiplier, description, sequence_number)"
        " SELECT user_id, id, 'purchase', 1000, 1001, 5, 'minted', last_sequence + 1"
        "   FROM credit_accounts",
        "UPDATE credit_holds SET amount = 0",
        "DELETE FROM credit_holds",
        "INSERT INTO credit_pricing (markup, reason) VALUES (0.01, 'a second price')",
    ):
        with pytest.raises(InsufficientPrivileges):
            async with db.system_transaction() as conn:
                await conn.execute(statement)
    assert await owner_conn.fetchval(
        "SELECT current_balance FROM credit_accounts WHERE user_id = $1", alice.id
    ) == D("1")
    privileges = await owner_conn.fetch(
        "SELECT t AS table, p AS privilege FROM"
        " unnest(ARRAY['credit_accounts', 'credit_transactions', 'credit_holds',"
        "              'credit_pricing']) AS t,"
        " unnest(ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) AS p"
        " WHERE CASE WHEN p IN ('INSERT', 'UPDATE')"
        "            THEN has_any_column_privilege('keen_system', t, p)"
        "            ELSE has_table_privilege('keen_system', t, p) END"
    )
    assert privileges == []
    owned = await owner_conn.fetch(
        "SELECT p.proname::text FROM pg_proc p"
        " WHERE p.pronamespace = 'public'::regnamespace"
        "   AND p.proowner = 'keen_system'::regrole"
        "   AND (p.proname LIKE 'keen\\_credit%' OR p.proname LIKE 'keen\\_ledger%'"
        "        OR p.proname LIKE 'keen\\_budget%' OR p.proname LIKE 'keen\\_spend%'"
        "        OR p.proname IN ('keen_money_check', 'keen_billing_actor',"
        "                         'keen_users_timezone_changed'))"
    )
    assert owned == []
    role = await owner_conn.fetchrow("SELECT * FROM pg_roles WHERE rolname = 'keen_ledger'")
    assert not (role["rolcanlogin"] or role["rolsuper"] or role["rolinherit"])
    assert (
        await owner_conn.fetchval(
            "SELECT count(*) FROM pg_auth_members WHERE roleid = 'keen_ledger'::regrole"
            "   AND member IN ('keen_app'::regrole, 'keen_system'::regrole,"
            "                  'keen_billing'::regrole)"
        )
        == 0
    )


async def test_registration_and_the_admin_account_go_through_the_ledger(
    db: KeenDatabase, alice: User, admin: User, owner_conn
) -> None:
    """The system role opens accounts (balance 0) and makes an admin's unlimited, and nothing
    else: an ordinary user's account is not made unlimited."""
    rows = await owner_conn.fetch(
        "SELECT user_id, current_balance, unlimited_credits, bypass_billing FROM credit_accounts"
    )
    assert {r["user_id"]: tuple(r)[1:] for r in rows} == {
        alice.id: (D("0"), False, False),
        admin.id: (D("0"), True, True),
    }
    with pytest.raises(InsufficientPrivileges):
        async with db.system_transaction() as conn:
            await conn.execute("SELECT keen_credit_open_account($1, true)", alice.id)
    assert (
        await owner_conn.fetchval(
            "SELECT unlimited_credits FROM credit_accounts WHERE user_id = $1", alice.id
        )
        is False
    )
