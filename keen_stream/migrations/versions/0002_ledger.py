"""Credit ledger: server-side money functions, holds, sequence chain, idempotency, limits.

Revision ID: 0002_ledger
Revises: 0001_foundation
Create Date: 2026-11-25

Every balance change happens inside one of the SECURITY DEFINER functions below (owned by
keen_system): keen_app may read its own account and ledger, never write them. Each function takes
the acting user from ``keen_current_user_id()`` / ``keen_is_admin()`` and re-checks that the
target account is the caller's own (or that the caller is an admin). docs/ledger.md explains the
design; docs/schema.md lists the deviations from the seed.

Lock order, everywhere: hold row -> root session row (only when it has a budget) -> account row.
"""

from alembic import op

revision = "0002_ledger"
down_revision = "0001_foundation"
branch_labels = None
depends_on = None

# --- columns and tables ------------------------------------------------------------------
TABLES = [
    # Per-account counters that the money functions keep in the same UPDATE as the balance:
    # held_amount (credits reserved by active holds), last_sequence (the ledger's chain), and the
    # spend of the current day/month in the user's time zone (for the spending limits).
    "ALTER TABLE credit_accounts"
    " ADD COLUMN held_amount NUMERIC(18,6) NOT NULL DEFAULT 0,"
    " ADD COLUMN last_sequence BIGINT NOT NULL DEFAULT 0,"
    " ADD COLUMN spend_day DATE,"
    " ADD COLUMN spent_day NUMERIC(18,6) NOT NULL DEFAULT 0,"
    " ADD COLUMN spend_month DATE,"
    " ADD COLUMN spent_month NUMERIC(18,6) NOT NULL DEFAULT 0",
    """
    CREATE TABLE credit_holds (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        account_id UUID NOT NULL REFERENCES credit_accounts(id) ON DELETE CASCADE,
        session_id UUID REFERENCES agent_sessions(id),
        -- The root whose budget this hold took credits from (NULL: no budget was involved).
        budget_root_id UUID REFERENCES agent_sessions(id),
        status VARCHAR(10) NOT NULL DEFAULT 'active',
        estimated_claude_cost_usd NUMERIC(18,6) NOT NULL,
        keen_markup_multiplier NUMERIC(4,2) NOT NULL,
        -- cost x markup, rounded by keen_credits_for: what the budget was charged.
        estimated_credits NUMERIC(18,6) NOT NULL,
        -- What the hold takes from the available balance: estimated_credits, or 0 on bypass.
        amount NUMERIC(18,6) NOT NULL,
        is_admin_bypass BOOLEAN NOT NULL DEFAULT FALSE,
        description TEXT NOT NULL,
        expires_at TIMESTAMP WITH TIME ZONE NOT NULL,
        idempotency_key VARCHAR(255),
        idempotency_fingerprint TEXT,
        settled_claude_cost_usd NUMERIC(18,6),
        settled_credits NUMERIC(18,6),
        settled_transaction_id UUID,
        created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
        resolved_at TIMESTAMP WITH TIME ZONE,
        CONSTRAINT credit_holds_status_check
            CHECK (status IN ('active', 'settled', 'released', 'expired')),
        CONSTRAINT credit_holds_amounts_check
            CHECK (estimated_claude_cost_usd > 0 AND estimated_credits > 0
                   AND amount = CASE WHEN is_admin_bypass THEN 0 ELSE estimated_credits END),
        CONSTRAINT credit_holds_markup_check CHECK (keen_markup_multiplier > 0),
        CONSTRAINT credit_holds_resolved_check
            CHECK ((status = 'active') = (resolved_at IS NULL)),
        CONSTRAINT credit_holds_settled_check
            CHECK ((status = 'settled') = (settled_transaction_id IS NOT NULL)),
        CONSTRAINT credit_holds_description_length CHECK (length(description) <= 1000)
    )
    """,
    "CREATE INDEX idx_credit_holds_user_id ON credit_holds(user_id)",
    "CREATE INDEX idx_credit_holds_active ON credit_holds(account_id) WHERE status = 'active'",
    "CREATE INDEX idx_credit_holds_expiry ON credit_holds(expires_at) WHERE status = 'active'",
    "CREATE UNIQUE INDEX idx_credit_holds_idempotency ON credit_holds(account_id, idempotency_key)"
    " WHERE idempotency_key IS NOT NULL",
    # The chain: every row has the next number of its account; (account_id, sequence_number) is
    # unique and replaces the seed's plain account_id index.
    "ALTER TABLE credit_transactions"
    " ADD COLUMN sequence_number BIGINT,"
    " ADD COLUMN idempotency_key VARCHAR(255),"
    " ADD COLUMN idempotency_fingerprint TEXT,"
    " ADD COLUMN refunded_transaction_id UUID REFERENCES credit_transactions(id),"
    " ADD COLUMN hold_id UUID REFERENCES credit_holds(id)",
    # Nothing writes the ledger before this revision, but number any rows a hand-made database
    # may hold so the NOT NULL below cannot fail. The append-only trigger is paused for it.
    "ALTER TABLE credit_transactions DISABLE TRIGGER credit_transactions_append_only",
    """
    UPDATE credit_transactions t SET sequence_number = n.seq
      FROM (SELECT id, row_number() OVER (PARTITION BY account_id ORDER BY created_at, id) AS seq
              FROM credit_transactions) n
     WHERE n.id = t.id
    """,
    "ALTER TABLE credit_transactions ENABLE TRIGGER credit_transactions_append_only",
    """
    UPDATE credit_accounts a SET last_sequence = coalesce(
        (SELECT max(sequence_number) FROM credit_transactions t WHERE t.account_id = a.id), 0)
    """,
    "ALTER TABLE credit_transactions ALTER COLUMN sequence_number SET NOT NULL",
    "DROP INDEX idx_credit_transactions_account_id",
    # Every index and foreign key is paid on each deduction (docs/performance.md). user_id is
    # implied by account_id (one account per user, both set by the ledger functions and checked
    # by `ledger verify`), and deleting a user still cascades through credit_accounts; per-user
    # reads go through (account_id, sequence_number). Session charges get a partial index, and
    # created_at (append order) a BRIN index for the analytics' time ranges. Nothing looks rows
    # up by is_admin_bypass (the analytics filter it inside a time range), so it has no index.
    "ALTER TABLE credit_transactions DROP CONSTRAINT credit_transactions_user_id_fkey",
    "DROP INDEX idx_credit_transactions_user_id",
    "DROP INDEX idx_credit_transactions_admin_bypass",
    "DROP INDEX idx_credit_transactions_session_id",
    "DROP INDEX idx_credit_transactions_created_at",
    "CREATE INDEX idx_credit_transactions_session_id ON credit_transactions(session_id)"
    " WHERE session_id IS NOT NULL",
    "CREATE INDEX idx_credit_transactions_created_at ON credit_transactions USING brin(created_at)",
    # The money functions set updated_at themselves; the foundation's touch trigger then only
    # runs for other writers (a PL/pgSQL trigger call per deduction is measurable).
    "DROP TRIGGER credit_accounts_touch_updated_at ON credit_accounts",
    "CREATE TRIGGER credit_accounts_touch_updated_at BEFORE UPDATE ON credit_accounts"
    " FOR EACH ROW WHEN (NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at)"
    " EXECUTE FUNCTION keen_touch_updated_at()",
    "CREATE UNIQUE INDEX idx_credit_transactions_sequence"
    " ON credit_transactions(account_id, sequence_number)",
    "CREATE UNIQUE INDEX idx_credit_transactions_idempotency"
    " ON credit_transactions(account_id, idempotency_key) WHERE idempotency_key IS NOT NULL",
    "CREATE INDEX idx_credit_transactions_refunded ON credit_transactions(refunded_transaction_id)"
    " WHERE refunded_transaction_id IS NOT NULL",
    # A Stripe payment is credited once, whatever the caller's idempotency key says.
    "CREATE UNIQUE INDEX idx_credit_transactions_stripe ON credit_transactions"
    "(stripe_payment_intent_id) WHERE transaction_type = 'purchase'"
    " AND stripe_payment_intent_id IS NOT NULL",
    # One row per threshold crossing; the billing service acts on 'requested' rows.
    """
    CREATE TABLE credit_auto_recharge_requests (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        account_id UUID NOT NULL REFERENCES credit_accounts(id) ON DELETE CASCADE,
        transaction_id UUID NOT NULL REFERENCES credit_transactions(id),
        balance_after NUMERIC(18,6) NOT NULL,
        threshold NUMERIC(18,6) NOT NULL,
        recharge_amount NUMERIC(18,6),
        status VARCHAR(20) NOT NULL DEFAULT 'requested',
        created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
        resolved_at TIMESTAMP WITH TIME ZONE,
        CONSTRAINT credit_auto_recharge_status_check
            CHECK (status IN ('requested', 'fulfilled', 'failed', 'cancelled')),
        CONSTRAINT credit_auto_recharge_transaction_key UNIQUE (transaction_id)
    )
    """,
    "CREATE INDEX idx_credit_auto_recharge_user ON credit_auto_recharge_requests(user_id)",
    "CREATE INDEX idx_credit_auto_recharge_pending ON credit_auto_recharge_requests(created_at)"
    " WHERE status = 'requested'",
]

