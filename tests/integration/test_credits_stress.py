"""Randomised concurrent load on a few accounts: balances stay exact and provable."""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal

import pytest

from keen_stream.dal.credits import credits_for
from keen_stream.dal.models import CreditTransaction
from keen_stream.errors import InsufficientCredits, InvalidAmount
from tests.integration.credits_support import account

D = Decimal
OPERATIONS = 200


def money(rng: random.Random, low: int, high: int) -> Decimal:
    """A random amount in micro-units between low and high, as an exact Decimal."""
    return D(rng.randint(low, high)).scaleb(-6)


@pytest.mark.parametrize("seed", [1, 2])
async def test_concurrent_deductions_refunds_and_purchases_stay_exact(
    db, make_user, owner_conn, seed
):
    rng = random.Random(seed)
    users = [await make_user() for _ in range(3)]
    for user in users:
        await db.billing.purchase(user.id, D("25"), description="opening")
    usages: list[CreditTransaction] = []
    done: dict[object, CreditTransaction] = {}
    refused: list[BaseException] = []
    # A few keyed calls are sent several times at once: each must charge exactly once.
    keyed = {f"retry-{i}": (rng.choice(users), money(rng, 1, 500_000)) for i in range(10)}

    async def operation(n: int) -> None:
        await asyncio.sleep(rng.random() / 50)
        user = rng.choice(users)
        kind = rng.choices(["deduct", "purchase", "refund", "keyed"], [10, 3, 3, 3])[0]
        try:
            if kind == "deduct":
                cost = money(rng, 1, 2_000_000)
                tx = await db.credits.deduct_credits(user.id, cost, None, f"op {n}")
                assert tx.amount == -credits_for(cost, D("5"))
                usages.append(tx)
            elif kind == "purchase":
                tx = await db.billing.purchase(
                    user.id, money(rng, 1, 20_000_000), description=f"op {n}"
                )
            elif kind == "refund":
                for _ in range(200):  # refund a charge that has happened
                    if usages:
                        break
                    await asyncio.sleep(0.005)
                charge = rng.choice(usages)
                tx = await db.billing.refund(
                    charge.user_id, charge.id, amount=money(rng, 1, 3_000_000), reason=f"op {n}"
                )
            else:
                key = rng.choice(list(keyed))
                owner, cost = keyed[key]
                tx = await db.credits.deduct_credits(
                    owner.id, cost, None, "keyed", idempotency_key=key
                )
            done[tx.id] = tx
        except (InsufficientCredits, InvalidAmount) as exc:  # no funds / refund beyond charge
            refused.append(exc)

    await asyncio.gather(*(operation(n) for n in range(OPERATIONS)))

    assert refused, "the load should hit some refusals"
    kinds = {t.transaction_type for t in done.values()}
    assert kinds == {"usage", "purchase", "refund"}
    assert any(t.idempotency_key for t in done.values())
    keyed_rows = await owner_conn.fetch(
        "SELECT idempotency_key, count(*) AS n FROM credit_transactions"
        " WHERE idempotency_key IS NOT NULL GROUP BY idempotency_key"
    )
    assert all(r["n"] == 1 for r in keyed_rows)
    for user in users:
        row = await account(owner_conn, user)
        expected = D("25") + sum((t.amount for t in done.values() if t.user_id == user.id), D(0))
        assert row["current_balance"] == expected
        assert row["current_balance"] >= 0
        lowest = await owner_conn.fetchval(
            "SELECT min(balance_after) FROM credit_transactions WHERE user_id = $1", user.id
        )
        assert lowest >= 0
    refunds = await owner_conn.fetch(
        "SELECT o.amount AS charged, sum(r.amount) AS refunded FROM credit_transactions o"
        " JOIN credit_transactions r ON r.refunded_transaction_id = o.id GROUP BY o.id, o.amount"
    )
    assert all(r["refunded"] <= -r["charged"] for r in refunds)
    report = await db.credits.verify_ledger()
    assert report.ok, report.problems
    assert report.transactions == 3 + len(done)


async def test_idempotent_retries_race_across_accounts_and_operations(db, make_user, owner_conn):
    users = [await make_user() for _ in range(2)]
    for user in users:
        await db.billing.purchase(user.id, D("100"), description="opening")
    calls = []
    for user in users:
        for i in range(5):
            calls += [
                db.credits.deduct_credits(user.id, D("0.3"), None, "d", idempotency_key=f"d{i}"),
                db.billing.purchase(user.id, D("1"), description="p", idempotency_key=f"p{i}"),
            ] * 3
    random.Random(7).shuffle(calls)
    results = await asyncio.gather(*calls)
    assert len({r.id for r in results}) == 20
    for user in users:
        # 100 - 5 x 1.5 + 5 x 1
        assert (await account(owner_conn, user))["current_balance"] == D("97.5")
    assert (await db.credits.verify_ledger()).ok
