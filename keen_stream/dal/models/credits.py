"""The credit ledger: transactions, holds, balances, validation results, verify reports.

Every money field is a :class:`decimal.Decimal` (NUMERIC(18,6) in the database).
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

TransactionType = Literal["purchase", "usage", "refund", "adjustment", "admin_bypass"]
HoldStatus = Literal["active", "settled", "released", "expired"]
AutoRechargeStatus = Literal["requested", "fulfilled", "failed", "cancelled"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CreditTransaction(_Model):
    """One row of the append-only ledger: exactly one per balance change."""

    id: uuid.UUID
    user_id: uuid.UUID
    account_id: uuid.UUID
    sequence_number: int
    transaction_type: TransactionType
    #: Signed: purchases and refunds are positive, usage negative, admin_bypass zero.
    amount: Decimal
    balance_after: Decimal
    claude_cost_usd: Decimal | None
    keen_markup_multiplier: Decimal | None
    #: The agent_sessions row id (not the session handle).
    session_id: uuid.UUID | None
    stripe_payment_intent_id: str | None
    description: str
    metadata: dict[str, Any]
    is_admin_bypass: bool
    idempotency_key: str | None
    refunded_transaction_id: uuid.UUID | None
    hold_id: uuid.UUID | None
    created_at: datetime


class Hold(_Model):
    """Credits reserved for a model call in flight; settled, released or expired exactly once."""

    id: uuid.UUID
    user_id: uuid.UUID
    account_id: uuid.UUID
    session_id: uuid.UUID | None
    budget_root_id: uuid.UUID | None
    status: HoldStatus
    estimated_claude_cost_usd: Decimal
    keen_markup_multiplier: Decimal
    estimated_credits: Decimal
    #: What the hold takes from the available balance (0 for admin / unlimited accounts).
    amount: Decimal
    is_admin_bypass: bool
    description: str
    expires_at: datetime
    idempotency_key: str | None
    settled_claude_cost_usd: Decimal | None
    settled_credits: Decimal | None
    settled_transaction_id: uuid.UUID | None
    created_at: datetime
    resolved_at: datetime | None


class CreditBalance(_Model):
    """An account's state; ``available`` = ``current`` minus active holds."""

    user_id: uuid.UUID
    account_id: uuid.UUID
    current: Decimal
    held: Decimal
    available: Decimal
    lifetime_purchased: Decimal
    lifetime_spent: Decimal
    daily_limit: Decimal | None
    monthly_limit: Decimal | None
    #: Spent in the current daily / monthly window: it ends at the user's local midnight
    #: (first of the month), or later after a change of time zone (docs/ledger.md).
    spent_today: Decimal
    spent_this_month: Decimal
    #: When the open windows end (None: no window open, nothing counts yet).
    daily_window_end: datetime | None
    monthly_window_end: datetime | None
    #: The user's local date.
    today: date
    unlimited: bool
    is_admin: bool
    auto_recharge_enabled: bool
    auto_recharge_threshold: Decimal | None
    auto_recharge_amount: Decimal | None
    last_sequence: int


class CreditValidation(_Model):
    """Would a call costing ``claude_cost_usd`` fit right now? (The seed's shape, plus holds
    and limits.)"""

    sufficient: bool
    current_balance: Decimal
    available_balance: Decimal
    required: Decimal
    shortfall: Decimal
    claude_cost_usd: Decimal
    markup_multiplier: Decimal
    is_admin: bool
    unlimited: bool
    #: Headroom left under each limit (None: no limit), holds counted as spent.
    daily_remaining: Decimal | None
    monthly_remaining: Decimal | None
    #: Why it does not fit: None, "insufficient_credits" or "spending_limit_exceeded".
    reason: str | None


class AutoRechargeRequest(_Model):
    """One "auto-recharge requested" event: the balance crossed below the threshold."""

    id: uuid.UUID
    user_id: uuid.UUID
    account_id: uuid.UUID
    transaction_id: uuid.UUID
    balance_after: Decimal
    threshold: Decimal
    recharge_amount: Decimal | None
    status: AutoRechargeStatus
    created_at: datetime
    resolved_at: datetime | None


class LedgerProblem(_Model):
    """One failed check of ``keen-stream ledger verify``."""

    account_id: uuid.UUID
    user_id: uuid.UUID
    problem: str
    expected: str | None
    actual: str | None


class LedgerReport(_Model):
    """The result of verifying every account."""

    accounts: int
    transactions: int
    active_holds: int
    problems: list[LedgerProblem]

    @property
    def ok(self) -> bool:
        return not self.problems