NEW_TENANT_TABLES = ("credit_holds", "credit_auto_recharge_requests")

# --- row invariants ------------------------------------------------------------------------
# Every rule the foundation's and the ledger's CHECK constraints stated, as one CHECK per table
# that calls a function on the whole row. Same rows accepted, same rows refused; the difference
# is cost. PostgreSQL 15 re-reads each CHECK from its stored node text and plans it for every
# INSERT/UPDATE statement (ExecRelCheck: stringToNode + expression_planner), and each money
# function runs its UPDATE and INSERT as fresh statements: the twelve plain CHECKs were ~0.75 M
# of the ~1.6 M instructions a deduction cost (callgrind), this is ~0.13 M (docs/performance.md).
# IMMUTABLE PL/pgSQL: never inlined (inlining would re-parse the body per statement), and a
# NULL result passes as a CHECK's NULL does.
ROW_CHECKS = [
    """
    CREATE FUNCTION keen_credit_account_valid(a credit_accounts) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    AS $$
    BEGIN
        -- current_balance >= held_amount >= 0 also says the balance is never negative.
        RETURN a.current_balance >= a.held_amount AND a.held_amount >= 0
           AND a.lifetime_purchased >= 0 AND a.lifetime_spent >= 0
           AND a.spent_day >= 0 AND a.spent_month >= 0 AND a.last_sequence >= 0
           AND (a.daily_limit IS NULL OR a.daily_limit > 0)
           AND (a.monthly_limit IS NULL OR a.monthly_limit > 0)
           AND (a.auto_recharge_threshold IS NULL OR a.auto_recharge_threshold >= 0)
           AND (a.auto_recharge_amount IS NULL OR a.auto_recharge_amount > 0);
    END $$
    """,
    # The type list, the sign of each type (and admin_bypass = 0), the bypass flag, refunds
    # naming their charge, keys with their fingerprint, and the foundation's column rules.
    """
    CREATE FUNCTION keen_credit_transaction_valid(t credit_transactions) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    AS $$
    BEGIN
        RETURN CASE t.transaction_type
                   WHEN 'purchase' THEN t.amount > 0
                   WHEN 'usage' THEN t.amount < 0
                   WHEN 'refund' THEN t.amount > 0
                   WHEN 'adjustment' THEN t.amount <> 0
                   WHEN 'admin_bypass' THEN t.amount = 0
                   ELSE false END
           AND t.is_admin_bypass = (t.transaction_type = 'admin_bypass')
           AND (t.transaction_type = 'refund') = (t.refunded_transaction_id IS NOT NULL)
           AND (t.idempotency_key IS NULL) = (t.idempotency_fingerprint IS NULL)
           AND t.sequence_number > 0
           AND (t.claude_cost_usd IS NULL OR t.claude_cost_usd >= 0)
           AND (t.keen_markup_multiplier IS NULL OR t.keen_markup_multiplier > 0)
           AND length(t.description) <= 1000;
    END $$
    """,
    "ALTER TABLE credit_accounts"
    " DROP CONSTRAINT credit_accounts_balance_nonnegative,"
    " DROP CONSTRAINT credit_accounts_lifetime_nonnegative,"
    " DROP CONSTRAINT credit_accounts_limits_positive,"
    " DROP CONSTRAINT credit_accounts_recharge_positive,"
    " ADD CONSTRAINT credit_accounts_valid CHECK (keen_credit_account_valid(credit_accounts))",
    "ALTER TABLE credit_transactions"
    " DROP CONSTRAINT credit_transactions_type_check,"
    " DROP CONSTRAINT credit_transactions_claude_cost_check,"
    " DROP CONSTRAINT credit_transactions_markup_check,"
    " DROP CONSTRAINT credit_transactions_bypass_check,"
    " DROP CONSTRAINT credit_transactions_bypass_zero,"
    " DROP CONSTRAINT credit_transactions_description_length,"
    " ADD CONSTRAINT credit_transactions_valid"
    " CHECK (keen_credit_transaction_valid(credit_transactions))",
]
# What the downgrade puts back: the foundation's constraints as 0001 wrote them.
FOUNDATION_CHECKS = [
    "ALTER TABLE credit_accounts DROP CONSTRAINT IF EXISTS credit_accounts_valid,"
    " ADD CONSTRAINT credit_accounts_balance_nonnegative CHECK (current_balance >= 0),"
    " ADD CONSTRAINT credit_accounts_lifetime_nonnegative"
    "   CHECK (lifetime_purchased >= 0 AND lifetime_spent >= 0),"
    " ADD CONSTRAINT credit_accounts_limits_positive"
    "   CHECK ((daily_limit IS NULL OR daily_limit > 0)"
    "          AND (monthly_limit IS NULL OR monthly_limit > 0)),"
    " ADD CONSTRAINT credit_accounts_recharge_positive"
    "   CHECK ((auto_recharge_threshold IS NULL OR auto_recharge_threshold >= 0)"
    "          AND (auto_recharge_amount IS NULL OR auto_recharge_amount > 0))",
    "ALTER TABLE credit_transactions DROP CONSTRAINT IF EXISTS credit_transactions_valid,"
    " ADD CONSTRAINT credit_transactions_type_check CHECK (transaction_type IN"
    "   ('purchase', 'usage', 'refund', 'adjustment', 'admin_bypass')),"
    " ADD CONSTRAINT credit_transactions_claude_cost_check"
    "   CHECK (claude_cost_usd IS NULL OR claude_cost_usd >= 0),"
    " ADD CONSTRAINT credit_transactions_markup_check CHECK (keen_markup_multiplier > 0),"
    " ADD CONSTRAINT credit_transactions_bypass_check"
    "   CHECK (is_admin_bypass = (transaction_type = 'admin_bypass')),"
    " ADD CONSTRAINT credit_transactions_bypass_zero"
    "   CHECK (transaction_type <> 'admin_bypass' OR amount = 0),"
    " ADD CONSTRAINT credit_transactions_description_length"
    "   CHECK (length(description) <= 1000)",
]

