"""`keen-stream ledger verify` proves the balances, and catches a tampered ledger."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from decimal import Decimal

import pytest

from keen_stream.cli import build_parser
from tests.integration.credits_support import fund

D = Decimal


async def run_cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KEEN_DATABASE_URL": dsn}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "keen_stream", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def some_activity(db, alice, bob, admin) -> None:
    await fund(db, alice, "50")
    await fund(db, bob, "5")
    usage = await db.credits.deduct_credits(alice.id, D("1"), None, "call")
    await db.billing.refund(alice.id, usage.id, amount=D("2"), reason="partial")
    await db.credits.deduct_credits(admin.id, D("3"), None, "bypass")
    hold = await db.credits.reserve(alice.id, D("1"))
    await db.credits.settle(hold, D("0.4"))
    await db.credits.reserve(bob.id, D("0.5"))  # left active
    await db.billing.adjust(bob.id, D("-1"), reason="fix", actor_id=admin.id)


def test_ledger_verify_is_registered():
    args = build_parser().parse_args(["ledger", "verify"])
    assert args.func.__name__ == "cmd_verify"


async def test_verify_passes_on_a_clean_ledger(db, fresh_dsn, alice, bob, admin):
    await some_activity(db, alice, bob, admin)
    report = await db.credits.verify_ledger()
    assert report.ok and report.problems == []
    assert (report.accounts, report.transactions, report.active_holds) == (3, 7, 1)

    done = await run_cli(fresh_dsn, "ledger", "verify")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 accounts, 7 transactions, 1 active holds" in done.stdout
    assert "ledger verify: OK" in done.stdout


async def test_verify_fails_on_a_tampered_ledger(db, fresh_dsn, owner_conn, alice, bob, admin):
    await some_activity(db, alice, bob, admin)
    # Corrupt it the only way possible: as the owning superuser, with the append-only trigger
    # switched off for the moment.
    await owner_conn.execute(
        "ALTER TABLE credit_transactions DISABLE TRIGGER credit_transactions_append_only"
    )
    try:
        await owner_conn.execute(
            "UPDATE credit_transactions SET amount = amount - 1"
            " WHERE user_id = $1 AND sequence_number = 2",
            alice.id,
        )
    finally:
        await owner_conn.execute(
            "ALTER TABLE credit_transactions ENABLE TRIGGER credit_transactions_append_only"
        )

    done = await run_cli(fresh_dsn, "ledger", "verify")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "MISMATCH" in done.stdout and "FAILED" in done.stdout
    report = await db.credits.verify_ledger()
    problems = {p.problem for p in report.problems}
    assert problems == {
        "balance differs from the sum of its ledger",
        "balance_after does not chain",
        "lifetime_spent differs from usage minus refunds",
    }
    assert {p.user_id for p in report.problems} == {alice.id}


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (
            "UPDATE credit_accounts SET current_balance = current_balance + 1 WHERE user_id = $1",
            {"balance differs from the sum of its ledger"},
        ),
        (
            "UPDATE credit_accounts SET held_amount = held_amount + 1,"
            " current_balance = current_balance WHERE user_id = $1",
            {"held_amount differs from active holds"},
        ),
        (
            "UPDATE credit_accounts SET lifetime_purchased = 0 WHERE user_id = $1",
            {"lifetime_purchased differs from purchases"},
        ),
        (
            "UPDATE credit_accounts SET last_sequence = last_sequence + 1 WHERE user_id = $1",
            {"last_sequence differs from the ledger"},
        ),
    ],
)
async def test_verify_names_each_kind_of_account_drift(
    db, owner_conn, alice, bob, admin, tamper, expected
):
    await some_activity(db, alice, bob, admin)
    await owner_conn.execute(tamper, alice.id)
    report = await db.credits.verify_ledger()
    assert {p.problem for p in report.problems} == expected


async def test_verify_catches_a_deleted_row(db, owner_conn, alice, bob, admin):
    await some_activity(db, alice, bob, admin)
    await owner_conn.execute(
        "ALTER TABLE credit_transactions DISABLE TRIGGER credit_transactions_append_only"
    )
    try:
        await owner_conn.execute(
            "DELETE FROM credit_transactions WHERE user_id = $1 AND sequence_number = 3"
            " AND refunded_transaction_id IS NOT NULL",
            alice.id,
        )
    finally:
        await owner_conn.execute(
            "ALTER TABLE credit_transactions ENABLE TRIGGER credit_transactions_append_only"
        )
    problems = {p.problem for p in (await db.credits.verify_ledger()).problems}
    assert "sequence numbers are not contiguous from 1" in problems
    assert "balance differs from the sum of its ledger" in problems
