"""The credit ledger: ``db.credits``, a :class:`CreditManager`.

Every balance change is one call to a SECURITY DEFINER function created by migrations 0002 and
0007 (``keen_credit_deduct``, ``keen_credit_reserve``, ...). Each one validates, authorizes (the
caller's own account, or any account for an admin), checks and updates the balance, and appends
the ledger row, in a single round trip: Python never reads a balance and writes it back. The
price (markup) is the server's; credits are minted only through ``db.billing`` (billing.py).

Money is :class:`decimal.Decimal` end to end. The credit cost of a provider cost is defined once,
by :func:`credits_for` here and ``keen_credits_for`` in SQL (the same rule; unit-tested).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import timedelta
from decimal import ROUND_CEILING, Decimal
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import asyncpg

from keen_stream.dal.batching import Batcher
from keen_stream.dal.database import USER_CALL_ARG
from keen_stream.dal.models.credits import (
    AutoRechargeRequest,
    CreditBalance,
    CreditTransaction,
    CreditValidation,
    Hold,
    LedgerProblem,
    LedgerReport,
    TransactionType,
)
from keen_stream.dal.pgerrors import from_fields, translating
from keen_stream.dal.validation import (
    MONEY_QUANTUM,
    parse_count,
    parse_idempotency_key,
    parse_money,
    parse_session_handle,
    parse_text,
    parse_uuid,
)
from keen_stream.errors import (
    DatabaseError,
    InvalidAmount,
    InvalidInput,
    NotFound,
    TransactionConflict,
)

if TYPE_CHECKING:
    from keen_stream.dal.database import KeenDatabase

#: The longest a hold may live, and the default.
MAX_HOLD_TTL: Final = timedelta(days=1)
DEFAULT_HOLD_TTL: Final = timedelta(minutes=10)
MAX_HISTORY_PAGE: Final = 1000
_TYPES: Final = frozenset(TransactionType.__args__)  # type: ignore[attr-defined]
_UNSET: Any = object()

TX_COLUMNS: Final = (
    "id, user_id, account_id, sequence_number, transaction_type, amount, balance_after, "
    "claude_cost_usd, keen_markup_multiplier, session_id, stripe_payment_intent_id, "
    "description, metadata, is_admin_bypass, idempotency_key, refunded_transaction_id, "
    "hold_id, created_at"
)
TX_NAMES: Final = tuple(column.strip() for column in TX_COLUMNS.split(","))
HOLD_COLUMNS: Final = (
    "id, user_id, account_id, session_id, budget_root_id, status, estimated_claude_cost_usd, "
    "keen_markup_multiplier, estimated_credits, amount, is_admin_bypass, description, "
    "expires_at, idempotency_key, settled_claude_cost_usd, settled_credits, "
    "settled_transaction_id, created_at, resolved_at"
)
# The spend windows (migration 0007): what counts is what the ledger functions count, through
# the same SQL functions (keen_spend_in_window, keen_credit_fits).
_BALANCE_SELECT: Final = """
    SELECT a.user_id, a.id AS account_id, a.current_balance AS current, a.held_amount AS held,
           a.current_balance - a.held_amount AS available, a.lifetime_purchased,
           a.lifetime_spent, a.daily_limit, a.monthly_limit,
           keen_spend_in_window(a.spent_day, a.spend_day_end, now()) AS spent_today,
           keen_spend_in_window(a.spent_month, a.spend_month_end, now()) AS spent_this_month,
           CASE WHEN now() < a.spend_day_end THEN a.spend_day_end END AS daily_window_end,
           CASE WHEN now() < a.spend_month_end THEN a.spend_month_end END
               AS monthly_window_end,
           (now() AT TIME ZONE u.timezone)::date AS today, l.is_admin,
           a.unlimited_credits OR a.bypass_billing OR l.is_admin AS unlimited,
           a.auto_recharge_enabled, a.auto_recharge_threshold, a.auto_recharge_amount,
           a.last_sequence
      FROM credit_accounts a
      JOIN users u ON u.id = a.user_id
     CROSS JOIN LATERAL (SELECT u.is_admin AND u.account_status = 'active' AS is_admin) l
     WHERE a.user_id = $1"""

SQL: Final = {
    # $1 user, $2 claude cost, $3 session row id, $4 session handle, $5 description,
    # $6 idempotency key. Inside a caller's user_transaction (deduct_in).
    "deduct": f"SELECT {TX_COLUMNS} FROM keen_credit_deduct($1, $2, $3, $4, $5, $6)",
    # The public deduction in one round trip (db.user_call): $1 the user (also the acting user),
    # $2 claude cost, $3 session handle, $4 description, $5 idempotency key.
    "deduct_call": f"SELECT {TX_COLUMNS} FROM keen_credit_deduct({USER_CALL_ARG},"
    " $2, NULL, $3, $4, $5)",
    # Many callers' deductions in one statement (migration 0005): $1 users, $2 claude costs,
    # $3 session handles, $4 descriptions, $5 idempotency keys (arrays, same length).
    # One row per item, by ``ord``: its error's fields, or its ledger row.
    "deduct_many": "SELECT ord, error_state, error_message, error_detail, error_constraint, "
    + ", ".join(f"(r.tx).{column}" for column in TX_NAMES)
    + " FROM keen_credit_deduct_many($1, $2, $3, $4, $5) r",
    # $1 user, $2 estimated cost, $3 session row, $4 handle, $5 ttl, $6 description, $7 key.
    "reserve": f"SELECT {HOLD_COLUMNS} FROM keen_credit_reserve($1, $2, $3, $4, $5, $6, $7)",
    "settle": f"SELECT {TX_COLUMNS} FROM keen_credit_settle($1, $2, $3)",
    "release": f"SELECT {HOLD_COLUMNS} FROM keen_credit_release($1)",
    "expire_holds": "SELECT keen_credit_expire_holds($1)",
    "balance": _BALANCE_SELECT,
    # $2 the claude cost; the price is the server's. required is NULL when cost x markup
    # leaves NUMERIC(18,6).
    "validate": f"""
        WITH b AS ({_BALANCE_SELECT}),
        r AS (SELECT b.*, p.markup,
                     CASE WHEN $2 * p.markup <= 999999999999.999999
                          THEN keen_credits_for($2, p.markup) END AS required,
                     b.daily_limit - b.spent_today - b.held AS daily_remaining,
                     b.monthly_limit - b.spent_this_month - b.held AS monthly_remaining
                FROM b, credit_pricing p)
        SELECT r.*, CASE
            WHEN r.unlimited THEN NULL
            WHEN r.available < r.required THEN 'insufficient_credits'
            WHEN NOT keen_credit_fits(r.required, r.current, r.held, r.daily_limit,
                                      r.spent_today, r.daily_window_end, r.monthly_limit,
                                      r.spent_this_month, r.monthly_window_end, now())
                THEN 'spending_limit_exceeded'
        END AS reason
        FROM r""",
    "history": f"""
        SELECT {TX_COLUMNS} FROM credit_transactions
         WHERE account_id = (SELECT id FROM credit_accounts WHERE user_id = $1)
           AND user_id = $1
           AND sequence_number < coalesce($2, 9223372036854775807)
           AND ($3::text[] IS NULL OR transaction_type = ANY($3::text[]))
         ORDER BY sequence_number DESC
         LIMIT $4""",
    "transaction": f"SELECT {TX_COLUMNS} FROM credit_transactions WHERE id = $1 AND user_id = $2",
    "hold": f"SELECT {HOLD_COLUMNS} FROM credit_holds WHERE id = $1 AND user_id = $2",
    "holds": f"""
        SELECT {HOLD_COLUMNS} FROM credit_holds
         WHERE user_id = $1 AND ($2::text IS NULL OR status = $2)
         ORDER BY created_at DESC, id LIMIT $3""",
    # Plain UPDATEs under RLS: keen_app holds UPDATE on exactly these columns. $2/$4 say
    # whether to change the limit (so None can mean "no limit"). No trigger keeps updated_at
    # (0005 dropped it from the hot path): every writer of credit_accounts sets it.
    "set_limits": """
        UPDATE credit_accounts
           SET daily_limit = CASE WHEN $2 THEN $3 ELSE daily_limit END,
               monthly_limit = CASE WHEN $4 THEN $5 ELSE monthly_limit END,
               updated_at = now()
         WHERE user_id = $1 RETURNING id""",
    "set_auto_recharge": """
        UPDATE credit_accounts
           SET auto_recharge_enabled = coalesce($2, auto_recharge_enabled),
               auto_recharge_threshold = coalesce($3, auto_recharge_threshold),
               auto_recharge_amount = coalesce($4, auto_recharge_amount),
               updated_at = now()
         WHERE user_id = $1 RETURNING id""",
    "recharge_requests": """
        SELECT id, user_id, account_id, transaction_id, balance_after, threshold,
               recharge_amount, status, created_at, resolved_at
          FROM credit_auto_recharge_requests
         WHERE user_id = $1 AND ($2::text IS NULL OR status = $2)
         ORDER BY created_at DESC, id LIMIT $3""",
    "verify": "SELECT account_id, user_id, problem, expected, actual FROM keen_ledger_verify()",
    "verify_counts": """
        SELECT (SELECT count(*) FROM credit_accounts) AS accounts,
               (SELECT count(*) FROM credit_transactions) AS transactions,
               (SELECT count(*) FROM credit_holds WHERE status = 'active') AS active_holds""",
}


class _Deduction(NamedTuple):
    """A validated deduction on its way to the database."""

    user_id: uuid.UUID
    cost: Decimal
    handle: str | None
    description: str | None
    key: str | None


def credits_for(claude_cost: Decimal, markup: Decimal) -> Decimal:
    """THE rounding rule: credits = provider cost x markup, rounded up to the micro-credit.

    Rounding up (never half-way, never to zero) means a charge is never below its exact price
    and any non-zero cost costs at least 0.000001 credits. The SQL twin is
    ``keen_credits_for``; the ledger uses only that one, this one mirrors it for tests.
    """
    return (claude_cost * markup).quantize(MONEY_QUANTUM, rounding=ROUND_CEILING)


def _tx(row: asyncpg.Record) -> CreditTransaction:
    return CreditTransaction.model_validate(dict(row))


def _hold(row: asyncpg.Record) -> Hold:
    return Hold.model_validate(dict(row))


def _handle(value: Any) -> str | None:
    return None if value is None else parse_session_handle(value)


class CreditManager:
    """``db.credits``: purchases, deductions, refunds, holds, limits and the ledger's proof.

    Methods run as the account's owner under RLS (``user_transaction(user_id)``) unless an
    ``actor_id`` is given, in which case that user must be an admin (the database decides).
    """

    def __init__(self, db: KeenDatabase) -> None:
        self._db = db
        settings = db.settings
        self._deductions: Batcher[_Deduction, CreditTransaction] | None = None
        if settings.ledger_batch_max > 1:
            self._deductions = Batcher(
                self._deduct_one,
                self._deduct_many,
                max_batch=settings.ledger_batch_max,
                max_in_flight=settings.ledger_max_in_flight,
                conflict_key=lambda d: d.user_id,  # one account per user
            )

    def batch_stats(self) -> dict[str, int]:
        """Deductions sent alone, batches sent and the deductions they held (since start)."""
        b = self._deductions
        if b is None:
            return {"singles": 0, "batches": 0, "batched_items": 0}
        return {"singles": b.singles, "batches": b.batches, "batched_items": b.batched_items}

    async def drain(self) -> None:
        """Wait for the deduction batches in flight (``KeenDatabase.close`` calls it)."""
        if self._deductions is not None:
            await self._deductions.drain()

    # --- deductions --------------------------------------------------------------------------
    async def deduct_in(
        self,
        conn: asyncpg.Connection,
        user_id: uuid.UUID | str,
        claude_cost_usd: Decimal,
        *,
        session_id: uuid.UUID | str | None,
        description: str,
        idempotency_key: str | None = None,
    ) -> CreditTransaction:
        """Charge ``claude_cost_usd`` x markup inside a transaction the caller already holds.

        ``conn`` must be a ``user_transaction`` of ``user_id`` (or of an admin); ``session_id``
        is the session's row id (``AgentSession.id``), or None. Admin and
        unlimited accounts get an ``admin_bypass`` row (amount 0, balance unchanged, cost kept).
        Raises InsufficientCredits, SpendingLimitExceeded, SessionBudgetExceeded, NotFound
        (unknown user or session, or someone else's), IdempotencyConflict or InvalidAmount.
        A raised error leaves ``conn``'s transaction aborted (PostgreSQL's rule); wrap the call
        in a savepoint (``async with conn.transaction():``) to carry on after a refusal.
        """
        uid = parse_uuid(user_id, "user_id")
        session = None if session_id is None else parse_uuid(session_id, "session_id")
        cost = parse_money(claude_cost_usd, "claude_cost_usd")
        text = parse_text(description, "description")
        key = parse_idempotency_key(idempotency_key)
        with translating():
            row = await conn.fetchrow(SQL["deduct"], uid, cost, session, None, text, key)
        return _tx(row)

    async def deduct_credits(
        self,
        user_id: uuid.UUID | str,
        claude_cost_usd: Decimal,
        session_handle: str | None,
        description: str,
        *,
        idempotency_key: str | None = None,
    ) -> CreditTransaction:
        """Charge a model call: ``amount`` = -(cost x markup). See :meth:`deduct_in`.

        ``session_handle`` is the session's handle (``AgentSession.session_handle``), or None.
        One round trip: the function call is the whole (implicit) transaction, acting as
        ``user_id`` (``KeenDatabase.user_call``).
        """
        item = _Deduction(
            parse_uuid(user_id, "user_id"),
            parse_money(claude_cost_usd, "claude_cost_usd"),
            _handle(session_handle),
            parse_text(description, "description"),
            parse_idempotency_key(idempotency_key),
        )
        if self._deductions is None:
            return await self._deduct_one(item)
        return await self._deductions.submit(item)

    async def _deduct_one(self, d: _Deduction) -> CreditTransaction:
        row = await self._db.user_call(
            d.user_id, SQL["deduct_call"], d.cost, d.handle, d.description, d.key
        )
        return _tx(row)

    async def _deduct_many(
        self, items: Sequence[_Deduction]
    ) -> list[CreditTransaction | BaseException]:
        """Callers' deductions that waited for a slot, in one statement and one commit.

        Each item is charged in its own subtransaction, as its own user, by the same
        deduction as a single call; a refused item is its caller's error alone. Items go in
        user order, the order in which every transaction takes account rows (0005 explains the
        lock order); the sort is stable, and two calls can share a batch only if they were
        made concurrently, so nobody's sequence of calls is reordered.
        """
        order = sorted(range(len(items)), key=lambda i: items[i].user_id)
        ordered = [items[i] for i in order]
        try:
            rows = await self._db.system_call(
                SQL["deduct_many"],
                [d.user_id for d in ordered],
                [d.cost for d in ordered],
                [d.handle for d in ordered],
                [d.description for d in ordered],
                [d.key for d in ordered],
            )
        except TransactionConflict:
            # The batch lost a lock race outside any item (its key and budget pre-locks, e.g.
            # against keen_credit_expire_holds giving budgets back in another order): the
            # statement wrote nothing, and alone each call would have waited and gone on.
            return [await self._outcome_alone(d) for d in items]
        outcomes: list[CreditTransaction | BaseException] = [
            DatabaseError("ledger: the batch returned no row for this deduction")
        ] * len(items)
        for row in rows:
            at = order[row["ord"] - 1]
            if row["error_state"] is None:
                outcomes[at] = CreditTransaction.model_validate({k: row[k] for k in TX_NAMES})
                continue
            error = from_fields(
                row["error_state"],
                row["error_message"],
                row["error_detail"],
                row["error_constraint"],
            )
            if isinstance(error, TransactionConflict):
                # Lost a lock race with another kind of transaction (a session ending, say):
                # only this item was undone; it runs again on its own.
                outcomes[at] = await self._outcome_alone(items[at])
            else:
                outcomes[at] = error
        return outcomes

    async def _outcome_alone(self, d: _Deduction) -> CreditTransaction | BaseException:
        try:
            return await self._deduct_one(d)
        except Exception as exc:
            return exc

    # --- holds -------------------------------------------------------------------------------
    async def reserve(
        self,
        user_id: uuid.UUID | str,
        claude_cost_usd: Decimal,
        *,
        session_handle: str | None = None,
        ttl: timedelta = DEFAULT_HOLD_TTL,
        description: str = "model call",
        idempotency_key: str | None = None,
    ) -> Hold:
        """Reserve the estimated ``claude_cost_usd`` x markup from the available balance until
        settled or released.

        Checked like a deduction (balance, spending limits, session budget); active holds count
        as spent for the limits. Expires after ``ttl`` (at most a day) unless settled first.
        """
        uid = parse_uuid(user_id, "user_id")
        cost = parse_money(claude_cost_usd, "claude_cost_usd")
        handle = _handle(session_handle)
        if not isinstance(ttl, timedelta) or not timedelta(0) < ttl <= MAX_HOLD_TTL:
            raise InvalidInput("ttl must be a timedelta between 0 and 1 day", field="ttl")
        text = parse_text(description, "description")
        key = parse_idempotency_key(idempotency_key)
        async with self._db.user_transaction(uid) as conn:
            row = await conn.fetchrow(SQL["reserve"], uid, cost, None, handle, ttl, text, key)
        return _hold(row)

    async def settle(
        self,
        hold: Hold | uuid.UUID | str,
        claude_cost_usd: Decimal,
        *,
        description: str | None = None,
        actor_id: uuid.UUID | str | None = None,
    ) -> CreditTransaction:
        """Charge the actual ``claude_cost_usd`` and free the rest of the hold.

        Idempotent: settling again with the same cost returns the same transaction (another
        cost raises IdempotencyConflict). Up to the reserved credits it always succeeds. Above
        them the excess must fit like a deduction (balance, limits, budget); if it does not, the
        error leaves the hold active and nothing is charged. A hold past its expiry raises
        HoldNotActive (the sweep frees it).
        """
        hold_id, actor = _hold_actor(hold, actor_id)
        cost = parse_money(claude_cost_usd, "claude_cost_usd")
        text = parse_text(description, "description", required=False)
        async with self._db.user_transaction(actor) as conn:
            row = await conn.fetchrow(SQL["settle"], hold_id, cost, text)
        return _tx(row)

    async def release(
        self, hold: Hold | uuid.UUID | str, *, actor_id: uuid.UUID | str | None = None
    ) -> Hold:
        """Free an active hold. Idempotent; releasing a settled hold raises HoldNotActive."""
        hold_id, actor = _hold_actor(hold, actor_id)
        async with self._db.user_transaction(actor) as conn:
            row = await conn.fetchrow(SQL["release"], hold_id)
        return _hold(row)

    async def expire_holds(self, *, limit: int = 1000) -> int:
        """The sweep: expire up to ``limit`` holds past their ``expires_at``; returns how many.

        A maintenance job (system transaction). Run it every few seconds to a minute; until it
        runs, an expired hold still counts against the available balance.
        """
        limit = parse_count(limit, "limit", 100_000, minimum=1)
        async with self._db.system_transaction() as conn:
            return int(await conn.fetchval(SQL["expire_holds"], limit))

    async def get_hold(
        self,
        user_id: uuid.UUID | str,
        hold_id: uuid.UUID | str,
        *,
        actor_id: uuid.UUID | str | None = None,
    ) -> Hold:
        uid = parse_uuid(user_id, "user_id")
        hid = parse_uuid(hold_id, "hold_id")
        async with self._db.user_transaction(actor_id or uid) as conn:
            row = await conn.fetchrow(SQL["hold"], hid, uid)
        if row is None:
            raise NotFound("no such hold")
        return _hold(row)

    async def list_holds(
        self,
        user_id: uuid.UUID | str,
        *,
        status: str | None = None,
        limit: int = 100,
        actor_id: uuid.UUID | str | None = None,
    ) -> list[Hold]:
        uid = parse_uuid(user_id, "user_id")
        if status is not None and status not in ("active", "settled", "released", "expired"):
            raise InvalidInput(f"unknown hold status {status!r}", field="status")
        async with self._db.user_transaction(actor_id or uid) as conn:
            rows = await conn.fetch(SQL["holds"], uid, status, _page(limit))
        return [_hold(r) for r in rows]

    # --- reading -----------------------------------------------------------------------------
    async def get_balance(
        self, user_id: uuid.UUID | str, *, actor_id: uuid.UUID | str | None = None
    ) -> CreditBalance:
        uid = parse_uuid(user_id, "user_id")
        async with self._db.user_transaction(actor_id or uid) as conn:
            return await self._balance(conn, uid)

    async def _balance(self, conn: asyncpg.Connection, uid: uuid.UUID) -> CreditBalance:
        row = await conn.fetchrow(SQL["balance"], uid)
        if row is None:
            raise NotFound("no credit account for this user")
        return CreditBalance.model_validate(dict(row))

    async def validate_sufficient_credits(
        self,
        user_id: uuid.UUID | str,
        claude_cost_usd: Decimal,
        *,
        actor_id: uuid.UUID | str | None = None,
    ) -> CreditValidation:
        """Would a call costing ``claude_cost_usd`` be charged right now? (Read-only.)

        Counts active holds and the spending limits. Only advice: the deduction itself checks
        again, atomically.
        """
        uid = parse_uuid(user_id, "user_id")
        cost = parse_money(claude_cost_usd, "claude_cost_usd")
        async with self._db.user_transaction(actor_id or uid) as conn:
            row = await conn.fetchrow(SQL["validate"], uid, cost)
        if row is None:
            raise NotFound("no credit account for this user")
        if row["required"] is None:
            raise InvalidAmount("claude_cost_usd x markup is out of range", field="claude_cost_usd")
        unlimited = row["unlimited"]
        shortfall = Decimal(0) if unlimited else max(Decimal(0), row["required"] - row["available"])
        return CreditValidation(
            sufficient=row["reason"] is None,
            current_balance=row["current"],
            available_balance=row["available"],
            required=row["required"],
            shortfall=shortfall.quantize(MONEY_QUANTUM),
            claude_cost_usd=cost,
            markup_multiplier=row["markup"],
            is_admin=row["is_admin"],
            unlimited=unlimited,
            daily_remaining=None if unlimited else _nonnegative(row["daily_remaining"]),
            monthly_remaining=None if unlimited else _nonnegative(row["monthly_remaining"]),
            reason=row["reason"],
        )

    async def get_transaction_history(
        self,
        user_id: uuid.UUID | str,
        *,
        limit: int = 50,
        before: int | None = None,
        types: Iterable[str] | None = None,
        actor_id: uuid.UUID | str | None = None,
    ) -> list[CreditTransaction]:
        """Newest first. Keyset pagination: pass the last row's ``sequence_number`` as
        ``before`` to get the next page."""
        uid = parse_uuid(user_id, "user_id")
        if before is not None and (
            not isinstance(before, int) or isinstance(before, bool) or before < 1
        ):
            raise InvalidInput("before must be a positive sequence number", field="before")
        wanted: list[str] | None = None
        if types is not None:
            wanted = list(types) if not isinstance(types, str) else [types]
            unknown = [t for t in wanted if t not in _TYPES]
            if unknown or not wanted:
                raise InvalidInput(f"unknown transaction types {unknown}", field="types")
        async with self._db.user_transaction(actor_id or uid) as conn:
            rows = await conn.fetch(SQL["history"], uid, before, wanted, _page(limit))
        return [_tx(r) for r in rows]

    async def get_transaction(
        self,
        user_id: uuid.UUID | str,
        transaction_id: uuid.UUID | str,
        *,
        actor_id: uuid.UUID | str | None = None,
    ) -> CreditTransaction:
        uid = parse_uuid(user_id, "user_id")
        tid = parse_uuid(transaction_id, "transaction_id")
        async with self._db.user_transaction(actor_id or uid) as conn:
            row = await conn.fetchrow(SQL["transaction"], tid, uid)
        if row is None:
            raise NotFound("no such transaction")
        return _tx(row)

    # --- spending controls -------------------------------------------------------------------
    async def set_spending_limits(
        self,
        user_id: uuid.UUID | str,
        *,
        daily_limit: Decimal | None = _UNSET,
        monthly_limit: Decimal | None = _UNSET,
        actor_id: uuid.UUID | str | None = None,
    ) -> CreditBalance:
        """Set (a Decimal) or clear (None) the daily / monthly limit; omitted ones stay.

        Days and months are those of the user's time zone; holds count as spent.
        """
        uid = parse_uuid(user_id, "user_id")
        change_daily = daily_limit is not _UNSET
        change_monthly = monthly_limit is not _UNSET
        daily = _limit(daily_limit, "daily_limit") if change_daily else None
        monthly = _limit(monthly_limit, "monthly_limit") if change_monthly else None
        async with self._db.user_transaction(actor_id or uid) as conn:
            found = await conn.fetchval(
                SQL["set_limits"], uid, change_daily, daily, change_monthly, monthly
            )
            if found is None:
                raise NotFound("no credit account for this user")
            return await self._balance(conn, uid)

    async def set_auto_recharge(
        self,
        user_id: uuid.UUID | str,
        *,
        enabled: bool | None = None,
        threshold: Decimal | None = None,
        amount: Decimal | None = None,
        actor_id: uuid.UUID | str | None = None,
    ) -> CreditBalance:
        """Change the auto-recharge settings (None leaves a setting as it is)."""
        uid = parse_uuid(user_id, "user_id")
        if enabled is not None and not isinstance(enabled, bool):
            raise InvalidInput("enabled must be a bool", field="enabled")
        limit = None if threshold is None else parse_money(threshold, "threshold", allow_zero=True)
        value = None if amount is None else parse_money(amount, "amount")
        async with self._db.user_transaction(actor_id or uid) as conn:
            found = await conn.fetchval(SQL["set_auto_recharge"], uid, enabled, limit, value)
            if found is None:
                raise NotFound("no credit account for this user")
            return await self._balance(conn, uid)

    async def list_auto_recharge_requests(
        self,
        user_id: uuid.UUID | str,
        *,
        status: str | None = None,
        limit: int = 100,
        actor_id: uuid.UUID | str | None = None,
    ) -> list[AutoRechargeRequest]:
        uid = parse_uuid(user_id, "user_id")
        if status is not None and status not in ("requested", "fulfilled", "failed", "cancelled"):
            raise InvalidInput(f"unknown request status {status!r}", field="status")
        async with self._db.user_transaction(actor_id or uid) as conn:
            rows = await conn.fetch(SQL["recharge_requests"], uid, status, _page(limit))
        return [AutoRechargeRequest.model_validate(dict(r)) for r in rows]

    # --- proof -------------------------------------------------------------------------------
    async def verify_ledger(self) -> LedgerReport:
        """Check every account (``keen-stream ledger verify``): balance == sum of its ledger,
        sequence contiguous, balance_after chains, lifetime totals and held amounts match,
        refunds within their charges. A maintenance read (system transaction)."""
        async with self._db.system_transaction() as conn:
            counts = await conn.fetchrow(SQL["verify_counts"])
            rows = await conn.fetch(SQL["verify"])
        return LedgerReport(
            accounts=counts["accounts"],
            transactions=counts["transactions"],
            active_holds=counts["active_holds"],
            problems=[LedgerProblem.model_validate(dict(r)) for r in rows],
        )


def _hold_actor(
    hold: Hold | uuid.UUID | str, actor_id: uuid.UUID | str | None
) -> tuple[uuid.UUID, uuid.UUID]:
    """The hold's id and who acts on it: the given actor, else the hold's owner."""
    if isinstance(hold, Hold):
        return hold.id, parse_uuid(actor_id, "actor_id") if actor_id else hold.user_id
    hold_id = parse_uuid(hold, "hold_id")
    if actor_id is None:
        raise InvalidInput("pass the Hold itself, or actor_id with a hold id", field="actor_id")
    return hold_id, parse_uuid(actor_id, "actor_id")


def _page(limit: Any) -> int:
    return parse_count(limit, "limit", MAX_HISTORY_PAGE, minimum=1)


def _limit(value: Any, what: str) -> Decimal | None:
    """A spending limit: None clears it; zero or negative is not a limit."""
    return None if value is None else parse_money(value, what)


def _nonnegative(value: Decimal | None) -> Decimal | None:
    return None if value is None else max(value, Decimal(0))