# --- functions -----------------------------------------------------------------------------
# Shared pieces, run only inside the SECURITY DEFINER functions below (whose pinned search_path
# they inherit; keen_app cannot call them). keen_credits_for is THE rounding rule (mirrored by
# keen_stream.dal.credits.credits_for): credits = claude_cost x markup, rounded UP to the
# micro-credit (6 dp).
HELPERS = [
    """
    CREATE FUNCTION keen_credits_for(p_cost numeric, p_markup numeric) RETURNS numeric
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT (ceil(p_cost * p_markup * 1000000) / 1000000)::numeric(18,6) $$
    """,
    # Defence in depth: the Python layer refuses these first, but keen_app could call the
    # functions directly. Returns the value at 6 dp.
    """
    CREATE FUNCTION keen_money_check(p_value numeric, p_what text, p_allow_negative boolean)
    RETURNS numeric
    LANGUAGE plpgsql IMMUTABLE
    AS $$
    BEGIN
        IF p_value IS NULL THEN
            RAISE EXCEPTION '% is required', p_what USING ERRCODE = 'KS422';
        END IF;
        IF p_value = 'NaN'::numeric OR p_value IN ('Infinity'::numeric, '-Infinity'::numeric) THEN
            RAISE EXCEPTION '% must be finite', p_what USING ERRCODE = 'KS422';
        END IF;
        IF p_value <> round(p_value, 6) THEN
            RAISE EXCEPTION '% has more than 6 decimal places', p_what USING ERRCODE = 'KS422';
        END IF;
        IF p_value = 0 THEN
            RAISE EXCEPTION '% must not be zero', p_what USING ERRCODE = 'KS422';
        END IF;
        IF p_value < 0 AND NOT p_allow_negative THEN
            RAISE EXCEPTION '% must not be negative', p_what USING ERRCODE = 'KS422';
        END IF;
        IF abs(p_value) > 999999999999.999999 THEN
            RAISE EXCEPTION '% is out of range', p_what USING ERRCODE = 'KS422';
        END IF;
        RETURN round(p_value, 6);
    END $$
    """,
    # The caller acts on p_user's account: their own, or any account when they are an admin.
    # Someone else's account reads as missing (NotFound), as RLS would show it.
    """
    CREATE FUNCTION keen_ledger_authorize(p_user uuid) RETURNS void
    LANGUAGE plpgsql STABLE
    AS $$
    DECLARE
        v_caller uuid := keen_current_user_id();
    BEGIN
        IF p_user IS NULL OR v_caller IS NULL
           OR (v_caller <> p_user AND NOT keen_is_admin()) THEN
            RAISE EXCEPTION 'no credit account for this user' USING ERRCODE = 'KS404';
        END IF;
    END $$
    """,
    # Runs only when a conditional UPDATE found nothing: lock the account, say why the charge
    # does not fit, or return when it fits after all (a concurrent purchase committed meanwhile;
    # the caller then retries once, holding the lock). p_limit_credits NULL: no limit applies.
    """
    CREATE FUNCTION keen_ledger_refuse(p_account uuid, p_credits numeric, p_limit_credits numeric,
                                       p_day date, p_month date, p_attempt integer) RETURNS void
    LANGUAGE plpgsql
    AS $$
    DECLARE
        a credit_accounts%ROWTYPE;
        v_spent numeric;
    BEGIN
        SELECT * INTO a FROM credit_accounts WHERE id = p_account FOR UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'no credit account for this user' USING ERRCODE = 'KS404';
        END IF;
        IF p_attempt > 1 THEN
            -- Holding the lock, the charge fitted a moment ago and still failed: a bug, not a
            -- refusal. Never loop on it.
            RAISE EXCEPTION 'ledger: charge on % refused without a reason', p_account;
        END IF;
        IF a.current_balance - a.held_amount < p_credits THEN
            RAISE EXCEPTION 'insufficient credits: % available, % required',
                a.current_balance - a.held_amount, p_credits
                USING ERRCODE = 'KS402', DETAIL = json_build_object(
                    'balance', a.current_balance::text,
                    'available', (a.current_balance - a.held_amount)::text,
                    'held', a.held_amount::text,
                    'required', p_credits::text,
                    'shortfall', (p_credits - (a.current_balance - a.held_amount))::text)::text;
        END IF;
        IF a.daily_limit IS NOT NULL AND p_limit_credits IS NOT NULL THEN
            v_spent := CASE WHEN a.spend_day = p_day THEN a.spent_day ELSE 0 END;
            IF v_spent + a.held_amount + p_limit_credits > a.daily_limit THEN
                RAISE EXCEPTION 'daily spending limit % reached', a.daily_limit
                    USING ERRCODE = 'KS461', DETAIL = json_build_object(
                        'period', 'day', 'limit', a.daily_limit::text, 'spent', v_spent::text,
                        'held', a.held_amount::text, 'required', p_limit_credits::text)::text;
            END IF;
        END IF;
        IF a.monthly_limit IS NOT NULL AND p_limit_credits IS NOT NULL THEN
            v_spent := CASE WHEN a.spend_month = p_month THEN a.spent_month ELSE 0 END;
            IF v_spent + a.held_amount + p_limit_credits > a.monthly_limit THEN
                RAISE EXCEPTION 'monthly spending limit % reached', a.monthly_limit
                    USING ERRCODE = 'KS461', DETAIL = json_build_object(
                        'period', 'month', 'limit', a.monthly_limit::text,
                        'spent', v_spent::text, 'held', a.held_amount::text,
                        'required', p_limit_credits::text)::text;
            END IF;
        END IF;
    END $$
    """,
    # Take p_credits from a root session's budget, atomically, or raise SessionBudgetExceeded.
    """
    CREATE FUNCTION keen_budget_take(p_root uuid, p_credits numeric) RETURNS void
    LANGUAGE plpgsql
    AS $$
    DECLARE
        v_budget numeric;
        v_used numeric;
    BEGIN
        UPDATE agent_sessions SET budget_used = budget_used + p_credits
         WHERE id = p_root AND budget_used + p_credits <= credit_budget;
        IF NOT FOUND THEN
            SELECT credit_budget, budget_used INTO v_budget, v_used
              FROM agent_sessions WHERE id = p_root;
            RAISE EXCEPTION 'session budget exceeded: % of % used, % required',
                v_used, v_budget, p_credits
                USING ERRCODE = 'KS462', DETAIL = json_build_object(
                    'root_session_id', p_root, 'budget', v_budget::text,
                    'used', v_used::text, 'required', p_credits::text)::text;
        END IF;
    END $$
    """,
    # Give credits back to a root's budget (settle below estimate, release, expiry, refund).
    # Clamped at 0: a budget set after some charges must not go negative on their refund.
    """
    CREATE FUNCTION keen_budget_give_back(p_root uuid, p_credits numeric) RETURNS void
    LANGUAGE sql
    AS $$
        UPDATE agent_sessions SET budget_used = greatest(budget_used - p_credits, 0)
         WHERE id = p_root AND p_credits > 0 AND credit_budget IS NOT NULL
    $$
    """,
    # Resolve a session (by row id or by its handle) for p_user. Another user's session reads
    # as missing. Returns the session's row id, its root and the root's budget (NULL: none).
    """
    CREATE FUNCTION keen_ledger_session(p_user uuid, p_session uuid, p_handle text,
                                        OUT session_row uuid, OUT root_id uuid,
                                        OUT root_budget numeric)
    LANGUAGE plpgsql STABLE
    AS $$
    DECLARE
        v_owner uuid;
    BEGIN
        IF p_session IS NOT NULL THEN
            SELECT s.id, s.user_id, r.id, r.credit_budget
              INTO session_row, v_owner, root_id, root_budget
              FROM agent_sessions s
              JOIN agent_sessions r ON r.id = coalesce(s.root_session_id, s.id)
             WHERE s.id = p_session;
        ELSIF p_handle IS NOT NULL THEN
            SELECT s.id, s.user_id, r.id, r.credit_budget
              INTO session_row, v_owner, root_id, root_budget
              FROM agent_sessions s
              JOIN agent_sessions r ON r.id = coalesce(s.root_session_id, s.id)
             WHERE s.session_id = p_handle;
        ELSE
            RETURN;
        END IF;
        IF session_row IS NULL OR v_owner <> p_user THEN
            RAISE EXCEPTION 'no such session' USING ERRCODE = 'KS404';
        END IF;
    END $$
    """,
    # A retry with the same key returns the original row; the same key with other parameters
    # is a conflict. The advisory lock makes concurrent first attempts wait for each other (the
    # next statement's snapshot then sees the winner's row).
    """
    CREATE FUNCTION keen_ledger_replay(p_account uuid, p_key text, p_fingerprint text)
    RETURNS credit_transactions
    LANGUAGE plpgsql
    AS $$
    DECLARE
        t credit_transactions%ROWTYPE;
    BEGIN
        IF length(p_key) NOT BETWEEN 1 AND 255 THEN
            RAISE EXCEPTION 'idempotency key must have 1 to 255 characters'
                USING ERRCODE = 'KS400';
        END IF;
        PERFORM pg_advisory_xact_lock(
            hashtextextended('keen_ledger:' || p_account || ':' || p_key, 0));
        SELECT * INTO t FROM credit_transactions
         WHERE account_id = p_account AND idempotency_key = p_key;
        IF FOUND AND t.idempotency_fingerprint <> p_fingerprint THEN
            RAISE EXCEPTION 'idempotency key % was used with different parameters', p_key
                USING ERRCODE = 'KS412', DETAIL = json_build_object(
                    'idempotency_key', p_key, 'transaction_id', t.id)::text;
        END IF;
        RETURN t;
    END $$
    """,
    # Exactly one request per crossing: the balance went from >= threshold to < threshold in
    # this change (serialised by the account row lock, so old = new + charged is exact).
    """
    CREATE FUNCTION keen_ledger_recharge_check(p_tx credit_transactions, p_charged numeric)
    RETURNS void
    LANGUAGE plpgsql
    AS $$
    DECLARE
        a credit_accounts%ROWTYPE;
    BEGIN
        SELECT * INTO a FROM credit_accounts WHERE id = p_tx.account_id;
        IF a.auto_recharge_enabled AND a.auto_recharge_threshold IS NOT NULL
           AND p_tx.balance_after < a.auto_recharge_threshold
           AND p_tx.balance_after + p_charged >= a.auto_recharge_threshold THEN
            INSERT INTO credit_auto_recharge_requests
                (user_id, account_id, transaction_id, balance_after, threshold, recharge_amount)
            VALUES (p_tx.user_id, p_tx.account_id, p_tx.id, p_tx.balance_after,
                    a.auto_recharge_threshold, a.auto_recharge_amount);
        END IF;
    END $$
    """,
    # An admin / unlimited account's charge: a zero-amount row that keeps the provider cost.
    """
    CREATE FUNCTION keen_ledger_bypass(p_user uuid, p_account uuid, p_cost numeric,
                                       p_markup numeric, p_session uuid, p_description text,
                                       p_key text, p_fingerprint text, p_hold uuid)
    RETURNS credit_transactions
    LANGUAGE plpgsql
    AS $$
    DECLARE
        v_balance numeric;
        v_seq bigint;
        t credit_transactions%ROWTYPE;
    BEGIN
        UPDATE credit_accounts SET last_sequence = last_sequence + 1, updated_at = now()
         WHERE id = p_account RETURNING current_balance, last_sequence INTO v_balance, v_seq;
        INSERT INTO credit_transactions
            (user_id, account_id, transaction_type, amount, balance_after, claude_cost_usd,
             keen_markup_multiplier, session_id, description, is_admin_bypass, sequence_number,
             idempotency_key, idempotency_fingerprint, hold_id)
        VALUES (p_user, p_account, 'admin_bypass', 0, v_balance, p_cost, p_markup, p_session,
                p_description, true, v_seq, p_key, p_fingerprint, p_hold)
        RETURNING * INTO t;
        RETURN t;
    END $$
    """,
]

