"""The row invariants of the ledger's tables hold for every writer, the owner included.

Migration 0002 states them as one CHECK per table calling ``keen_credit_transaction_valid`` /
``keen_credit_account_valid`` (cheaper per statement than a dozen plain CHECKs). These tests
write rows directly as the superuser, past the money functions, and expect each broken rule to
be refused and the rows that keep the rules to be accepted.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from tests.integration.credits_support import account, fund

D = Decimal

INSERT_ROW = """
    INSERT INTO credit_transactions
        (user_id, account_id, transaction_type, amount, balance_after, claude_cost_usd,
         keen_markup_multiplier, description, is_admin_bypass, sequence_number, idempotency_key,
         idempotency_fingerprint, refunded_transaction_id)
    VALUES ($1, $2, $3, $4, 0, $5, $6, $7, $8, $9, $10, $11, $12)"""


def _row(**changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "transaction_type": "usage",
        "amount": D("-1"),
        "claude_cost_usd": D("0.2"),
        "keen_markup_multiplier": D("5.00"),
        "description": "direct",
        "is_admin_bypass": False,
        "sequence_number": 1000,
        "idempotency_key": None,
        "idempotency_fingerprint": None,
        "refunded": None,
    }
    row.update(changes)
    return row


GOOD_ROWS = {
    "usage": _row(),
    "purchase": _row(transaction_type="purchase", amount=D("1"), claude_cost_usd=None),
    "refund of a charge": _row(transaction_type="refund", amount=D("1"), refunded="charge"),
    "adjustment down": _row(transaction_type="adjustment", amount=D("-1")),
    "admin bypass": _row(transaction_type="admin_bypass", amount=D("0"), is_admin_bypass=True),
    "key with fingerprint": _row(idempotency_key="k", idempotency_fingerprint="f"),
    "no markup recorded": _row(keen_markup_multiplier=None),
    "1000-character description": _row(description="x" * 1000),
}
BAD_ROWS = {
    "unknown type": _row(transaction_type="bonus", amount=D("1")),
    "purchase taking credits": _row(transaction_type="purchase", amount=D("-1")),
    "usage giving credits": _row(amount=D("1")),
    "refund taking credits": _row(transaction_type="refund", amount=D("-1"), refunded="charge"),
    "refund naming no charge": _row(transaction_type="refund", amount=D("1")),
    "usage naming a refunded charge": _row(refunded="charge"),
    "adjustment of zero": _row(transaction_type="adjustment", amount=D("0")),
    "admin bypass moving credits": _row(
        transaction_type="admin_bypass", amount=D("-1"), is_admin_bypass=True
    ),
    "admin bypass without its flag": _row(transaction_type="admin_bypass", amount=D("0")),
    "bypass flag on usage": _row(is_admin_bypass=True),
    "key without fingerprint": _row(idempotency_key="k"),
    "fingerprint without key": _row(idempotency_fingerprint="f"),
    "sequence number zero": _row(sequence_number=0),
    "negative provider cost": _row(claude_cost_usd=D("-0.2")),
    "zero markup": _row(keen_markup_multiplier=D("0")),
    "1001-character description": _row(description="x" * 1001),
}


async def _insert(
    owner_conn: asyncpg.Connection, user: User, charge: Any, row: dict[str, Any]
) -> None:
    acct = await account(owner_conn, user)
    await owner_conn.execute(
        INSERT_ROW,
        user.id,
        acct["id"],
        row["transaction_type"],
        row["amount"],
        row["claude_cost_usd"],
        row["keen_markup_multiplier"],
        row["description"],
        row["is_admin_bypass"],
        row["sequence_number"],
        row["idempotency_key"],
        row["idempotency_fingerprint"],
        charge if row["refunded"] else None,
    )


@pytest.fixture
async def charge(db: KeenDatabase, alice: User) -> Any:
    await fund(db, alice, "10")
    return (await db.credits.deduct_credits(alice.id, D("1"), None, "a charge")).id


@pytest.mark.parametrize("name", sorted(GOOD_ROWS))
async def test_rows_that_keep_the_rules_are_accepted(owner_conn, alice, charge, name):
    await _insert(owner_conn, alice, charge, GOOD_ROWS[name])
    assert (
        await owner_conn.fetchval(
            "SELECT count(*) FROM credit_transactions WHERE sequence_number = 1000"
        )
        == 1
    )


@pytest.mark.parametrize("name", sorted(BAD_ROWS))
async def test_ledger_rows_breaking_a_rule_are_refused(owner_conn, alice, charge, name):
    with pytest.raises(asyncpg.CheckViolationError):
        await _insert(owner_conn, alice, charge, BAD_ROWS[name])
    assert (
        await owner_conn.fetchval(
            "SELECT count(*) FROM credit_transactions WHERE sequence_number = 1000"
        )
        == 0
    )


BAD_ACCOUNTS = {
    "negative balance": "current_balance = -1",
    "holds above the balance": "held_amount = current_balance + 1",
    "negative holds": "held_amount = -1",
    "negative lifetime purchases": "lifetime_purchased = -1",
    "negative lifetime spend": "lifetime_spent = -1",
    "negative spend today": "spent_day = -1",
    "negative spend this month": "spent_month = -1",
    "negative sequence": "last_sequence = -1",
    "zero daily limit": "daily_limit = 0",
    "negative monthly limit": "monthly_limit = -5",
    "negative recharge threshold": "auto_recharge_threshold = -1",
    "zero recharge amount": "auto_recharge_amount = 0",
}


@pytest.mark.parametrize("name", sorted(BAD_ACCOUNTS))
async def test_accounts_breaking_a_rule_are_refused(owner_conn, db, alice, name):
    await fund(db, alice, "10")
    before = dict(await account(owner_conn, alice))
    with pytest.raises(asyncpg.CheckViolationError):
        await owner_conn.execute(
            f"UPDATE credit_accounts SET {BAD_ACCOUNTS[name]} WHERE user_id = $1", alice.id
        )
    assert dict(await account(owner_conn, alice)) == before


async def test_accounts_keeping_the_rules_are_accepted(owner_conn, db, alice):
    await fund(db, alice, "10")
    await owner_conn.execute(
        """UPDATE credit_accounts
              SET held_amount = current_balance, daily_limit = 1, monthly_limit = NULL,
                  auto_recharge_threshold = 0, auto_recharge_amount = NULL
            WHERE user_id = $1""",
        alice.id,
    )
    row = await account(owner_conn, alice)
    assert (row["held_amount"], row["daily_limit"], row["auto_recharge_threshold"]) == (
        D("10"),
        D("1"),
        D("0"),
    )
