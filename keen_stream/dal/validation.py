"""Pure input checks shared by the DAOs: identifiers, counts, text, addresses, money.

Every check raises a typed :class:`~keen_stream.errors.InvalidInput` naming the argument
(``field``). No database here.
"""

from __future__ import annotations

import re
import uuid
from decimal import Decimal, InvalidOperation
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Final, TypeVar

from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from keen_stream.errors import InvalidAmount, InvalidIdentifier, InvalidInput

M = TypeVar("M", bound=BaseModel)

#: Money has six decimal places everywhere (NUMERIC(18,6)).
MONEY_PLACES = 6
MONEY_QUANTUM = Decimal(1).scaleb(-MONEY_PLACES)
#: The largest value NUMERIC(18,6) holds.
MONEY_MAX = Decimal("999999999999.999999")
#: A markup (credits per dollar of provider cost) is NUMERIC(4,2): 0.01 to 99.99.
MARKUP_QUANTUM = Decimal("0.01")


def parse_uuid(value: Any, what: str = "id") -> uuid.UUID:
    """A UUID from a UUID or its string form; anything else is :class:`InvalidIdentifier`."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str) and len(value) <= 64:
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise InvalidIdentifier(f"{what} is not a valid UUID", field=what)


#: A session handle: the agent core's own string id for a session (``session_handle``).
SESSION_HANDLE_PATTERN: Final = r"^[A-Za-z0-9_.:-]{1,64}$"
_SESSION_HANDLE: Final = re.compile(SESSION_HANDLE_PATTERN)


def parse_session_handle(value: Any, what: str = "session_handle") -> str:
    """A session handle, or :class:`InvalidIdentifier`."""
    if isinstance(value, str) and _SESSION_HANDLE.fullmatch(value):
        return value
    raise InvalidIdentifier(f"{what} must match {SESSION_HANDLE_PATTERN}", field=what)


def parse_count(value: Any, what: str, maximum: int, *, minimum: int = 0) -> int:
    """An int from ``minimum`` to ``maximum`` (a bool is not a count), or InvalidInput."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be an integer", field=what)
    if not minimum <= value <= maximum:
        raise InvalidInput(f"{what} must be between {minimum} and {maximum}", field=what)
    return value


def storable(value: str) -> bool:
    """Whether PostgreSQL text can hold ``value``: no NUL, and only encodable characters (a
    lone surrogate, which JSON can carry, is not). Checked per call, before the driver: in a
    batched deduction one caller's unsendable string would otherwise fail every item's bind."""
    if "\x00" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_text(
    value: Any, what: str, *, max_length: int = 1000, required: bool = True
) -> str | None:
    """Text PostgreSQL can store, at most ``max_length`` characters; None only if not
    ``required``; a required one must not be blank."""
    if value is None and not required:
        return None
    if (
        not isinstance(value, str)
        or len(value) > max_length
        or (required and not value.strip())
        or not storable(value)
    ):
        raise InvalidInput(
            f"{what} must be a non-empty string of at most {max_length} characters", field=what
        )
    return value


def parse_idempotency_key(value: Any) -> str | None:
    """An idempotency key (1 to 255 storable characters), or None."""
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 255 or not storable(value):
        raise InvalidInput(
            "idempotency_key must be a string of 1 to 255 characters", field="idempotency_key"
        )
    return value


def parse_ip(value: IPv4Address | IPv6Address | str | None, what: str = "ip") -> str | None:
    """An IP address in its canonical text form, or None."""
    if value is None:
        return None
    try:
        return str(ip_address(str(value)))
    except ValueError:
        raise InvalidInput("invalid IP address", field=what) from None


def parse_money(
    value: Any, what: str = "amount", *, allow_zero: bool = False, allow_negative: bool = False
) -> Decimal:
    """A Decimal money amount, or :class:`InvalidAmount`.

    Floats are refused outright: ``0.1`` is not one tenth, and a float anywhere in a money path is
    a bug. Strings and ints are accepted and converted exactly. NaN, infinities, more than six
    decimal places and values outside NUMERIC(18,6) are refused, never rounded.
    """
    if isinstance(value, bool | float):
        raise InvalidAmount(f"{what} must be a Decimal, not {type(value).__name__}", field=what)
    if isinstance(value, int | str):
        try:
            value = Decimal(value)
        except InvalidOperation:
            raise InvalidAmount(f"{what} is not a number", field=what) from None
    if not isinstance(value, Decimal):
        raise InvalidAmount(f"{what} must be a Decimal", field=what)
    if not value.is_finite():
        raise InvalidAmount(f"{what} must be finite", field=what)
    # Before any arithmetic: a value with more digits than the decimal context holds would make
    # quantize() raise decimal.InvalidOperation instead of a typed error.
    if value and value.adjusted() > MONEY_MAX.adjusted():
        raise InvalidAmount(f"{what} is out of range", field=what)
    exponent = value.as_tuple().exponent
    if (
        isinstance(exponent, int)
        and exponent < -MONEY_PLACES
        and value != value.quantize(MONEY_QUANTUM)
    ):
        raise InvalidAmount(f"{what} has more than {MONEY_PLACES} decimal places", field=what)
    if value < 0 and not allow_negative:
        raise InvalidAmount(f"{what} must not be negative", field=what)
    if value == 0 and not allow_zero:
        raise InvalidAmount(f"{what} must not be zero", field=what)
    if abs(value) > MONEY_MAX:
        raise InvalidAmount(f"{what} is out of range", field=what)
    return value.quantize(MONEY_QUANTUM)


def parse_markup(value: Any) -> Decimal:
    """A markup as the ledger stores it (0.01 to 99.99, in hundredths), or InvalidAmount."""
    markup = parse_money(value, "markup")
    if markup >= 100 or markup != markup.quantize(MARKUP_QUANTUM):
        raise InvalidAmount("markup must be between 0.01 and 99.99, in hundredths", field="markup")
    return markup.quantize(MARKUP_QUANTUM)


def build(model: type[M], data: M | None = None, **fields: Any) -> M:
    """``data`` if given, else ``model(**fields)``; pydantic's errors become InvalidInput."""
    if data is not None:
        if fields:
            raise InvalidInput(f"pass a {model.__name__} or its fields, not both")
        if not isinstance(data, model):
            raise InvalidInput(f"expected {model.__name__}, got {type(data).__name__}")
        return data
    try:
        return model(**fields)
    except PydanticValidationError as exc:
        problems = [
            {"field": ".".join(str(p) for p in err["loc"]), "error": err["msg"]}
            for err in exc.errors(include_url=False, include_input=False)
        ]
        summary = "; ".join(f"{p['field']}: {p['error']}" for p in problems)
        raise InvalidInput(f"invalid {model.__name__}: {summary}", errors=problems) from None
