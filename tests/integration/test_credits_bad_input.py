"""Every bad input to the ledger gets a typed error and writes nothing (rows are counted)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

import asyncpg
import pytest

from keen_stream.errors import (
    InvalidAmount,
    InvalidIdentifier,
    InvalidInput,
    KeenError,
    NotFound,
)
from tests.integration.credits_support import fund, ledger_state, make_session

D = Decimal

BAD_AMOUNTS = [
    pytest.param(D("-1"), InvalidAmount, id="negative"),
    pytest.param(D("0"), InvalidAmount, id="zero"),
    pytest.param(D("NaN"), InvalidAmount, id="nan"),
    pytest.param(D("sNaN"), InvalidAmount, id="signalling-nan"),
    pytest.param(D("Infinity"), InvalidAmount, id="infinity"),
    pytest.param(D("-Infinity"), InvalidAmount, id="minus-infinity"),
    pytest.param(D("0.0000001"), InvalidAmount, id="seven-places"),
    pytest.param(D("1.0000005"), InvalidAmount, id="over-precise"),
    pytest.param(D("1000000000000"), InvalidAmount, id="out-of-range"),
    pytest.param(0.5, InvalidAmount, id="float"),
    pytest.param(True, InvalidAmount, id="bool"),
    pytest.param("ten", InvalidAmount, id="not-a-number"),
    pytest.param(None, InvalidAmount, id="none"),
    pytest.param([1], InvalidAmount, id="list"),
]


@pytest.fixture
async def funded(db, alice, owner_conn):
    await fund(db, alice, "1000")
    usage = await db.credits.deduct_credits(alice.id, D("1"), None, "a charge")
    hold = await db.credits.reserve(alice.id, D("1"))
    return {"usage": usage, "hold": hold, "before": await ledger_state(owner_conn)}


@pytest.mark.parametrize(("amount", "error"), BAD_AMOUNTS)
async def test_bad_amounts_everywhere(db, alice, admin, owner_conn, funded, amount, error):
    calls = [
        lambda: db.credits.deduct_credits(alice.id, amount, None, "x"),
        lambda: db.billing.purchase(alice.id, amount, description="x"),
        lambda: db.credits.reserve(alice.id, amount),
        lambda: db.credits.settle(funded["hold"], amount),
        lambda: db.credits.validate_sufficient_credits(alice.id, amount),
    ]
    if amount is not None:  # a refund's amount=None means "all that is left"
        calls.append(
            lambda: db.billing.refund(alice.id, funded["usage"].id, amount=amount, reason="x")
        )
    negative = isinstance(amount, Decimal) and amount.is_finite() and amount < 0
    if not negative:  # adjustments are signed
        calls.append(lambda: db.billing.adjust(alice.id, amount, reason="x", actor_id=admin.id))
    for call in calls:
        with pytest.raises(error):
            await call()
    async with db.user_transaction(alice.id) as conn:
        with pytest.raises(error):
            await db.credits.deduct_in(conn, alice.id, amount, session_id=None, description="x")
    assert await ledger_state(owner_conn) == funded["before"]


async def test_a_cost_whose_credits_overflow_is_refused(db, alice, owner_conn, funded):
    with pytest.raises(InvalidAmount):
        await db.credits.deduct_credits(alice.id, D("999999999999"), None, "x")  # x5 overflows
    assert await ledger_state(owner_conn) == funded["before"]


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("not-a-uuid", InvalidIdentifier),
        (12, InvalidIdentifier),
        (None, InvalidIdentifier),
        (uuid.uuid4(), NotFound),
    ],
)
async def test_bad_or_unknown_user(db, owner_conn, funded, value, error):
    with pytest.raises(error):
        await db.credits.deduct_credits(value, D("1"), None, "x")
    with pytest.raises(error):
        await db.billing.purchase(value, D("1"), description="x")
    assert await ledger_state(owner_conn) == funded["before"]


@pytest.mark.parametrize(
    ("handle", "error"),
    [
        ("no_such_session", NotFound),
        ("has spaces", InvalidIdentifier),
        ("x" * 65, InvalidIdentifier),
        (uuid.uuid4(), InvalidIdentifier),
        (17, InvalidIdentifier),
    ],
)
async def test_bad_or_unknown_session(db, alice, owner_conn, funded, handle, error):
    with pytest.raises(error):
        await db.credits.deduct_credits(alice.id, D("1"), handle, "x")
    with pytest.raises(error):
        await db.credits.reserve(alice.id, D("1"), session_handle=handle)
    assert await ledger_state(owner_conn) == funded["before"]


async def test_another_tenants_session_is_not_found(db, alice, bob, owner_conn, funded):
    bobs = await make_session(owner_conn, bob, budget="100")
    before = await ledger_state(owner_conn)
    with pytest.raises(NotFound):
        await db.credits.deduct_credits(alice.id, D("1"), bobs["session_id"], "x")
    with pytest.raises(NotFound):
        await db.credits.reserve(alice.id, D("1"), session_handle=bobs["session_id"])
    async with db.user_transaction(alice.id) as conn:
        with pytest.raises(NotFound):
            async with conn.transaction():
                await db.credits.deduct_in(
                    conn, alice.id, D("1"), session_id=bobs["id"], description="x"
                )
        with pytest.raises(NotFound):
            async with conn.transaction():
                await db.credits.deduct_in(
                    conn, alice.id, D("1"), session_id=uuid.uuid4(), description="x"
                )
    assert await ledger_state(owner_conn) == before


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"description": ""}, InvalidInput),
        ({"description": "   "}, InvalidInput),
        ({"description": "x" * 1001}, InvalidInput),
        ({"description": 5}, InvalidInput),
        ({"idempotency_key": ""}, InvalidInput),
        ({"idempotency_key": "k" * 256}, InvalidInput),
        ({"idempotency_key": 7}, InvalidInput),
    ],
)
async def test_bad_descriptions_and_keys(db, alice, owner_conn, funded, kwargs, error):
    args = {"description": "ok", **kwargs}
    with pytest.raises(error):
        await db.credits.deduct_credits(alice.id, D("1"), None, args.pop("description"), **args)
    assert await ledger_state(owner_conn) == funded["before"]


@pytest.mark.parametrize(
    "ttl", [timedelta(0), timedelta(seconds=-1), timedelta(days=1, seconds=1), 60]
)
async def test_bad_hold_ttl(db, alice, owner_conn, funded, ttl):
    with pytest.raises(InvalidInput):
        await db.credits.reserve(alice.id, D("1"), ttl=ttl)
    assert await ledger_state(owner_conn) == funded["before"]


async def test_settle_by_bare_id_needs_an_actor(db, funded):
    with pytest.raises(InvalidInput):
        await db.credits.settle(funded["hold"].id, D("1"))


# The Python layer refuses all of this first; the functions refuse it again for any caller that
# reaches them directly (defence in depth): tenant code as keen_app, and the billing context.
@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("SELECT id FROM keen_credit_deduct($1, 'NaN', NULL, NULL, 'x', NULL)", "KS422"),
        ("SELECT id FROM keen_credit_deduct($1, 'Infinity', NULL, NULL, 'x', NULL)", "KS422"),
        ("SELECT id FROM keen_credit_deduct($1, '-Infinity', NULL, NULL, 'x', NULL)", "KS422"),
        ("SELECT id FROM keen_credit_deduct($1, 0, NULL, NULL, 'x', NULL)", "KS422"),
        ("SELECT id FROM keen_credit_deduct($1, -1, NULL, NULL, 'x', NULL)", "KS422"),
        ("SELECT id FROM keen_credit_deduct($1, 0.0000001, NULL, NULL, 'x', NULL)", "KS422"),
        ("SELECT id FROM keen_credit_deduct($1, 1e13, NULL, NULL, 'x', NULL)", "KS422"),
        ("SELECT id FROM keen_credit_deduct($1, NULL, NULL, NULL, 'x', NULL)", "KS422"),
        (
            "SELECT id FROM keen_credit_deduct($1, 999999999999, NULL, NULL, 'x', NULL)",
            "KS422",
        ),  # x markup overflows
        ("SELECT id FROM keen_credit_deduct($1, 1, NULL, NULL, 'x', '')", "KS400"),
        (
            "SELECT id FROM keen_credit_reserve($1, 'Infinity', NULL, NULL, '1 minute', 'x', NULL)",
            "KS422",
        ),
        ("SELECT id FROM keen_credit_reserve($1, 1, NULL, NULL, '2 days', 'x', NULL)", "KS400"),
        ("SELECT id FROM keen_credit_deduct($1, 1, NULL, 'no_such', 'x', NULL)", "KS404"),
    ],
)
async def test_functions_validate_for_direct_callers(db, alice, owner_conn, funded, query, code):
    with pytest.raises(KeenError) as raised:
        async with db.user_transaction(alice.id) as conn:
            await conn.fetchval(query, alice.id)
    cause = raised.value.__cause__
    assert isinstance(cause, asyncpg.PostgresError)  # the database's refusal, mapped
    assert cause.sqlstate == code
    assert await ledger_state(owner_conn) == funded["before"]


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("SELECT id FROM keen_credit_purchase($1, 'NaN', 'x', NULL, NULL)", "KS422"),
        ("SELECT id FROM keen_credit_purchase($1, -5, 'x', NULL, NULL)", "KS422"),
        (
            "SELECT id FROM keen_credit_purchase(CASE WHEN $1::uuid IS NULL THEN $1"
            " ELSE gen_random_uuid() END, 5, 'x', NULL, NULL)",
            "KS404",
        ),
        ("SELECT id FROM keen_credit_refund($1, gen_random_uuid(), -1, 'x', NULL)", "KS422"),
        ("SELECT id FROM keen_credit_refund($1, gen_random_uuid(), NULL, 'x', NULL)", "KS404"),
    ],
)
async def test_billing_functions_validate_for_direct_callers(
    db, alice, owner_conn, funded, query, code
):
    with pytest.raises(KeenError) as raised:
        async with db.billing_transaction() as conn:
            await conn.fetchval(query, alice.id)
    cause = raised.value.__cause__
    assert isinstance(cause, asyncpg.PostgresError)  # the database's refusal, mapped
    assert cause.sqlstate == code
    assert await ledger_state(owner_conn) == funded["before"]


async def test_anonymous_caller_reaches_no_account(db, alice, owner_conn, funded):
    with pytest.raises(NotFound):
        async with db.anonymous_transaction() as conn:
            await conn.fetchval(
                "SELECT id FROM keen_credit_deduct($1, 1, NULL, NULL, 'x', NULL)", alice.id
            )
    assert await ledger_state(owner_conn) == funded["before"]


async def test_a_settle_whose_credits_overflow_is_refused(db, alice, owner_conn, funded):
    with pytest.raises(InvalidAmount):
        await db.credits.settle(funded["hold"], D("999999999999"))
    assert await ledger_state(owner_conn) == funded["before"]
