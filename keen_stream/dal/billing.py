"""``db.billing``: the money that is not a charge — purchases, refunds, adjustments, the price.

Tenant code cannot mint credits or choose what a charge costs: the functions behind these
methods (migration 0007) are executable only by the role ``keen_billing``, which the DAL takes
only in :meth:`KeenDatabase.billing_transaction`. This is the entry point of code the
deployment trusts with money: the payment webhook (after checking the provider's signature) and
admin tools. An acting admin (``actor_id``) is checked by the database and
recorded on the ledger row; adjustments and price changes require one. docs/ledger.md has the
model.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import TYPE_CHECKING, Final

from keen_stream.dal.credits import TX_COLUMNS, _tx
from keen_stream.dal.models.credits import CreditTransaction
from keen_stream.dal.validation import (
    parse_idempotency_key,
    parse_markup,
    parse_money,
    parse_text,
    parse_uuid,
)

if TYPE_CHECKING:
    from keen_stream.dal.database import KeenDatabase

SQL: Final = {
    # $1 user, $2 amount, $3 description, $4 stripe payment intent, $5 idempotency key.
    "purchase": f"SELECT {TX_COLUMNS} FROM keen_credit_purchase($1, $2, $3, $4, $5)",
    # $1 user, $2 transaction, $3 amount (NULL: all that is left), $4 reason, $5 key.
    "refund": f"SELECT {TX_COLUMNS} FROM keen_credit_refund($1, $2, $3, $4, $5)",
    # $1 user, $2 signed amount, $3 reason, $4 key; the acting admin is the context's user.
    "adjust": f"SELECT {TX_COLUMNS} FROM keen_credit_adjust($1, $2, $3, $4)",
    # $1 markup, $2 reason; audited by the trigger on credit_pricing.
    "set_markup": "SELECT markup FROM keen_credit_set_markup($1, $2)",
    "markup": "SELECT markup FROM credit_pricing",
}


class BillingDAO:
    """``db.billing``: every way credits enter an account other than a hold's release."""

    def __init__(self, db: KeenDatabase) -> None:
        self._db = db

    async def purchase(
        self,
        user_id: uuid.UUID | str,
        amount: Decimal,
        *,
        description: str,
        stripe_payment_intent_id: str | None = None,
        idempotency_key: str | None = None,
        actor_id: uuid.UUID | str | None = None,
    ) -> CreditTransaction:
        """Record a paid purchase of ``amount`` credits (raises ``lifetime_purchased``).

        A Stripe payment intent is credited at most once, to one account (a second use raises
        Conflict). ``actor_id``: an admin recording it by hand (recorded on the row).
        """
        uid = parse_uuid(user_id, "user_id")
        value = parse_money(amount, "amount")
        text = parse_text(description, "description")
        stripe = parse_text(
            stripe_payment_intent_id, "stripe_payment_intent_id", max_length=255, required=False
        )
        key = parse_idempotency_key(idempotency_key)
        async with self._db.billing_transaction(actor_id) as conn:
            row = await conn.fetchrow(SQL["purchase"], uid, value, text, stripe, key)
        return _tx(row)

    async def refund(
        self,
        user_id: uuid.UUID | str,
        transaction_id: uuid.UUID | str,
        *,
        amount: Decimal | None = None,
        reason: str,
        idempotency_key: str | None = None,
        actor_id: uuid.UUID | str | None = None,
    ) -> CreditTransaction:
        """Give back (part of) a usage charge; never more than it charged, over all refunds.

        ``amount=None`` refunds whatever is left. Refunds also give credits back to the session
        budget the charge used; they do not restore spending-limit headroom.
        """
        uid = parse_uuid(user_id, "user_id")
        tid = parse_uuid(transaction_id, "transaction_id")
        value = None if amount is None else parse_money(amount, "amount")
        text = parse_text(reason, "reason")
        key = parse_idempotency_key(idempotency_key)
        async with self._db.billing_transaction(actor_id) as conn:
            row = await conn.fetchrow(SQL["refund"], uid, tid, value, text, key)
        return _tx(row)

    async def adjust(
        self,
        user_id: uuid.UUID | str,
        amount: Decimal,
        *,
        reason: str,
        actor_id: uuid.UUID | str,
        idempotency_key: str | None = None,
    ) -> CreditTransaction:
        """An admin's (``actor_id``) signed correction of ``user_id``'s balance (cannot eat
        held credits)."""
        uid = parse_uuid(user_id, "user_id")
        value = parse_money(amount, "amount", allow_negative=True)
        text = parse_text(reason, "reason")
        key = parse_idempotency_key(idempotency_key)
        async with self._db.billing_transaction(actor_id) as conn:
            row = await conn.fetchrow(SQL["adjust"], uid, value, text, key)
        return _tx(row)

    async def get_markup(self) -> Decimal:
        """Credits charged per dollar of provider cost, as the ledger applies it now."""
        async with self._db.anonymous_transaction() as conn:
            markup: Decimal = await conn.fetchval(SQL["markup"])
        return markup

    async def set_markup(
        self, markup: Decimal, *, reason: str, actor_id: uuid.UUID | str
    ) -> Decimal:
        """Change the price from the next charge or hold on (a hold keeps its own).

        An admin (``actor_id``) only; every change is in ``audit_log`` (old and new markup, the
        reason, the admin, the role).
        """
        value = parse_markup(markup)
        text = parse_text(reason, "reason")
        async with self._db.billing_transaction(actor_id) as conn:
            changed: Decimal = await conn.fetchval(SQL["set_markup"], value, text)
        return changed
