"""The one rounding rule (credits for a provider cost), at its boundaries. No database."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keen_stream.dal.credits import credits_for
from keen_stream.dal.validation import MONEY_MAX, MONEY_QUANTUM, parse_money
from keen_stream.errors import (
    InsufficientCredits,
    InvalidAmount,
    SessionBudgetExceeded,
    SpendingLimitExceeded,
)

D = Decimal
MICRO = D("0.000001")


@pytest.mark.parametrize(
    ("cost", "markup", "credits"),
    [
        # The seed's cases: 5x markup is exact.
        (D("2.00"), D("5.00"), D("10.000000")),
        (D("1.50"), D("5.00"), D("7.500000")),
        (D("10.50"), D("5.00"), D("52.500000")),
        # Six decimal places in, six out: exact products stay exact.
        (D("0.000001"), D("5.00"), D("0.000005")),
        (D("123.456789"), D("5.00"), D("617.283945")),
        (D("0.333333"), D("3.00"), D("0.999999")),
        # Ties round up, not to even: 0.0000025 -> 0.000003 and 0.0000005 -> 0.000001.
        (D("0.000001"), D("2.50"), D("0.000003")),
        (D("0.000003"), D("0.50"), D("0.000002")),
        (D("0.000001"), D("0.50"), D("0.000001")),
        # Anything above a micro-credit boundary rounds up to the next one.
        (D("1.000001"), D("1.01"), D("1.010002")),
        (D("0.000007"), D("1.25"), D("0.000009")),
        # Tiny costs are never free.
        (D("0.000001"), D("0.01"), D("0.000001")),
        (D("0.000001"), D("1.00"), D("0.000001")),
        # The top of the range at markup 1 is exact.
        (MONEY_MAX, D("1.00"), MONEY_MAX),
    ],
)
def test_credits_for_boundaries(cost, markup, credits):
    result = credits_for(cost, markup)
    assert result == credits
    assert result.as_tuple().exponent == -6


def test_ties_differ_from_half_even_and_match_half_up_only_at_ties():
    exact = D("0.000001") * D("2.50")
    assert exact.quantize(MICRO, rounding=ROUND_HALF_EVEN) == D("0.000002")
    assert exact.quantize(MICRO, rounding=ROUND_HALF_UP) == credits_for(D("0.000001"), D("2.5"))
    below_tie = D("0.000001") * D("1.40")  # 0.0000014: half-up would give 0.000001
    assert credits_for(D("0.000001"), D("1.40")) == D("0.000002")
    assert below_tie.quantize(MICRO, rounding=ROUND_HALF_UP) == D("0.000001")


costs = st.decimals(min_value=MICRO, max_value=D("1000000"), places=6, allow_nan=False)
markups = st.decimals(min_value=D("0.01"), max_value=D("99.99"), places=2, allow_nan=False)


@given(costs, markups)
def test_credits_never_undercharge_and_overcharge_by_less_than_a_micro_credit(cost, markup):
    exact = cost * markup
    credits = credits_for(cost, markup)
    assert credits >= exact
    assert credits - exact < MICRO
    assert credits == credits.quantize(MICRO)
    assert credits > 0


@given(costs, markups, costs)
def test_credits_are_monotonic_in_cost(a, markup, b):
    low, high = sorted((a, b))
    assert credits_for(low, markup) <= credits_for(high, markup)


@pytest.mark.parametrize(
    "value",
    [
        0.1,
        1.0,
        float("nan"),
        D("NaN"),
        D("Infinity"),
        D("-1"),
        D("0"),
        D("0.0000001"),
        MONEY_MAX + MICRO,
        True,
    ],
)
def test_money_inputs_are_refused_not_rounded(value):
    with pytest.raises(InvalidAmount):
        parse_money(value, "claude_cost_usd")


def test_money_inputs_keep_their_value():
    assert parse_money("2.5", "x") == D("2.500000")
    assert parse_money(3, "x") == D("3.000000")
    assert parse_money(D("1.2300000000"), "x") == D("1.230000")  # trailing zeros are not places
    assert parse_money(D("1.23"), "x").as_tuple().exponent == MONEY_QUANTUM.as_tuple().exponent


@pytest.mark.parametrize(
    ("error", "fields"),
    [
        (InsufficientCredits, ("balance", "available", "held", "required", "shortfall")),
        (SpendingLimitExceeded, ("limit", "spent", "held", "required")),
        (SessionBudgetExceeded, ("budget", "used", "required")),
    ],
)
def test_money_details_from_the_database_become_decimal_attributes(error, fields):
    raised = error("x", **{f: "1.500000" for f in fields}, period="day")
    assert all(getattr(raised, f) == D("1.5") for f in fields)
    assert all(isinstance(getattr(raised, f), Decimal) for f in fields)
    assert all(raised.details[f] == "1.500000" for f in fields)  # as the server sent them
    assert raised.details["period"] == "day"


def test_a_detail_that_does_not_convert_is_no_attribute_and_stays_in_the_details():
    raised = SpendingLimitExceeded("x", limit="lots", message="a detail may be called message")
    assert raised.limit is None
    assert raised.details == {"limit": "lots", "message": "a detail may be called message"}
    assert raised.message == "x"