# The money functions. Each is one call from Python: validation, authorization, the balance
# check and the update, and the ledger row, in one round trip.
MONEY_FUNCTIONS = [
    """
    CREATE FUNCTION keen_credit_deduct(p_user uuid, p_cost numeric, p_markup numeric,
                                       p_session uuid, p_session_handle text, p_description text,
                                       p_key text)
    RETURNS credit_transactions
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
    DECLARE
        v_cost numeric := p_cost;
        v_credits numeric;
        v_account uuid;
        v_bypass boolean;
        v_balance numeric;
        v_seq bigint;
        v_recharge boolean;
        v_day date;
        v_month date;
        v_attempt integer := 0;
        v_fp text;
        v_session uuid;
        v_root uuid;
        v_budget numeric;
        t credit_transactions%ROWTYPE;
    BEGIN
        -- The common case runs inline: the helpers are called only when something is off.
        IF p_user IS DISTINCT FROM keen_current_user_id() THEN
            PERFORM keen_ledger_authorize(p_user);
        END IF;
        IF v_cost IS NULL OR v_cost <= 0 OR v_cost > 999999999999.999999
           OR v_cost <> round(v_cost, 6) THEN
            v_cost := keen_money_check(p_cost, 'claude_cost_usd', false);
        END IF;
        IF p_markup IS NULL OR NOT (p_markup > 0 AND p_markup < 100
                                    AND p_markup = round(p_markup, 2)) THEN
            RAISE EXCEPTION 'invalid markup %', p_markup USING ERRCODE = 'KS400';
        END IF;
        v_credits := keen_credits_for(v_cost, p_markup);
        IF p_session IS NOT NULL OR p_session_handle IS NOT NULL THEN
            SELECT l.session_row, l.root_id, l.root_budget INTO v_session, v_root, v_budget
              FROM keen_ledger_session(p_user, p_session, p_session_handle) l;
        END IF;
        IF p_key IS NOT NULL THEN
            SELECT id INTO v_account FROM credit_accounts WHERE user_id = p_user;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'no credit account for this user' USING ERRCODE = 'KS404';
            END IF;
            v_fp := md5(concat_ws('|', 'usage', round(v_cost, 6)::text, v_session::text,
                                  p_description));
            t := keen_ledger_replay(v_account, p_key, v_fp);
            IF t.id IS NOT NULL THEN
                RETURN t;
            END IF;
        END IF;
        -- Admin bypass counts against a session budget at its notional value: a budget caps
        -- what a session tree may consume, whoever pays for it.
        IF v_budget IS NOT NULL THEN
            PERFORM keen_budget_take(v_root, v_credits);
        END IF;
        LOOP
            -- Check and charge in one statement: the row lock it takes serialises charges on
            -- the account, and a concurrent change is re-checked (EvalPlanQual) before it
            -- applies. Limits count active holds as spent.
            UPDATE credit_accounts a
               SET current_balance = a.current_balance - v_credits,
                   lifetime_spent = a.lifetime_spent + v_credits,
                   last_sequence = a.last_sequence + 1,
                   spent_day = CASE WHEN a.spend_day = l.today THEN a.spent_day ELSE 0 END
                               + v_credits,
                   spend_day = l.today,
                   spent_month = CASE WHEN a.spend_month = l.month THEN a.spent_month ELSE 0 END
                                 + v_credits,
                   spend_month = l.month,
                   updated_at = now()
              FROM users u,
                   LATERAL (SELECT (now() AT TIME ZONE u.timezone)::date AS today,
                                   date_trunc('month', now() AT TIME ZONE u.timezone)::date AS month
                           ) l
             WHERE a.user_id = p_user AND u.id = p_user
               AND NOT (a.unlimited_credits OR a.bypass_billing
                        OR (u.is_admin AND u.account_status = 'active'))
               AND a.current_balance - a.held_amount >= v_credits
               AND (a.daily_limit IS NULL
                    OR CASE WHEN a.spend_day = l.today THEN a.spent_day ELSE 0 END
                       + a.held_amount + v_credits <= a.daily_limit)
               AND (a.monthly_limit IS NULL
                    OR CASE WHEN a.spend_month = l.month THEN a.spent_month ELSE 0 END
                       + a.held_amount + v_credits <= a.monthly_limit)
            RETURNING a.id, a.current_balance, a.last_sequence,
                      a.auto_recharge_enabled AND a.current_balance < a.auto_recharge_threshold
                      AND a.current_balance + v_credits >= a.auto_recharge_threshold
                 INTO v_account, v_balance, v_seq, v_recharge;
            EXIT WHEN FOUND;
            -- Not charged: a missing account, an admin / unlimited one, or a refusal.
            SELECT a.id, a.unlimited_credits OR a.bypass_billing
                         OR (u.is_admin AND u.account_status = 'active'),
                   (now() AT TIME ZONE u.timezone)::date,
                   date_trunc('month', now() AT TIME ZONE u.timezone)::date
              INTO v_account, v_bypass, v_day, v_month
              FROM credit_accounts a JOIN users u ON u.id = a.user_id
             WHERE a.user_id = p_user;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'no credit account for this user' USING ERRCODE = 'KS404';
            END IF;
            IF v_bypass THEN
                RETURN keen_ledger_bypass(p_user, v_account, v_cost, p_markup, v_session,
                                          p_description, p_key, v_fp, NULL);
            END IF;
            v_attempt := v_attempt + 1;
            PERFORM keen_ledger_refuse(v_account, v_credits, v_credits, v_day, v_month, v_attempt);
        END LOOP;
        INSERT INTO credit_transactions
            (user_id, account_id, transaction_type, amount, balance_after, claude_cost_usd,
             keen_markup_multiplier, session_id, description, sequence_number, idempotency_key,
             idempotency_fingerprint)
        VALUES (p_user, v_account, 'usage', -v_credits, v_balance, v_cost, p_markup,
                v_session, p_description, v_seq, p_key, v_fp)
        RETURNING * INTO t;
        IF v_recharge THEN
            PERFORM keen_ledger_recharge_check(t, v_credits);
        END IF;
        RETURN t;
    END $$
    """,
    """
    CREATE FUNCTION keen_credit_purchase(p_user uuid, p_amount numeric, p_markup numeric,
                                         p_description text, p_stripe text, p_key text)
    RETURNS credit_transactions
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
    DECLARE
        v_amount numeric;
        v_account uuid;
        v_balance numeric;
        v_seq bigint;
        v_fp text;
        t credit_transactions%ROWTYPE;
    BEGIN
        PERFORM keen_ledger_authorize(p_user);
        v_amount := keen_money_check(p_amount, 'amount', false);
        SELECT id INTO v_account FROM credit_accounts WHERE user_id = p_user;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'no credit account for this user' USING ERRCODE = 'KS404';
        END IF;
        IF p_key IS NOT NULL THEN
            v_fp := md5(concat_ws('|', 'purchase', v_amount::text, p_stripe, p_description));
            t := keen_ledger_replay(v_account, p_key, v_fp);
            IF t.id IS NOT NULL THEN
                RETURN t;
            END IF;
        END IF;
        UPDATE credit_accounts
           SET current_balance = current_balance + v_amount,
               lifetime_purchased = lifetime_purchased + v_amount,
               last_sequence = last_sequence + 1,
               updated_at = now()
         WHERE id = v_account
         RETURNING current_balance, last_sequence INTO v_balance, v_seq;
        INSERT INTO credit_transactions
            (user_id, account_id, transaction_type, amount, balance_after,
             keen_markup_multiplier, stripe_payment_intent_id, description, sequence_number,
             idempotency_key, idempotency_fingerprint)
        VALUES (p_user, v_account, 'purchase', v_amount, v_balance, p_markup, p_stripe,
                p_description, v_seq, p_key, v_fp)
        RETURNING * INTO t;
        RETURN t;
    END $$
    """,
    # Refunds a usage row, never beyond what it charged (across all its refunds): the account
    # row lock serialises refunds of one transaction, and the sum is read after taking it.
    """
    CREATE FUNCTION keen_credit_refund(p_user uuid, p_transaction uuid, p_amount numeric,
                                       p_reason text, p_key text)
    RETURNS credit_transactions
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
    DECLARE
        o credit_transactions%ROWTYPE;
        v_amount numeric;
        v_refundable numeric;
        v_root uuid;
        v_budget numeric;
        v_balance numeric;
        v_seq bigint;
        v_fp text;
        t credit_transactions%ROWTYPE;
    BEGIN
        PERFORM keen_ledger_authorize(p_user);
        IF p_amount IS NOT NULL THEN
            v_amount := keen_money_check(p_amount, 'amount', false);
        END IF;
        SELECT * INTO o FROM credit_transactions WHERE id = p_transaction;
        IF NOT FOUND OR o.user_id <> p_user THEN
            RAISE EXCEPTION 'no such transaction' USING ERRCODE = 'KS404';
        END IF;
        IF o.transaction_type <> 'usage' THEN
            RAISE EXCEPTION 'only usage can be refunded, not %', o.transaction_type
                USING ERRCODE = 'KS400';
        END IF;
        IF p_key IS NOT NULL THEN
            v_fp := md5(concat_ws('|', 'refund', o.id::text, coalesce(v_amount::text, 'all'),
                                  p_reason));
            t := keen_ledger_replay(o.account_id, p_key, v_fp);
            IF t.id IS NOT NULL THEN
                RETURN t;
            END IF;
        END IF;
        IF o.session_id IS NOT NULL THEN
            SELECT r.id, r.credit_budget INTO v_root, v_budget
              FROM agent_sessions s
              JOIN agent_sessions r ON r.id = coalesce(s.root_session_id, s.id)
             WHERE s.id = o.session_id;
            IF v_budget IS NOT NULL THEN
                PERFORM 1 FROM agent_sessions WHERE id = v_root FOR UPDATE;
            END IF;
        END IF;
        PERFORM 1 FROM credit_accounts WHERE id = o.account_id FOR UPDATE;
        SELECT -o.amount - coalesce(sum(r.amount), 0) INTO v_refundable
          FROM credit_transactions r WHERE r.refunded_transaction_id = o.id;
        IF v_refundable <= 0 THEN
            RAISE EXCEPTION 'transaction % is fully refunded', o.id USING ERRCODE = 'KS422',
                DETAIL = json_build_object('field', 'amount', 'refundable', '0.000000')::text;
        END IF;
        v_amount := coalesce(v_amount, v_refundable);
        IF v_amount > v_refundable THEN
            RAISE EXCEPTION 'refund of % exceeds the % still refundable', v_amount, v_refundable
                USING ERRCODE = 'KS422', DETAIL = json_build_object(
                    'field', 'amount', 'refundable', v_refundable::text)::text;
        END IF;
        UPDATE credit_accounts
           SET current_balance = current_balance + v_amount,
               lifetime_spent = lifetime_spent - v_amount,
               last_sequence = last_sequence + 1,
               updated_at = now()
         WHERE id = o.account_id
         RETURNING current_balance, last_sequence INTO v_balance, v_seq;
        INSERT INTO credit_transactions
            (user_id, account_id, transaction_type, amount, balance_after,
             keen_markup_multiplier, session_id, description, sequence_number,
             idempotency_key, idempotency_fingerprint, refunded_transaction_id)
        VALUES (p_user, o.account_id, 'refund', v_amount, v_balance, o.keen_markup_multiplier,
                o.session_id, p_reason, v_seq, p_key, v_fp, o.id)
        RETURNING * INTO t;
        IF v_budget IS NOT NULL THEN
            PERFORM keen_budget_give_back(v_root, v_amount);
        END IF;
        RETURN t;
    END $$
    """,
    # Admins only: a signed correction. It cannot take credits that holds have reserved.
    """
    CREATE FUNCTION keen_credit_adjust(p_user uuid, p_amount numeric, p_markup numeric,
                                       p_reason text, p_key text)
    RETURNS credit_transactions
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
    DECLARE
        v_amount numeric;
        v_account uuid;
        v_balance numeric;
        v_seq bigint;
        v_fp text;
        v_attempt integer := 0;
        t credit_transactions%ROWTYPE;
    BEGIN
        IF NOT keen_is_admin() THEN
            RAISE EXCEPTION 'only an admin may adjust balances' USING ERRCODE = 'KS403';
        END IF;
        v_amount := keen_money_check(p_amount, 'amount', true);
        SELECT id INTO v_account FROM credit_accounts WHERE user_id = p_user;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'no credit account for this user' USING ERRCODE = 'KS404';
        END IF;
        IF p_key IS NOT NULL THEN
            v_fp := md5(concat_ws('|', 'adjustment', v_amount::text, p_reason));
            t := keen_ledger_replay(v_account, p_key, v_fp);
            IF t.id IS NOT NULL THEN
                RETURN t;
            END IF;
        END IF;
        LOOP
            UPDATE credit_accounts
               SET current_balance = current_balance + v_amount,
                   last_sequence = last_sequence + 1,
                   updated_at = now()
             WHERE id = v_account AND current_balance - held_amount + v_amount >= 0
             RETURNING current_balance, last_sequence INTO v_balance, v_seq;
            EXIT WHEN FOUND;
            v_attempt := v_attempt + 1;
            PERFORM keen_ledger_refuse(v_account, -v_amount, NULL, NULL, NULL, v_attempt);
        END LOOP;
        INSERT INTO credit_transactions
            (user_id, account_id, transaction_type, amount, balance_after,
             keen_markup_multiplier, description, metadata, sequence_number, idempotency_key,
             idempotency_fingerprint)
        VALUES (p_user, v_account, 'adjustment', v_amount, v_balance, p_markup, p_reason,
                jsonb_build_object('admin_user_id', keen_current_user_id()), v_seq, p_key, v_fp)
        RETURNING * INTO t;
        IF v_amount < 0 THEN
            PERFORM keen_ledger_recharge_check(t, -v_amount);
        END IF;
        RETURN t;
    END $$
    """,
    # A hold reserves estimated credits from the available balance (and the session budget).
    # Spending limits count active holds as already spent.
    """
    CREATE FUNCTION keen_credit_reserve(p_user uuid, p_cost numeric, p_markup numeric,
                                        p_session uuid, p_session_handle text, p_ttl interval,
                                        p_description text, p_key text)
    RETURNS credit_holds
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
    DECLARE
        v_cost numeric := p_cost;
        v_credits numeric;
        v_account uuid;
        v_bypass boolean := false;
        v_day date;
        v_month date;
        v_fp text;
        v_attempt integer := 0;
        v_session uuid;
        v_root uuid;
        v_budget numeric;
        h credit_holds%ROWTYPE;
    BEGIN
        IF p_user IS DISTINCT FROM keen_current_user_id() THEN
            PERFORM keen_ledger_authorize(p_user);
        END IF;
        IF v_cost IS NULL OR v_cost <= 0 OR v_cost > 999999999999.999999
           OR v_cost <> round(v_cost, 6) THEN
            v_cost := keen_money_check(p_cost, 'estimated_claude_cost', false);
        END IF;
        IF p_markup IS NULL OR NOT (p_markup > 0 AND p_markup < 100
                                    AND p_markup = round(p_markup, 2)) THEN
            RAISE EXCEPTION 'invalid markup %', p_markup USING ERRCODE = 'KS400';
        END IF;
        IF p_ttl IS NULL OR p_ttl <= interval '0' OR p_ttl > interval '1 day' THEN
            RAISE EXCEPTION 'hold ttl must be between 0 and 1 day' USING ERRCODE = 'KS400';
        END IF;
        v_credits := keen_credits_for(v_cost, p_markup);
        IF p_session IS NOT NULL OR p_session_handle IS NOT NULL THEN
            SELECT l.session_row, l.root_id, l.root_budget INTO v_session, v_root, v_budget
              FROM keen_ledger_session(p_user, p_session, p_session_handle) l;
        END IF;
        IF p_key IS NOT NULL THEN
            IF length(p_key) NOT BETWEEN 1 AND 255 THEN
                RAISE EXCEPTION 'idempotency key must have 1 to 255 characters'
                    USING ERRCODE = 'KS400';
            END IF;
            SELECT id INTO v_account FROM credit_accounts WHERE user_id = p_user;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'no credit account for this user' USING ERRCODE = 'KS404';
            END IF;
            v_fp := md5(concat_ws('|', 'hold', round(v_cost, 6)::text, v_session::text, p_ttl::text,
                                  p_description));
            PERFORM pg_advisory_xact_lock(
                hashtextextended('keen_hold:' || v_account || ':' || p_key, 0));
            SELECT * INTO h FROM credit_holds
             WHERE account_id = v_account AND idempotency_key = p_key;
            IF FOUND THEN
                IF h.idempotency_fingerprint <> v_fp THEN
                    RAISE EXCEPTION 'idempotency key % was used with different parameters', p_key
                        USING ERRCODE = 'KS412', DETAIL = json_build_object(
                            'idempotency_key', p_key, 'hold_id', h.id)::text;
                END IF;
                RETURN h;
            END IF;
        END IF;
        IF v_budget IS NOT NULL THEN
            PERFORM keen_budget_take(v_root, v_credits);
        END IF;
        LOOP
            UPDATE credit_accounts a
               SET held_amount = a.held_amount + v_credits, updated_at = now()
              FROM users u,
                   LATERAL (SELECT (now() AT TIME ZONE u.timezone)::date AS today,
                                   date_trunc('month', now() AT TIME ZONE u.timezone)::date AS month
                           ) l
             WHERE a.user_id = p_user AND u.id = p_user
               AND NOT (a.unlimited_credits OR a.bypass_billing
                        OR (u.is_admin AND u.account_status = 'active'))
               AND a.current_balance - a.held_amount >= v_credits
               AND (a.daily_limit IS NULL
                    OR CASE WHEN a.spend_day = l.today THEN a.spent_day ELSE 0 END
                       + a.held_amount + v_credits <= a.daily_limit)
               AND (a.monthly_limit IS NULL
                    OR CASE WHEN a.spend_month = l.month THEN a.spent_month ELSE 0 END
                       + a.held_amount + v_credits <= a.monthly_limit)
            RETURNING a.id INTO v_account;
            EXIT WHEN FOUND;
            SELECT a.id, a.unlimited_credits OR a.bypass_billing
                         OR (u.is_admin AND u.account_status = 'active'),
                   (now() AT TIME ZONE u.timezone)::date,
                   date_trunc('month', now() AT TIME ZONE u.timezone)::date
              INTO v_account, v_bypass, v_day, v_month
              FROM credit_accounts a JOIN users u ON u.id = a.user_id
             WHERE a.user_id = p_user;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'no credit account for this user' USING ERRCODE = 'KS404';
            END IF;
            EXIT WHEN v_bypass;
            v_attempt := v_attempt + 1;
            PERFORM keen_ledger_refuse(v_account, v_credits, v_credits, v_day, v_month, v_attempt);
        END LOOP;
        INSERT INTO credit_holds
            (user_id, account_id, session_id, budget_root_id, estimated_claude_cost_usd,
             keen_markup_multiplier, estimated_credits, amount, is_admin_bypass, description,
             expires_at, idempotency_key, idempotency_fingerprint)
        VALUES (p_user, v_account, v_session, CASE WHEN v_budget IS NOT NULL THEN v_root END,
                v_cost, p_markup, v_credits, CASE WHEN v_bypass THEN 0 ELSE v_credits END,
                v_bypass, p_description, now() + p_ttl, p_key, v_fp)
        RETURNING * INTO h;
        RETURN h;
    END $$
    """,
    # Charges the actual cost (at the hold's markup) and frees the rest of the hold. Up to the
    # reserved credits it always succeeds; an excess is charged only if it fits (balance, limits
    # and budget, as for a deduction), else the error leaves the hold active and unchanged.
    """
    CREATE FUNCTION keen_credit_settle(p_hold uuid, p_cost numeric, p_description text)
    RETURNS credit_transactions
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
    DECLARE
        h credit_holds%ROWTYPE;
        v_cost numeric := p_cost;
        v_credits numeric;
        v_excess numeric;
        v_day date;
        v_month date;
        v_balance numeric;
        v_seq bigint;
        v_recharge boolean;
        v_attempt integer := 0;
        t credit_transactions%ROWTYPE;
    BEGIN
        IF v_cost IS NULL OR v_cost <= 0 OR v_cost > 999999999999.999999
           OR v_cost <> round(v_cost, 6) THEN
            v_cost := keen_money_check(p_cost, 'actual_claude_cost', false);
        END IF;
        SELECT * INTO h FROM credit_holds WHERE id = p_hold FOR UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'no such hold' USING ERRCODE = 'KS404';
        END IF;
        IF h.user_id IS DISTINCT FROM keen_current_user_id() THEN
            PERFORM keen_ledger_authorize(h.user_id);
        END IF;
        IF h.status = 'settled' THEN
            IF h.settled_claude_cost_usd = v_cost THEN
                SELECT * INTO t FROM credit_transactions WHERE id = h.settled_transaction_id;
                RETURN t;
            END IF;
            RAISE EXCEPTION 'hold % was already settled with a different cost', h.id
                USING ERRCODE = 'KS412', DETAIL = json_build_object(
                    'hold_id', h.id, 'transaction_id', h.settled_transaction_id)::text;
        END IF;
        IF h.status <> 'active' OR h.expires_at <= now() THEN
            RAISE EXCEPTION 'hold % is %', h.id,
                CASE WHEN h.status = 'active' THEN 'expired' ELSE h.status END
                USING ERRCODE = 'KS410', DETAIL = json_build_object(
                    'hold_id', h.id,
                    'status', CASE WHEN h.status = 'active' THEN 'expired' ELSE h.status END)::text;
        END IF;
        IF v_cost * h.keen_markup_multiplier > 999999999999.999999 THEN
            RAISE EXCEPTION 'actual_claude_cost x markup is out of range' USING ERRCODE = 'KS422';
        END IF;
        v_credits := keen_credits_for(v_cost, h.keen_markup_multiplier);
        v_excess := v_credits - h.estimated_credits;
        IF h.budget_root_id IS NOT NULL THEN
            IF v_excess > 0 THEN
                PERFORM keen_budget_take(h.budget_root_id, v_excess);
            ELSE
                PERFORM keen_budget_give_back(h.budget_root_id, -v_excess);
            END IF;
        END IF;
        IF h.is_admin_bypass THEN
            t := keen_ledger_bypass(h.user_id, h.account_id, v_cost, h.keen_markup_multiplier,
                                    h.session_id, coalesce(p_description, h.description),
                                    NULL, NULL, h.id);
        ELSE
            LOOP
                -- Up to the reserved credits this always fits (they were held); an excess is
                -- checked like a deduction.
                UPDATE credit_accounts a
                   SET current_balance = a.current_balance - v_credits,
                       held_amount = a.held_amount - h.amount,
                       lifetime_spent = a.lifetime_spent + v_credits,
                       last_sequence = a.last_sequence + 1,
                       spent_day = CASE WHEN a.spend_day = l.today THEN a.spent_day ELSE 0 END
                                   + v_credits,
                       spend_day = l.today,
                       spent_month = CASE WHEN a.spend_month = l.month THEN a.spent_month
                                          ELSE 0 END + v_credits,
                       spend_month = l.month,
                       updated_at = now()
                  FROM users u,
                       LATERAL (SELECT (now() AT TIME ZONE u.timezone)::date AS today,
                                       date_trunc('month', now() AT TIME ZONE u.timezone)::date
                                           AS month) l
                 WHERE a.id = h.account_id AND u.id = h.user_id
                   AND (v_excess <= 0 OR (
                        a.current_balance - a.held_amount >= v_excess
                        AND (a.daily_limit IS NULL
                             OR CASE WHEN a.spend_day = l.today THEN a.spent_day ELSE 0 END
                                + a.held_amount + v_excess <= a.daily_limit)
                        AND (a.monthly_limit IS NULL
                             OR CASE WHEN a.spend_month = l.month THEN a.spent_month ELSE 0 END
                                + a.held_amount + v_excess <= a.monthly_limit)))
                RETURNING a.current_balance, a.last_sequence,
                          a.auto_recharge_enabled AND a.current_balance < a.auto_recharge_threshold
                          AND a.current_balance + v_credits >= a.auto_recharge_threshold
                     INTO v_balance, v_seq, v_recharge;
                EXIT WHEN FOUND;
                SELECT (now() AT TIME ZONE u.timezone)::date,
                       date_trunc('month', now() AT TIME ZONE u.timezone)::date
                  INTO v_day, v_month FROM users u WHERE u.id = h.user_id;
                v_attempt := v_attempt + 1;
                PERFORM keen_ledger_refuse(h.account_id, v_excess, v_excess, v_day, v_month,
                                           v_attempt);
            END LOOP;
            INSERT INTO credit_transactions
                (user_id, account_id, transaction_type, amount, balance_after, claude_cost_usd,
                 keen_markup_multiplier, session_id, description, sequence_number, hold_id)
            VALUES (h.user_id, h.account_id, 'usage', -v_credits, v_balance, v_cost,
                    h.keen_markup_multiplier, h.session_id,
                    coalesce(p_description, h.description), v_seq, h.id)
            RETURNING * INTO t;
            IF v_recharge THEN
                PERFORM keen_ledger_recharge_check(t, v_credits);
            END IF;
        END IF;
        UPDATE credit_holds
           SET status = 'settled', settled_claude_cost_usd = v_cost, settled_credits = v_credits,
               settled_transaction_id = t.id, resolved_at = now()
         WHERE id = h.id;
        RETURN t;
    END $$
    """,
    # Frees an active hold. Releasing a released or expired hold returns it unchanged.
    """
    CREATE FUNCTION keen_credit_release(p_hold uuid) RETURNS credit_holds
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
    DECLARE
        h credit_holds%ROWTYPE;
    BEGIN
        SELECT * INTO h FROM credit_holds WHERE id = p_hold FOR UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'no such hold' USING ERRCODE = 'KS404';
        END IF;
        PERFORM keen_ledger_authorize(h.user_id);
        IF h.status = 'settled' THEN
            RAISE EXCEPTION 'hold % is settled', h.id USING ERRCODE = 'KS410',
                DETAIL = json_build_object('hold_id', h.id, 'status', h.status)::text;
        END IF;
        IF h.status <> 'active' THEN
            RETURN h;
        END IF;
        IF h.budget_root_id IS NOT NULL THEN
            PERFORM keen_budget_give_back(h.budget_root_id, h.estimated_credits);
        END IF;
        IF h.amount > 0 THEN
            UPDATE credit_accounts SET held_amount = held_amount - h.amount, updated_at = now()
             WHERE id = h.account_id;
        END IF;
        UPDATE credit_holds SET status = 'released', resolved_at = now()
         WHERE id = h.id RETURNING * INTO h;
        RETURN h;
    END $$
    """,
    # The sweep (system only): frees holds past their expiry. SKIP LOCKED lets several
    # sweepers, and settles in flight, pass each other.
    """
    CREATE FUNCTION keen_credit_expire_holds(p_limit integer) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
    DECLARE
        h credit_holds%ROWTYPE;
        n integer := 0;
    BEGIN
        FOR h IN SELECT * FROM credit_holds
                  WHERE status = 'active' AND expires_at <= now()
                  ORDER BY expires_at LIMIT p_limit
                  FOR UPDATE SKIP LOCKED LOOP
            IF h.budget_root_id IS NOT NULL THEN
                PERFORM keen_budget_give_back(h.budget_root_id, h.estimated_credits);
            END IF;
            IF h.amount > 0 THEN
                UPDATE credit_accounts SET held_amount = held_amount - h.amount, updated_at = now()
                 WHERE id = h.account_id;
            END IF;
            UPDATE credit_holds SET status = 'expired', resolved_at = now() WHERE id = h.id;
            n := n + 1;
        END LOOP;
        RETURN n;
    END $$
    """,
    # The checks of `keen-stream ledger verify`, one row per problem (system only: it reads
    # every account).
    """
    CREATE FUNCTION keen_ledger_verify()
    RETURNS TABLE (account_id uuid, user_id uuid, problem text, expected text, actual text)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
    WITH chain AS (
        SELECT t.account_id, t.sequence_number, t.amount, t.balance_after, t.transaction_type,
               t.user_id,
               lag(t.balance_after, 1, 0::numeric) OVER w AS previous_balance,
               row_number() OVER w AS position
          FROM credit_transactions t
        WINDOW w AS (PARTITION BY t.account_id ORDER BY t.sequence_number)
    ), sums AS (
        SELECT c.account_id,
               count(*) AS n,
               max(c.sequence_number) AS last_seq,
               sum(c.amount) AS total,
               sum(c.amount) FILTER (WHERE c.transaction_type = 'purchase') AS purchased,
               -sum(c.amount) FILTER (WHERE c.transaction_type IN ('usage', 'refund')) AS spent,
               count(*) FILTER (WHERE c.sequence_number <> c.position) AS gaps,
               count(*) FILTER (WHERE c.balance_after <> c.previous_balance + c.amount) AS breaks,
               min(c.sequence_number)
                   FILTER (WHERE c.balance_after <> c.previous_balance + c.amount) AS first_break
          FROM chain c GROUP BY c.account_id
    ), holds AS (
        SELECT h.account_id, sum(h.amount) AS held
          FROM credit_holds h WHERE h.status = 'active' GROUP BY h.account_id
    ), accounts AS (
        SELECT a.*, coalesce(s.n, 0) AS n, coalesce(s.last_seq, 0) AS last_seq,
               coalesce(s.total, 0) AS total, coalesce(s.purchased, 0) AS purchased,
               coalesce(s.spent, 0) AS spent, coalesce(s.gaps, 0) AS gaps,
               coalesce(s.breaks, 0) AS breaks, s.first_break,
               coalesce(hd.held, 0) AS held
          FROM credit_accounts a
          LEFT JOIN sums s ON s.account_id = a.id
          LEFT JOIN holds hd ON hd.account_id = a.id
    )
    SELECT a.id, a.user_id, p.problem, p.expected, p.actual
      FROM accounts a
     CROSS JOIN LATERAL (VALUES
        ('balance differs from the sum of its ledger', a.total::text, a.current_balance::text,
         a.current_balance <> a.total),
        ('sequence numbers are not contiguous from 1', a.n::text, a.last_seq::text,
         a.gaps > 0 OR a.n <> a.last_seq),
        ('last_sequence differs from the ledger', a.last_seq::text, a.last_sequence::text,
         a.last_sequence <> a.last_seq),
        ('balance_after does not chain', 'none', 'first break at sequence '
         || a.first_break::text, a.breaks > 0),
        ('lifetime_purchased differs from purchases', a.purchased::text,
         a.lifetime_purchased::text, a.lifetime_purchased <> a.purchased),
        ('lifetime_spent differs from usage minus refunds', a.spent::text,
         a.lifetime_spent::text, a.lifetime_spent <> a.spent),
        ('held_amount differs from active holds', a.held::text, a.held_amount::text,
         a.held_amount <> a.held)
     ) AS p(problem, expected, actual, failed)
     WHERE p.failed
    UNION ALL
    SELECT t.account_id, t.user_id, 'ledger row belongs to another user than its account',
           a.user_id::text, t.user_id::text
      FROM credit_transactions t JOIN credit_accounts a ON a.id = t.account_id
     WHERE t.user_id <> a.user_id
    UNION ALL
    SELECT o.account_id, o.user_id, 'refunds exceed the charge of ' || o.id::text,
           (-o.amount)::text, sum(r.amount)::text
      FROM credit_transactions o JOIN credit_transactions r ON r.refunded_transaction_id = o.id
     GROUP BY o.id, o.account_id, o.user_id, o.amount
    HAVING sum(r.amount) > -o.amount
    $$
    """,
]

