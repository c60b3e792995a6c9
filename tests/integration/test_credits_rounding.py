"""The SQL rounding rule (keen_credits_for) and its Python mirror agree, boundaries included."""

from __future__ import annotations

import random
from decimal import Decimal

from keen_stream.dal.credits import credits_for

D = Decimal


def cases() -> list[tuple[Decimal, Decimal]]:
    rng = random.Random(42)
    fixed = [
        (D("0.000001"), D("5.00")),
        (D("0.000001"), D("2.50")),
        (D("0.000003"), D("0.50")),
        (D("0.000001"), D("0.01")),
        (D("1.000001"), D("1.01")),
        (D("0.333333"), D("3.00")),
        (D("999999999999.999999"), D("1.00")),
        (D("199999999999.999999"), D("5.00")),
        (D("2.00"), D("5.00")),
        (D("0.000007"), D("1.25")),
        (D("12.345678"), D("99.99")),
    ]
    drawn = [
        (D(rng.randint(1, 10**12)).scaleb(-6), D(rng.randint(1, 9999)).scaleb(-2))
        for _ in range(2000)
    ]
    return fixed + drawn


async def test_sql_and_python_round_identically(owner_conn):
    pairs = cases()
    rows = await owner_conn.fetch(
        "SELECT c, m, keen_credits_for(c, m) AS credits"
        " FROM unnest($1::numeric[], $2::numeric[]) AS t(c, m)",
        [c for c, _ in pairs],
        [m for _, m in pairs],
    )
    assert len(rows) == len(pairs)
    mismatches = [
        (r["c"], r["m"], r["credits"], credits_for(r["c"], r["m"]))
        for r in rows
        if r["credits"] != credits_for(r["c"], r["m"])
    ]
    assert mismatches == []


async def test_the_ledger_charges_what_the_rule_says(db, alice):
    await db.billing.purchase(alice.id, D("100"), description="buy")
    markup = await db.billing.get_markup()
    for cost in (D("0.000001"), D("0.123457"), D("3.333333")):
        tx = await db.credits.deduct_credits(alice.id, cost, None, "x")
        assert tx.amount == -credits_for(cost, markup)
