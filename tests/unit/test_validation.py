"""Pure input checks: money and identifiers."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest

from keen_stream.dal.models import UserCreate
from keen_stream.dal.validation import MONEY_MAX, build, parse_money, parse_uuid
from keen_stream.errors import InvalidAmount, InvalidIdentifier, InvalidInput


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Decimal("1"), Decimal("1.000000")),
        (Decimal("0.000001"), Decimal("0.000001")),
        (Decimal("2.50"), Decimal("2.500000")),
        ("10.5", Decimal("10.500000")),
        (7, Decimal("7.000000")),
        (Decimal("1.0000000"), Decimal("1.000000")),  # trailing zeros beyond 6 dp are exact
        (MONEY_MAX, MONEY_MAX),
    ],
)
def test_parse_money_accepts_exact_values(value: object, expected: Decimal) -> None:
    got = parse_money(value)
    assert got == expected
    assert got.as_tuple().exponent == -6


@pytest.mark.parametrize(
    "value",
    [
        0.1,  # float: never in a money path
        1.0,
        True,
        Decimal("NaN"),
        Decimal("sNaN"),
        Decimal("Infinity"),
        Decimal("-Infinity"),
        Decimal("0.0000001"),  # 7 dp: refused, never rounded
        Decimal("1.1234565"),
        Decimal("-1"),
        Decimal("0"),
        MONEY_MAX + 1,
        "abc",
        "",
        None,
        [1],
    ],
)
def test_parse_money_refuses_everything_else(value: object) -> None:
    with pytest.raises(InvalidAmount):
        parse_money(value)


def test_parse_money_flags() -> None:
    assert parse_money(Decimal(0), allow_zero=True) == 0
    assert parse_money(Decimal("-2.5"), allow_negative=True) == Decimal("-2.500000")
    with pytest.raises(InvalidAmount, match="cost"):
        parse_money(Decimal("-2.5"), "cost")


def test_invalid_amount_is_a_value_error_with_a_code() -> None:
    with pytest.raises(ValueError) as err:
        parse_money(0.5)
    assert err.value.code == "invalid_amount"  # type: ignore[attr-defined]


def test_parse_uuid() -> None:
    u = uuid.uuid4()
    assert parse_uuid(u) is u
    assert parse_uuid(str(u)) == u
    assert parse_uuid(str(u).upper()) == u
    for bad in ("nope", "", 5, None, b"x", "0" * 65):
        with pytest.raises(InvalidIdentifier):
            parse_uuid(bad)


def test_build_turns_pydantic_errors_into_invalid_input() -> None:
    with pytest.raises(InvalidInput) as err:
        build(UserCreate, email="bad", username="ok_name", password="long enough")
    assert err.value.details["errors"][0]["field"] == "email"
    model = UserCreate(email="a@example.com", username="abc", password="long enough")
    assert build(UserCreate, model) is model
    with pytest.raises(InvalidInput):
        build(UserCreate, "not a model")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value", ["1234567890123456789012345.1234567", Decimal("9" * 40), Decimal("1E+30")]
)
def test_parse_money_refuses_huge_values_with_a_typed_error(value: object) -> None:
    with pytest.raises(InvalidAmount, match="out of range"):
        parse_money(value)