FUNCTION_SIGNATURES = {
    # CHECK functions run as whoever writes the row: keen_app edits its limits.
    "keen_credit_account_valid(credit_accounts)": "all",
    "keen_credit_transaction_valid(credit_transactions)": "system",
    "keen_credits_for(numeric, numeric)": "all",
    "keen_money_check(numeric, text, boolean)": None,
    "keen_ledger_authorize(uuid)": None,
    "keen_ledger_refuse(uuid, numeric, numeric, date, date, integer)": None,
    "keen_budget_take(uuid, numeric)": None,
    "keen_budget_give_back(uuid, numeric)": None,
    "keen_ledger_session(uuid, uuid, text)": None,
    "keen_ledger_replay(uuid, text, text)": None,
    "keen_ledger_recharge_check(credit_transactions, numeric)": None,
    "keen_ledger_bypass(uuid, uuid, numeric, numeric, uuid, text, text, text, uuid)": None,
    "keen_credit_deduct(uuid, numeric, numeric, uuid, text, text, text)": "app",
    "keen_credit_purchase(uuid, numeric, numeric, text, text, text)": "app",
    "keen_credit_refund(uuid, uuid, numeric, text, text)": "app",
    "keen_credit_adjust(uuid, numeric, numeric, text, text)": "app",
    "keen_credit_reserve(uuid, numeric, numeric, uuid, text, interval, text, text)": "app",
    "keen_credit_settle(uuid, numeric, text)": "app",
    "keen_credit_release(uuid)": "app",
    "keen_credit_expire_holds(integer)": "system",
    "keen_ledger_verify()": "system",
}


def _grants() -> list[str]:
    out = [
        "REVOKE ALL ON credit_holds, credit_auto_recharge_requests FROM PUBLIC",
        "GRANT SELECT ON credit_holds, credit_auto_recharge_requests TO keen_app",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON credit_holds, credit_auto_recharge_requests"
        " TO keen_system",
    ]
    for signature, who in FUNCTION_SIGNATURES.items():
        out.append(f"REVOKE EXECUTE ON FUNCTION {signature} FROM PUBLIC")
        # The helpers run inside the SECURITY DEFINER functions, i.e. as their owner.
        out.append(f"ALTER FUNCTION {signature} OWNER TO keen_system")
        if who == "all":
            out.append(f"GRANT EXECUTE ON FUNCTION {signature} TO keen_app, keen_system")
        elif who == "app":
            out.append(f"GRANT EXECUTE ON FUNCTION {signature} TO keen_app")
        elif who == "system":
            out.append(f"GRANT EXECUTE ON FUNCTION {signature} TO keen_system")
    return out


def _policies() -> list[str]:
    """Same shape as the foundation's: one policy per command, owner or admin."""
    me = "(SELECT keen_current_user_id())"
    admin = "(SELECT keen_is_admin())"
    out: list[str] = []
    for table in NEW_TENANT_TABLES:
        mine = f"user_id = {me}"
        out += [
            f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
            f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY",
            f"CREATE POLICY {table}_select ON {table} FOR SELECT TO keen_app "
            f"USING ({mine} OR {admin})",
            f"CREATE POLICY {table}_insert ON {table} FOR INSERT TO keen_app "
            f"WITH CHECK ({mine} OR {admin})",
            f"CREATE POLICY {table}_update ON {table} FOR UPDATE TO keen_app "
            f"USING ({mine} OR {admin}) WITH CHECK ({mine} OR {admin})",
            f"CREATE POLICY {table}_delete ON {table} FOR DELETE TO keen_app "
            f"USING ({mine} OR {admin})",
        ]
    return out


UPGRADE = [*TABLES, *ROW_CHECKS, *HELPERS, *MONEY_FUNCTIONS, *_grants(), *_policies()]

DOWNGRADE = [
    *FOUNDATION_CHECKS,
    *(f"DROP FUNCTION IF EXISTS {signature}" for signature in reversed(FUNCTION_SIGNATURES)),
    "DROP TABLE IF EXISTS credit_auto_recharge_requests",
    "DROP INDEX IF EXISTS idx_credit_transactions_stripe",
    "DROP INDEX IF EXISTS idx_credit_transactions_refunded",
    "DROP INDEX IF EXISTS idx_credit_transactions_idempotency",
    "DROP INDEX IF EXISTS idx_credit_transactions_sequence",
    "CREATE INDEX idx_credit_transactions_account_id ON credit_transactions(account_id)",
    "DROP TRIGGER IF EXISTS credit_accounts_touch_updated_at ON credit_accounts",
    "CREATE TRIGGER credit_accounts_touch_updated_at BEFORE UPDATE ON credit_accounts"
    " FOR EACH ROW EXECUTE FUNCTION keen_touch_updated_at()",
    "DROP INDEX IF EXISTS idx_credit_transactions_admin_bypass",
    "DROP INDEX IF EXISTS idx_credit_transactions_session_id",
    "DROP INDEX IF EXISTS idx_credit_transactions_created_at",
    "CREATE INDEX idx_credit_transactions_user_id ON credit_transactions(user_id)",
    "CREATE INDEX idx_credit_transactions_admin_bypass ON credit_transactions(is_admin_bypass)",
    "CREATE INDEX idx_credit_transactions_session_id ON credit_transactions(session_id)",
    "CREATE INDEX idx_credit_transactions_created_at ON credit_transactions(created_at)",
    "ALTER TABLE credit_transactions ADD CONSTRAINT credit_transactions_user_id_fkey"
    " FOREIGN KEY (user_id) REFERENCES users(id) ON DELETE CASCADE",
    "ALTER TABLE credit_transactions"
    " DROP COLUMN IF EXISTS hold_id,"
    " DROP COLUMN IF EXISTS refunded_transaction_id,"
    " DROP COLUMN IF EXISTS idempotency_fingerprint,"
    " DROP COLUMN IF EXISTS idempotency_key,"
    " DROP COLUMN IF EXISTS sequence_number",
    "DROP TABLE IF EXISTS credit_holds",
    "ALTER TABLE credit_accounts"
    " DROP COLUMN IF EXISTS spent_month,"
    " DROP COLUMN IF EXISTS spend_month,"
    " DROP COLUMN IF EXISTS spent_day,"
    " DROP COLUMN IF EXISTS spend_day,"
    " DROP COLUMN IF EXISTS last_sequence,"
    " DROP COLUMN IF EXISTS held_amount",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
