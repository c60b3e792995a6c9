-- keen_stream's schema, part 3 of 5: the credit ledger (docs/ledger.md).
--
-- Every balance change happens inside one of the SECURITY DEFINER functions below (owned by
-- keen_ledger): keen_app may read its own account and ledger, never write them. Each function
-- takes the acting user from keen_current_user_id() / keen_is_admin() and re-checks that the
-- target account is the caller's own (or that the caller is an admin). Money functions that
-- must be atomic and fast live here so that a deduction is one round trip. The functions that
-- create money (purchase, refund, adjustment) and the price are keen_billing's alone.
--
-- Separation of duties: keen_ledger (foundation.sql; nobody acts as it) owns every function
-- of this file and alone may write the money tables (credit_accounts, credit_transactions,
-- credit_holds, credit_pricing). keen_system (maintenance, registration) reads them and writes
-- none of them; it reaches money only by executing what it is granted: the batch, the expiry
-- sweep, verify, and keen_credit_open_account. (Triggers on these tables that write elsewhere,
-- keen_audit and the stream capture, are SECURITY DEFINER functions of keen_system.)
--
-- Lock order, everywhere: idempotency key (advisory) -> hold row -> root session row (only when
-- it has a budget) -> account row.
--
-- Every SECURITY DEFINER function searches pg_catalog, public, pg_temp: left unnamed, pg_temp
-- is searched FIRST for tables and types.

-- === Accounts =================================================================================
-- Per-account counters that the money functions keep in the same UPDATE as the balance:
-- held_amount (credits reserved by active holds), last_sequence (the ledger's chain), and the
-- spend of the current day/month window (for the spending limits). The windows have an
-- absolute end (spend_day_end, spend_month_end) instead of a local date, so a change of time
-- zone cannot reset them: it can only make the open window longer.
CREATE TABLE credit_accounts (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    current_balance NUMERIC(18,6) NOT NULL DEFAULT 0,
    lifetime_purchased NUMERIC(18,6) NOT NULL DEFAULT 0,
    lifetime_spent NUMERIC(18,6) NOT NULL DEFAULT 0,
    daily_limit NUMERIC(18,6),
    monthly_limit NUMERIC(18,6),
    auto_recharge_enabled BOOLEAN NOT NULL DEFAULT FALSE,
    auto_recharge_threshold NUMERIC(18,6) DEFAULT 10.000000,
    auto_recharge_amount NUMERIC(18,6) DEFAULT 50.000000,
    unlimited_credits BOOLEAN NOT NULL DEFAULT FALSE,
    bypass_billing BOOLEAN NOT NULL DEFAULT FALSE,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    held_amount NUMERIC(18,6) NOT NULL DEFAULT 0,
    last_sequence BIGINT NOT NULL DEFAULT 0,
    spend_day_end TIMESTAMP WITH TIME ZONE,
    spent_day NUMERIC(18,6) NOT NULL DEFAULT 0,
    spend_month_end TIMESTAMP WITH TIME ZONE,
    spent_month NUMERIC(18,6) NOT NULL DEFAULT 0,
    CONSTRAINT credit_accounts_user_id_key UNIQUE (user_id)
);
CREATE INDEX idx_credit_accounts_unlimited ON credit_accounts(unlimited_credits);
-- No updated_at trigger: any BEFORE UPDATE row trigger makes PostgreSQL lock the row before
-- the update (one more WAL record) and costs ~4% of a deduction even when its WHEN clause
-- skips it. The money functions and the DAL's two tenant setters set updated_at themselves.

-- Row invariants: one CHECK per table that calls a function on the whole row. PostgreSQL 15
-- re-reads each CHECK from its stored node text and plans it for every INSERT/UPDATE statement,
-- and each money function runs its UPDATE and INSERT as fresh statements: twelve plain CHECKs
-- were ~0.75 M of the ~1.6 M instructions a deduction cost (callgrind), this is ~0.13 M
-- (docs/performance.md). IMMUTABLE PL/pgSQL: never inlined (inlining would re-parse the body
-- per statement), and a NULL result passes as a CHECK's NULL does.
-- The CHECK functions run as whoever writes the row: keen_app edits its limits.
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
END $$;
ALTER FUNCTION keen_credit_account_valid(credit_accounts) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_credit_account_valid(credit_accounts) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_credit_account_valid(credit_accounts) TO keen_app, keen_system;
ALTER TABLE credit_accounts
    ADD CONSTRAINT credit_accounts_valid CHECK (keen_credit_account_valid(credit_accounts));

ALTER TABLE credit_accounts ENABLE ROW LEVEL SECURITY;
ALTER TABLE credit_accounts FORCE ROW LEVEL SECURITY;
CREATE POLICY credit_accounts_select ON credit_accounts FOR SELECT TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY credit_accounts_insert ON credit_accounts FOR INSERT TO keen_app
    WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY credit_accounts_update ON credit_accounts FOR UPDATE TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))
    WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY credit_accounts_delete ON credit_accounts FOR DELETE TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));

GRANT SELECT ON credit_accounts TO keen_app;
GRANT UPDATE (daily_limit, monthly_limit, auto_recharge_enabled, auto_recharge_threshold,
              auto_recharge_amount, updated_at) ON credit_accounts TO keen_app;
GRANT SELECT ON credit_accounts TO keen_system;
GRANT SELECT, INSERT, UPDATE ON credit_accounts TO keen_ledger;

-- Registration opens an account (balance 0), and create-admin makes an admin's account
-- unlimited: keen_system may do both through this function and may not write credit_accounts
-- otherwise. Unlimited only for an active admin (the flag follows the role, which users_audit
-- records).
CREATE FUNCTION keen_credit_open_account(p_user uuid, p_unlimited boolean) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_account uuid;
BEGIN
    IF NOT coalesce(p_unlimited, false) THEN
        INSERT INTO credit_accounts (user_id) VALUES (p_user) RETURNING id INTO v_account;
        RETURN v_account;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM users u WHERE u.id = p_user AND u.is_admin
                                           AND u.account_status = 'active') THEN
        RAISE EXCEPTION 'only an active admin''s account may be unlimited'
            USING ERRCODE = 'KS403';
    END IF;
    INSERT INTO credit_accounts (user_id, unlimited_credits, bypass_billing, daily_limit,
                                 monthly_limit)
    VALUES (p_user, true, true, NULL, NULL)
    ON CONFLICT (user_id) DO UPDATE SET unlimited_credits = true, bypass_billing = true,
        daily_limit = NULL, monthly_limit = NULL, updated_at = now()
    RETURNING id INTO v_account;
    RETURN v_account;
END $$;
ALTER FUNCTION keen_credit_open_account(uuid, boolean) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_credit_open_account(uuid, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_credit_open_account(uuid, boolean) TO keen_system;

-- The flags that make an account's charges free (unlimited_credits, bypass_billing) are an
-- active admin's alone, so they go when the user stops being one: demoted, suspended or
-- deactivated, whoever changes the row (an admin in tenant context, the system role). Left
-- set, a demoted admin, or a user the system role made admin for a moment, kept paying
-- nothing. An admin made active again needs no flag: an active admin's charges are free by the
-- charge rule itself.
CREATE FUNCTION keen_users_admin_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    UPDATE credit_accounts a
       SET unlimited_credits = false, bypass_billing = false, updated_at = now()
     WHERE a.user_id = NEW.id AND (a.unlimited_credits OR a.bypass_billing);
    RETURN NULL;
END $$;
ALTER FUNCTION keen_users_admin_changed() OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_users_admin_changed() FROM PUBLIC;
CREATE TRIGGER users_unlimited_follows_admin
    AFTER UPDATE OF role, is_admin, account_status ON users FOR EACH ROW
    WHEN (NOT (NEW.is_admin AND NEW.account_status = 'active'))
    EXECUTE FUNCTION keen_users_admin_changed();

-- === The price ================================================================================
-- One row, changed only by keen_credit_set_markup (owned by keen_ledger), every change audited.
-- No function tenant code may execute takes a markup: the price is the server's.
CREATE TABLE credit_pricing (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    singleton BOOLEAN NOT NULL DEFAULT TRUE,
    markup NUMERIC(4,2) NOT NULL,
    reason TEXT NOT NULL,
    changed_by UUID,
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    CONSTRAINT credit_pricing_one_row UNIQUE (singleton),
    CONSTRAINT credit_pricing_singleton CHECK (singleton),
    CONSTRAINT credit_pricing_markup_check CHECK (markup > 0 AND markup <> 'NaN'),
    CONSTRAINT credit_pricing_reason_check CHECK (length(reason) BETWEEN 1 AND 1000)
);
-- The price has no owning user: the audit rows' user_id stays NULL (admins read them).
CREATE TRIGGER credit_pricing_audit AFTER INSERT OR UPDATE OR DELETE ON credit_pricing
    FOR EACH ROW EXECUTE FUNCTION keen_audit('no_owner');
-- The price of a new install: migration 0007's default. An upgrade seeds the operator's
-- markup instead (`keen-stream migrate --markup`, `-x markup=`, KEEN_CREDIT_MARKUP, else this
-- 5.00) and names its source in the reason; it also gives active holds made at another markup
-- (a tenant chose it before 0007) this price.
INSERT INTO credit_pricing (markup, reason)
VALUES (5.00, 'the operator''s markup at migration 0007 (the default)');

GRANT SELECT ON credit_pricing TO keen_app, keen_system, keen_billing;
GRANT SELECT, UPDATE (markup, reason, changed_by, updated_at) ON credit_pricing TO keen_ledger;

-- === Holds ====================================================================================
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
);
CREATE INDEX idx_credit_holds_user_id ON credit_holds(user_id);
CREATE INDEX idx_credit_holds_active ON credit_holds(account_id) WHERE status = 'active';
CREATE INDEX idx_credit_holds_expiry ON credit_holds(expires_at) WHERE status = 'active';
CREATE UNIQUE INDEX idx_credit_holds_idempotency ON credit_holds(account_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

ALTER TABLE credit_holds ENABLE ROW LEVEL SECURITY;
ALTER TABLE credit_holds FORCE ROW LEVEL SECURITY;
CREATE POLICY credit_holds_select ON credit_holds FOR SELECT TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY credit_holds_insert ON credit_holds FOR INSERT TO keen_app
    WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY credit_holds_update ON credit_holds FOR UPDATE TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))
    WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY credit_holds_delete ON credit_holds FOR DELETE TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));

GRANT SELECT ON credit_holds TO keen_app;
GRANT SELECT ON credit_holds TO keen_system;
GRANT SELECT, INSERT, UPDATE ON credit_holds TO keen_ledger;

-- === The ledger ===============================================================================
-- Append-only. The chain: every row has the next number of its account; (account_id,
-- sequence_number) is unique. Every index and foreign key is paid on each deduction
-- (docs/performance.md): user_id is implied by account_id (one account per user, both set by
-- the ledger functions and checked by `ledger verify`), and deleting a user still cascades
-- through credit_accounts, so user_id has neither a foreign key nor an index; per-user reads
-- go through (account_id, sequence_number). Session charges get a partial index, created_at
-- (append order) a BRIN index for the analytics' time ranges. Nothing looks rows up by
-- is_admin_bypass (the analytics filter it inside a time range), so it has no index.
CREATE TABLE credit_transactions (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id UUID NOT NULL,
    account_id UUID NOT NULL REFERENCES credit_accounts(id) ON DELETE CASCADE,
    transaction_type VARCHAR(20) NOT NULL,
    amount NUMERIC(18,6) NOT NULL,
    balance_after NUMERIC(18,6) NOT NULL,
    claude_cost_usd NUMERIC(18,6),
    keen_markup_multiplier NUMERIC(4,2) DEFAULT 5.00,
    session_id UUID REFERENCES agent_sessions(id),
    stripe_payment_intent_id VARCHAR(255),
    description TEXT NOT NULL,
    metadata JSONB NOT NULL DEFAULT '{}',
    is_admin_bypass BOOLEAN NOT NULL DEFAULT FALSE,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    created_by_ip INET,
    sequence_number BIGINT NOT NULL,
    idempotency_key VARCHAR(255),
    idempotency_fingerprint TEXT,
    refunded_transaction_id UUID REFERENCES credit_transactions(id),
    hold_id UUID REFERENCES credit_holds(id)
);
CREATE INDEX idx_credit_transactions_session_id ON credit_transactions(session_id)
    WHERE session_id IS NOT NULL;
CREATE INDEX idx_credit_transactions_created_at ON credit_transactions USING brin(created_at);
CREATE UNIQUE INDEX idx_credit_transactions_sequence
    ON credit_transactions(account_id, sequence_number);
CREATE UNIQUE INDEX idx_credit_transactions_idempotency
    ON credit_transactions(account_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX idx_credit_transactions_refunded ON credit_transactions(refunded_transaction_id)
    WHERE refunded_transaction_id IS NOT NULL;
-- A Stripe payment is credited once, whatever the caller's idempotency key says.
CREATE UNIQUE INDEX idx_credit_transactions_stripe ON credit_transactions
    (stripe_payment_intent_id) WHERE transaction_type = 'purchase'
    AND stripe_payment_intent_id IS NOT NULL;

CREATE TRIGGER credit_transactions_append_only BEFORE UPDATE OR DELETE ON credit_transactions
    FOR EACH ROW EXECUTE FUNCTION keen_reject_change();

-- The type list, the sign of each type (and admin_bypass = 0), the bypass flag, refunds
-- naming their charge, keys with their fingerprint, and the column rules.
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
END $$;
ALTER FUNCTION keen_credit_transaction_valid(credit_transactions) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_credit_transaction_valid(credit_transactions) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_credit_transaction_valid(credit_transactions) TO keen_system;
ALTER TABLE credit_transactions
    ADD CONSTRAINT credit_transactions_valid
    CHECK (keen_credit_transaction_valid(credit_transactions));

ALTER TABLE credit_transactions ENABLE ROW LEVEL SECURITY;
ALTER TABLE credit_transactions FORCE ROW LEVEL SECURITY;
CREATE POLICY credit_transactions_select ON credit_transactions FOR SELECT TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY credit_transactions_insert ON credit_transactions FOR INSERT TO keen_app
    WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY credit_transactions_update ON credit_transactions FOR UPDATE TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))
    WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY credit_transactions_delete ON credit_transactions FOR DELETE TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));

GRANT SELECT ON credit_transactions TO keen_app;
GRANT SELECT ON credit_transactions TO keen_system;
GRANT SELECT, INSERT ON credit_transactions TO keen_ledger;

-- === Auto recharge ============================================================================
-- One row per threshold crossing; the billing service acts on 'requested' rows.
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
);
CREATE INDEX idx_credit_auto_recharge_user ON credit_auto_recharge_requests(user_id);
CREATE INDEX idx_credit_auto_recharge_pending ON credit_auto_recharge_requests(created_at)
    WHERE status = 'requested';

ALTER TABLE credit_auto_recharge_requests ENABLE ROW LEVEL SECURITY;
ALTER TABLE credit_auto_recharge_requests FORCE ROW LEVEL SECURITY;
CREATE POLICY credit_auto_recharge_requests_select ON credit_auto_recharge_requests
    FOR SELECT TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY credit_auto_recharge_requests_insert ON credit_auto_recharge_requests
    FOR INSERT TO keen_app
    WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY credit_auto_recharge_requests_update ON credit_auto_recharge_requests
    FOR UPDATE TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))
    WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY credit_auto_recharge_requests_delete ON credit_auto_recharge_requests
    FOR DELETE TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));

-- Written by the charges (keen_ledger), resolved by the billing service as keen_system (the
-- queue holds no money).
GRANT SELECT ON credit_auto_recharge_requests TO keen_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON credit_auto_recharge_requests TO keen_system;
GRANT SELECT, INSERT ON credit_auto_recharge_requests TO keen_ledger;

-- === The rules, written once ==================================================================
-- keen_credits_for is THE rounding rule (mirrored by keen_stream.dal.credits.credits_for):
-- credits = claude_cost x markup, rounded UP to the micro-credit (6 dp).
CREATE FUNCTION keen_credits_for(p_cost numeric, p_markup numeric) RETURNS numeric
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT (ceil(p_cost * p_markup * 1000000) / 1000000)::numeric(18,6) $$;
ALTER FUNCTION keen_credits_for(numeric, numeric) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_credits_for(numeric, numeric) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_credits_for(numeric, numeric) TO keen_app, keen_system;

-- Spend windows. Plain SQL functions without SECURITY DEFINER or a pinned path, so the planner
-- inlines them into the statements that call them (a pinned path would forbid it): no call per
-- row, and the same text in the deduction, the hold, the settle, the refusal and the DAL's
-- reads (which run as keen_app or keen_system). They name no table. IMMUTABLE: every
-- time-zone conversion they use is (PostgreSQL's own timezone(text, ...) is).

-- Spend of a window that is still open at p_now; an ended window's spend no longer counts.
CREATE FUNCTION keen_spend_in_window(p_spent numeric, p_end timestamptz, p_now timestamptz)
RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT CASE WHEN p_now < p_end THEN p_spent ELSE 0 END $$;
ALTER FUNCTION keen_spend_in_window(numeric, timestamptz, timestamptz) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_spend_in_window(numeric, timestamptz, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_spend_in_window(numeric, timestamptz, timestamptz)
    TO keen_app, keen_system;

-- Where the window a charge at p_now counts in ends (p_unit 'day' or 'month'; p_end: the
-- account's current window end, NULL for none). An open window keeps its end. Otherwise the
-- new window ends at the first local midnight (first of a month) of p_tz that is at least a
-- day (a month) after the previous window's end: in a fixed zone that is simply the end of
-- today (this month); a user who changes zones can never get windows closer together than
-- a day (a month) apart, i.e. never more limits in a stretch of time than a user who stays.
CREATE FUNCTION keen_spend_window_end(p_unit text, p_end timestamptz, p_tz text,
                                      p_now timestamptz)
RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN p_now < p_end THEN p_end ELSE
        (date_trunc(p_unit, greatest(
             p_now AT TIME ZONE p_tz,
             (p_end AT TIME ZONE p_tz)
                 + CASE p_unit WHEN 'day' THEN interval '1 day' ELSE interval '1 month' END
                 - interval '1 microsecond'))
         + CASE p_unit WHEN 'day' THEN interval '1 day' ELSE interval '1 month' END)
        AT TIME ZONE p_tz
    END
$$;
ALTER FUNCTION keen_spend_window_end(text, timestamptz, text, timestamptz) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_spend_window_end(text, timestamptz, text, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_spend_window_end(text, timestamptz, text, timestamptz)
    TO keen_app, keen_system;

-- The window after the user's zone changes to p_tz: an open window ends at the later of its
-- end and the end of the new zone's current day (month), so the spend already made counts
-- for the rest of the new "today"; an ended one is replaced by the (empty) window a charge
-- now would open. Never earlier, never a fresh limit.
CREATE FUNCTION keen_spend_window_rezoned(p_unit text, p_end timestamptz, p_tz text,
                                          p_now timestamptz)
RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT greatest(public.keen_spend_window_end(p_unit, p_end, p_tz, p_now),
                    public.keen_spend_window_end(p_unit, NULL, p_tz, p_now))
$$;
ALTER FUNCTION keen_spend_window_rezoned(text, timestamptz, text, timestamptz) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_spend_window_rezoned(text, timestamptz, text, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_spend_window_rezoned(text, timestamptz, text, timestamptz)
    TO keen_app, keen_system;

-- THE "can this account pay p_credits now" rule: the available balance (active holds
-- reserved) and both limits, active holds counting as spent. Admin / unlimited accounts are
-- decided by the callers (they pay nothing).
CREATE FUNCTION keen_credit_fits(p_credits numeric, p_balance numeric, p_held numeric,
                                 p_daily_limit numeric, p_spent_day numeric,
                                 p_day_end timestamptz, p_monthly_limit numeric,
                                 p_spent_month numeric, p_month_end timestamptz,
                                 p_now timestamptz)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT p_balance - p_held >= p_credits
       AND (p_daily_limit IS NULL
            OR public.keen_spend_in_window(p_spent_day, p_day_end, p_now)
               + p_held + p_credits <= p_daily_limit)
       AND (p_monthly_limit IS NULL
            OR public.keen_spend_in_window(p_spent_month, p_month_end, p_now)
               + p_held + p_credits <= p_monthly_limit)
$$;
ALTER FUNCTION keen_credit_fits(numeric, numeric, numeric, numeric, numeric, timestamptz, numeric, numeric, timestamptz, timestamptz)
    OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_credit_fits(numeric, numeric, numeric, numeric, numeric, timestamptz, numeric, numeric, timestamptz, timestamptz)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_credit_fits(numeric, numeric, numeric, numeric, numeric, timestamptz, numeric, numeric, timestamptz, timestamptz)
    TO keen_app, keen_system;

-- keen_app may change users.timezone but not the account's windows: SECURITY DEFINER.
-- Always writes the account row, under its lock: a deduction that read the old zone and
-- waits for that lock then finds an open window and only adds to it.
CREATE FUNCTION keen_users_timezone_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    UPDATE credit_accounts a
       SET spent_day = keen_spend_in_window(a.spent_day, a.spend_day_end, now()),
           spend_day_end = keen_spend_window_rezoned('day', a.spend_day_end, NEW.timezone,
                                                     now()),
           spent_month = keen_spend_in_window(a.spent_month, a.spend_month_end, now()),
           spend_month_end = keen_spend_window_rezoned('month', a.spend_month_end,
                                                       NEW.timezone, now()),
           updated_at = now()
     WHERE a.user_id = NEW.id;
    RETURN NULL;
END $$;
ALTER FUNCTION keen_users_timezone_changed() OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_users_timezone_changed() FROM PUBLIC;
CREATE TRIGGER users_spend_windows AFTER UPDATE OF timezone ON users FOR EACH ROW
    WHEN (OLD.timezone IS DISTINCT FROM NEW.timezone)
    EXECUTE FUNCTION keen_users_timezone_changed();

-- === Shared pieces of the money functions =====================================================
-- Run only inside the SECURITY DEFINER functions below (whose pinned search_path they
-- inherit); keen_app cannot call them.

-- Defence in depth: the Python layer refuses these first, but keen_app could call the
-- functions directly. Returns the value at 6 dp.
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
END $$;
ALTER FUNCTION keen_money_check(numeric, text, boolean) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_money_check(numeric, text, boolean) FROM PUBLIC;

-- The caller acts on p_user's account: their own, or any account when they are an admin.
-- Someone else's account reads as missing (NotFound), as RLS would show it.
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
END $$;
ALTER FUNCTION keen_ledger_authorize(uuid) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_ledger_authorize(uuid) FROM PUBLIC;

-- Runs only when a conditional UPDATE found nothing: say why the charge does not fit (as
-- keen_credit_fits decides), or return when it fits after all (a concurrent purchase committed
-- meanwhile; the caller then retries once, holding the lock). p_limit_credits NULL: no limit
-- applies.
CREATE FUNCTION keen_ledger_refuse(p_account uuid, p_credits numeric, p_limit_credits numeric,
                                   p_attempt integer) RETURNS void
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
        v_spent := keen_spend_in_window(a.spent_day, a.spend_day_end, now());
        IF v_spent + a.held_amount + p_limit_credits > a.daily_limit THEN
            RAISE EXCEPTION 'daily spending limit % reached', a.daily_limit
                USING ERRCODE = 'KS461', DETAIL = json_build_object(
                    'period', 'day', 'limit', a.daily_limit::text, 'spent', v_spent::text,
                    'held', a.held_amount::text, 'required', p_limit_credits::text,
                    'window_end',
                    CASE WHEN now() < a.spend_day_end THEN a.spend_day_end END)::text;
        END IF;
    END IF;
    IF a.monthly_limit IS NOT NULL AND p_limit_credits IS NOT NULL THEN
        v_spent := keen_spend_in_window(a.spent_month, a.spend_month_end, now());
        IF v_spent + a.held_amount + p_limit_credits > a.monthly_limit THEN
            RAISE EXCEPTION 'monthly spending limit % reached', a.monthly_limit
                USING ERRCODE = 'KS461', DETAIL = json_build_object(
                    'period', 'month', 'limit', a.monthly_limit::text,
                    'spent', v_spent::text, 'held', a.held_amount::text,
                    'required', p_limit_credits::text,
                    'window_end',
                    CASE WHEN now() < a.spend_month_end THEN a.spend_month_end END)::text;
        END IF;
    END IF;
END $$;
ALTER FUNCTION keen_ledger_refuse(uuid, numeric, numeric, integer) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_ledger_refuse(uuid, numeric, numeric, integer) FROM PUBLIC;

-- Take p_credits from a root session's budget, atomically, or raise SessionBudgetExceeded.
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
END $$;
ALTER FUNCTION keen_budget_take(uuid, numeric) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_budget_take(uuid, numeric) FROM PUBLIC;

-- Give credits back to a root's budget (settle below estimate, release, expiry, refund).
-- Clamped at 0: a budget set after some charges must not go negative on their refund.
CREATE FUNCTION keen_budget_give_back(p_root uuid, p_credits numeric) RETURNS void
LANGUAGE sql
AS $$
    UPDATE agent_sessions SET budget_used = greatest(budget_used - p_credits, 0)
     WHERE id = p_root AND p_credits > 0 AND credit_budget IS NOT NULL
$$;
ALTER FUNCTION keen_budget_give_back(uuid, numeric) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_budget_give_back(uuid, numeric) FROM PUBLIC;

-- Resolve a session (by row id or by its handle) for p_user. Another user's session reads
-- as missing. Returns the session's row id, its root and the root's budget (NULL: none).
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
END $$;
ALTER FUNCTION keen_ledger_session(uuid, uuid, text) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_ledger_session(uuid, uuid, text) FROM PUBLIC;

-- A retry with the same key returns the original row; the same key with other parameters
-- is a conflict. The advisory lock makes concurrent first attempts wait for each other (the
-- next statement's snapshot then sees the winner's row).
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
END $$;
ALTER FUNCTION keen_ledger_replay(uuid, text, text) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_ledger_replay(uuid, text, text) FROM PUBLIC;

-- Exactly one request per crossing: the balance went from >= threshold to < threshold in
-- this change (serialised by the account row lock, so old = new + charged is exact).
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
END $$;
ALTER FUNCTION keen_ledger_recharge_check(credit_transactions, numeric) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_ledger_recharge_check(credit_transactions, numeric) FROM PUBLIC;

-- An admin / unlimited account's charge: a zero-amount row that keeps the provider cost.
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
END $$;
ALTER FUNCTION keen_ledger_bypass(uuid, uuid, numeric, numeric, uuid, text, text, text, uuid)
    OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_ledger_bypass(uuid, uuid, numeric, numeric, uuid, text, text, text, uuid)
    FROM PUBLIC;

-- Who acts in the billing context: app.current_user_id, set by billing_transaction(). When
-- set it must be an active admin; p_required: the change needs one (adjustments, the price).
CREATE FUNCTION keen_billing_actor(p_required boolean) RETURNS uuid
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_actor uuid := keen_current_user_id();
BEGIN
    IF v_actor IS NULL THEN
        IF p_required THEN
            RAISE EXCEPTION 'an admin must act for this change' USING ERRCODE = 'KS403';
        END IF;
        RETURN NULL;
    END IF;
    IF NOT keen_is_admin() THEN
        RAISE EXCEPTION 'only an active admin may act in the billing context'
            USING ERRCODE = 'KS403';
    END IF;
    RETURN v_actor;
END $$;
ALTER FUNCTION keen_billing_actor(boolean) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_billing_actor(boolean) FROM PUBLIC;

-- === Deductions ===============================================================================
-- THE deduction: validation, authorization, the balance and limits check and the charge, the
-- ledger row, in one call. No SECURITY DEFINER frame and no pinned search_path of its own (a
-- GUC save/restore per call, ~5% of a batched item's server time): it runs only inside the
-- SECURITY DEFINER functions that pin the path (the single call and the batch), and only its
-- owner may execute it. p_markup comes from those callers, which read credit_pricing.
CREATE FUNCTION keen_credit_deduct_core(p_user uuid, p_cost numeric, p_markup numeric,
                                        p_session uuid, p_session_handle text,
                                        p_description text, p_key text)
RETURNS credit_transactions
LANGUAGE plpgsql
AS $$
DECLARE
    v_cost numeric := p_cost;
    v_credits numeric;
    v_account uuid;
    v_bypass boolean;
    v_balance numeric;
    v_seq bigint;
    v_recharge boolean;
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
    IF p_markup IS NULL THEN
        RAISE EXCEPTION 'ledger: no markup configured (credit_pricing is empty)';
    END IF;
    IF v_cost * p_markup > 999999999999.999999 THEN
        RAISE EXCEPTION 'claude_cost_usd x markup is out of range' USING ERRCODE = 'KS422',
            DETAIL = json_build_object('field', 'claude_cost_usd')::text;
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
    -- Admin bypass counts against a session budget at its notional value.
    IF v_budget IS NOT NULL THEN
        PERFORM keen_budget_take(v_root, v_credits);
    END IF;
    LOOP
        -- Check and charge in one statement (its row lock serialises charges on the
        -- account; a concurrent change is re-checked before it applies).
        UPDATE credit_accounts a
           SET current_balance = a.current_balance - v_credits,
               lifetime_spent = a.lifetime_spent + v_credits,
               last_sequence = a.last_sequence + 1,
               spent_day = keen_spend_in_window(a.spent_day, a.spend_day_end, now())
                           + v_credits,
               spend_day_end = keen_spend_window_end('day', a.spend_day_end, u.timezone,
                                                     now()),
               spent_month = keen_spend_in_window(a.spent_month, a.spend_month_end, now())
                             + v_credits,
               spend_month_end = keen_spend_window_end('month', a.spend_month_end,
                                                       u.timezone, now()),
               updated_at = now()
          FROM users u
         WHERE a.user_id = p_user AND u.id = p_user
           AND NOT (a.unlimited_credits OR a.bypass_billing
                    OR (u.is_admin AND u.account_status = 'active'))
           AND keen_credit_fits(v_credits, a.current_balance, a.held_amount, a.daily_limit, a.spent_day, a.spend_day_end, a.monthly_limit, a.spent_month, a.spend_month_end, now())
        RETURNING a.id, a.current_balance, a.last_sequence,
                  a.auto_recharge_enabled AND a.current_balance < a.auto_recharge_threshold
                  AND a.current_balance + v_credits >= a.auto_recharge_threshold
             INTO v_account, v_balance, v_seq, v_recharge;
        EXIT WHEN FOUND;
        -- Not charged: a missing account, an admin / unlimited one, or a refusal.
        SELECT a.id, a.unlimited_credits OR a.bypass_billing
                     OR (u.is_admin AND u.account_status = 'active')
          INTO v_account, v_bypass
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
        PERFORM keen_ledger_refuse(v_account, v_credits, v_credits, v_attempt);
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
END $$;
ALTER FUNCTION keen_credit_deduct_core(uuid, numeric, numeric, uuid, text, text, text)
    OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_credit_deduct_core(uuid, numeric, numeric, uuid, text, text, text)
    FROM PUBLIC;

-- The tenant's deduction: the price is the server's, read here.
CREATE FUNCTION keen_credit_deduct(p_user uuid, p_cost numeric, p_session uuid,
                                   p_session_handle text, p_description text, p_key text)
RETURNS credit_transactions
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_markup numeric;
BEGIN
    SELECT p.markup INTO v_markup FROM credit_pricing p;
    RETURN keen_credit_deduct_core(p_user, p_cost, v_markup, p_session, p_session_handle,
                                   p_description, p_key);
END $$;
ALTER FUNCTION keen_credit_deduct(uuid, numeric, uuid, text, text, text) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_credit_deduct(uuid, numeric, uuid, text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_credit_deduct(uuid, numeric, uuid, text, text, text) TO keen_app;

-- Many callers' deductions in one statement and one commit (system context only: a tenant
-- transaction acts as one user). Each item runs keen_credit_deduct_core in its own
-- subtransaction as its own user (app.current_user_id is set per item), so one item's refusal
-- is returned as that item's error and undoes only that item; the fixed cost of a transaction
-- is paid once per batch. At most 50 items: beyond 64 subtransactions a backend's subxid cache
-- overflows and every snapshot in the cluster then has to consult pg_subtrans.
CREATE FUNCTION keen_credit_deduct_many(p_users uuid[], p_costs numeric[], p_handles text[],
                                        p_descriptions text[], p_keys text[])
RETURNS TABLE (ord integer, error_state text, error_message text, error_detail text,
               error_constraint text, tx credit_transactions)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    n integer := coalesce(cardinality(p_users), 0);
    v_markup numeric;
BEGIN
    IF n > 50 OR coalesce(cardinality(p_costs), 0) <> n
       OR coalesce(cardinality(p_handles), 0) <> n
       OR coalesce(cardinality(p_descriptions), 0) <> n
       OR coalesce(cardinality(p_keys), 0) <> n THEN
        RAISE EXCEPTION 'a batch holds 0 to 50 deductions, every array as long'
            USING ERRCODE = 'KS400';
    END IF;
    SELECT p.markup INTO v_markup FROM credit_pricing p;
    -- Lock order (0005): every key lock, then every budget row, then the accounts.
    PERFORM pg_advisory_xact_lock(hashtextextended('keen_ledger:' || k.account || ':'
                                                   || k.key, 0))
       FROM (SELECT DISTINCT a.user_id, a.id AS account, i.key
               FROM unnest(p_users, p_keys) AS i(user_id, key)
               JOIN credit_accounts a ON a.user_id = i.user_id
              WHERE i.key IS NOT NULL
              ORDER BY a.user_id, i.key) AS k;
    PERFORM 1 FROM agent_sessions r
      WHERE r.credit_budget IS NOT NULL
        AND r.id IN (SELECT coalesce(s.root_session_id, s.id)
                       FROM unnest(p_users, p_handles) AS i(user_id, handle)
                       JOIN agent_sessions s ON s.session_id = i.handle
                                            AND s.user_id = i.user_id)
      ORDER BY r.id
      FOR NO KEY UPDATE OF r;
    FOR i IN 1 .. n LOOP
        ord := i;
        BEGIN
            PERFORM set_config('app.current_user_id', p_users[i]::text, true);
            tx := keen_credit_deduct_core(p_users[i], p_costs[i], v_markup, NULL,
                                          p_handles[i], p_descriptions[i], p_keys[i]);
            error_state := NULL;
            error_message := NULL;
            error_detail := NULL;
            error_constraint := NULL;
        EXCEPTION WHEN OTHERS THEN  -- never QUERY_CANCELED: a cancel ends the whole batch
            GET STACKED DIAGNOSTICS error_state = RETURNED_SQLSTATE,
                                    error_message = MESSAGE_TEXT,
                                    error_detail = PG_EXCEPTION_DETAIL,
                                    error_constraint = CONSTRAINT_NAME;
            tx := NULL;
        END;
        RETURN NEXT;
    END LOOP;
    PERFORM set_config('app.current_user_id', '', true);
END $$;
ALTER FUNCTION keen_credit_deduct_many(uuid[], numeric[], text[], text[], text[])
    OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_credit_deduct_many(uuid[], numeric[], text[], text[], text[])
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_credit_deduct_many(uuid[], numeric[], text[], text[], text[])
    TO keen_system;

-- === Holds ====================================================================================
-- A hold reserves estimated credits from the available balance (and the session budget), at
-- the server's price. Spending limits count active holds as already spent.
CREATE FUNCTION keen_credit_reserve(p_user uuid, p_cost numeric, p_session uuid,
                                    p_session_handle text, p_ttl interval,
                                    p_description text, p_key text)
RETURNS credit_holds
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_cost numeric := p_cost;
    v_markup numeric;
    v_credits numeric;
    v_account uuid;
    v_bypass boolean := false;
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
        v_cost := keen_money_check(p_cost, 'claude_cost_usd', false);
    END IF;
    IF p_ttl IS NULL OR p_ttl <= interval '0' OR p_ttl > interval '1 day' THEN
        RAISE EXCEPTION 'hold ttl must be between 0 and 1 day' USING ERRCODE = 'KS400';
    END IF;
    SELECT p.markup INTO v_markup FROM credit_pricing p;
    IF v_markup IS NULL THEN
        RAISE EXCEPTION 'ledger: no markup configured (credit_pricing is empty)';
    END IF;
    IF v_cost * v_markup > 999999999999.999999 THEN
        RAISE EXCEPTION 'claude_cost_usd x markup is out of range'
            USING ERRCODE = 'KS422',
            DETAIL = json_build_object('field', 'claude_cost_usd')::text;
    END IF;
    v_credits := keen_credits_for(v_cost, v_markup);
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
        v_fp := md5(concat_ws('|', 'hold', round(v_cost, 6)::text, v_session::text,
                              p_ttl::text, p_description));
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
          FROM users u
         WHERE a.user_id = p_user AND u.id = p_user
           AND NOT (a.unlimited_credits OR a.bypass_billing
                    OR (u.is_admin AND u.account_status = 'active'))
           AND keen_credit_fits(v_credits, a.current_balance, a.held_amount, a.daily_limit, a.spent_day, a.spend_day_end, a.monthly_limit, a.spent_month, a.spend_month_end, now())
        RETURNING a.id INTO v_account;
        EXIT WHEN FOUND;
        SELECT a.id, a.unlimited_credits OR a.bypass_billing
                     OR (u.is_admin AND u.account_status = 'active')
          INTO v_account, v_bypass
          FROM credit_accounts a JOIN users u ON u.id = a.user_id
         WHERE a.user_id = p_user;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'no credit account for this user' USING ERRCODE = 'KS404';
        END IF;
        EXIT WHEN v_bypass;
        v_attempt := v_attempt + 1;
        PERFORM keen_ledger_refuse(v_account, v_credits, v_credits, v_attempt);
    END LOOP;
    INSERT INTO credit_holds
        (user_id, account_id, session_id, budget_root_id, estimated_claude_cost_usd,
         keen_markup_multiplier, estimated_credits, amount, is_admin_bypass, description,
         expires_at, idempotency_key, idempotency_fingerprint)
    VALUES (p_user, v_account, v_session, CASE WHEN v_budget IS NOT NULL THEN v_root END,
            v_cost, v_markup, v_credits, CASE WHEN v_bypass THEN 0 ELSE v_credits END,
            v_bypass, p_description, now() + p_ttl, p_key, v_fp)
    RETURNING * INTO h;
    RETURN h;
END $$;
ALTER FUNCTION keen_credit_reserve(uuid, numeric, uuid, text, interval, text, text)
    OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_credit_reserve(uuid, numeric, uuid, text, interval, text, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_credit_reserve(uuid, numeric, uuid, text, interval, text, text)
    TO keen_app;

-- Charges the actual cost (at the hold's recorded markup) and frees the rest of the hold,
-- deciding the admin bypass when it charges, not from the hold (an admin demoted since
-- reserving pays). Up to the reserved credits the charge always succeeds; the part the hold did
-- not reserve is charged only if it fits (balance, limits and budget, as for a deduction), else
-- the error leaves the hold active and unchanged.
-- Its charging UPDATE repeats the deduction's (keen_credit_deduct_core), the spend-window
-- columns included, on purpose: each is one statement that checks and charges under the row's
-- lock, and PL/pgSQL cannot share a statement between functions without a call per charge.
-- The window rule itself is written once (keen_spend_in_window, keen_spend_window_end).
CREATE FUNCTION keen_credit_settle(p_hold uuid, p_cost numeric, p_description text)
RETURNS credit_transactions
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    h credit_holds%ROWTYPE;
    v_cost numeric := p_cost;
    v_credits numeric;
    v_excess numeric;
    v_balance numeric;
    v_seq bigint;
    v_recharge boolean;
    v_attempt integer := 0;
    v_uncovered numeric;
    v_bypass boolean := false;
    t credit_transactions%ROWTYPE;
BEGIN
    IF v_cost IS NULL OR v_cost <= 0 OR v_cost > 999999999999.999999
       OR v_cost <> round(v_cost, 6) THEN
        v_cost := keen_money_check(p_cost, 'claude_cost_usd', false);
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
        RAISE EXCEPTION 'claude_cost_usd x markup is out of range' USING ERRCODE = 'KS422';
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
    -- Who pays is decided now, as for a deduction, not when the hold was made: an admin
    -- demoted (or suspended) since reserving pays like any user, and an account that has
    -- become admin / unlimited pays nothing. v_uncovered: the part of the charge the hold
    -- did not reserve (its excess; all of it for a hold made as a bypass, which held 0).
    v_uncovered := v_credits - h.amount;
    LOOP
        -- Up to the reserved credits this always fits (they were held); the rest is
        -- checked like a deduction.
        UPDATE credit_accounts a
           SET current_balance = a.current_balance - v_credits,
               held_amount = a.held_amount - h.amount,
               lifetime_spent = a.lifetime_spent + v_credits,
               last_sequence = a.last_sequence + 1,
               spent_day = keen_spend_in_window(a.spent_day, a.spend_day_end, now())
                           + v_credits,
               spend_day_end = keen_spend_window_end('day', a.spend_day_end, u.timezone,
                                                     now()),
               spent_month = keen_spend_in_window(a.spent_month, a.spend_month_end, now())
                             + v_credits,
               spend_month_end = keen_spend_window_end('month', a.spend_month_end,
                                                       u.timezone, now()),
               updated_at = now()
          FROM users u
         WHERE a.id = h.account_id AND u.id = h.user_id
           AND NOT (a.unlimited_credits OR a.bypass_billing
                    OR (u.is_admin AND u.account_status = 'active'))
           AND (v_uncovered <= 0 OR keen_credit_fits(v_uncovered, a.current_balance, a.held_amount, a.daily_limit, a.spent_day, a.spend_day_end, a.monthly_limit, a.spent_month, a.spend_month_end, now()))
        RETURNING a.current_balance, a.last_sequence,
                  a.auto_recharge_enabled AND a.current_balance < a.auto_recharge_threshold
                  AND a.current_balance + v_credits >= a.auto_recharge_threshold
             INTO v_balance, v_seq, v_recharge;
        EXIT WHEN FOUND;
        -- Not charged: an admin / unlimited account now, or a refusal.
        SELECT a.unlimited_credits OR a.bypass_billing
               OR (u.is_admin AND u.account_status = 'active')
          INTO v_bypass
          FROM credit_accounts a JOIN users u ON u.id = a.user_id
         WHERE a.id = h.account_id;
        EXIT WHEN v_bypass;
        v_attempt := v_attempt + 1;
        PERFORM keen_ledger_refuse(h.account_id, v_uncovered, v_uncovered, v_attempt);
    END LOOP;
    IF v_bypass THEN
        IF h.amount > 0 THEN  -- reserved before the account stopped paying: free it
            UPDATE credit_accounts SET held_amount = held_amount - h.amount,
                                       updated_at = now()
             WHERE id = h.account_id;
        END IF;
        t := keen_ledger_bypass(h.user_id, h.account_id, v_cost, h.keen_markup_multiplier,
                                h.session_id, coalesce(p_description, h.description),
                                NULL, NULL, h.id);
    ELSE
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
END $$;
ALTER FUNCTION keen_credit_settle(uuid, numeric, text) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_credit_settle(uuid, numeric, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_credit_settle(uuid, numeric, text) TO keen_app;

-- Frees an active hold. Releasing a released or expired hold returns it unchanged.
CREATE FUNCTION keen_credit_release(p_hold uuid) RETURNS credit_holds
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
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
END $$;
ALTER FUNCTION keen_credit_release(uuid) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_credit_release(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_credit_release(uuid) TO keen_app;

-- The sweep (system only): frees holds past their expiry. SKIP LOCKED lets several
-- sweepers, and settles in flight, pass each other.
CREATE FUNCTION keen_credit_expire_holds(p_limit integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
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
END $$;
ALTER FUNCTION keen_credit_expire_holds(integer) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_credit_expire_holds(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_credit_expire_holds(integer) TO keen_system;

-- === Money in: keen_billing only ==============================================================
-- Minting and the price are keen_billing's alone, not even their owner's (keen_ledger).
-- A purchase, recorded by the billing context (the payment webhook, once the provider's
-- signature is checked). The row records the price in force.
CREATE FUNCTION keen_credit_purchase(p_user uuid, p_amount numeric, p_description text,
                                     p_stripe text, p_key text)
RETURNS credit_transactions
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_actor uuid := keen_billing_actor(false);
    v_amount numeric;
    v_account uuid;
    v_balance numeric;
    v_seq bigint;
    v_fp text;
    t credit_transactions%ROWTYPE;
BEGIN
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
         keen_markup_multiplier, stripe_payment_intent_id, description, metadata,
         sequence_number, idempotency_key, idempotency_fingerprint)
    VALUES (p_user, v_account, 'purchase', v_amount, v_balance,
            (SELECT p.markup FROM credit_pricing p), p_stripe, p_description,
            CASE WHEN v_actor IS NULL THEN '{}'::jsonb
                 ELSE jsonb_build_object('admin_user_id', v_actor) END,
            v_seq, p_key, v_fp)
    RETURNING * INTO t;
    RETURN t;
END $$;
ALTER FUNCTION keen_credit_purchase(uuid, numeric, text, text, text) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_credit_purchase(uuid, numeric, text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_credit_purchase(uuid, numeric, text, text, text) TO keen_billing;
REVOKE EXECUTE ON FUNCTION keen_credit_purchase(uuid, numeric, text, text, text) FROM keen_ledger;

-- Refunds a usage row, never beyond what it charged (across all its refunds): the account
-- row lock serialises refunds of one transaction, and the sum is read after taking it. Any
-- account; an acting admin is recorded when given.
CREATE FUNCTION keen_credit_refund(p_user uuid, p_transaction uuid, p_amount numeric,
                                   p_reason text, p_key text)
RETURNS credit_transactions
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_actor uuid := keen_billing_actor(false);
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
    IF p_amount IS NOT NULL THEN
        v_amount := keen_money_check(p_amount, 'amount', false);
    END IF;
    SELECT * INTO o FROM credit_transactions WHERE id = p_transaction;
    IF NOT FOUND OR o.user_id IS DISTINCT FROM p_user THEN
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
         keen_markup_multiplier, session_id, description, metadata, sequence_number,
         idempotency_key, idempotency_fingerprint, refunded_transaction_id)
    VALUES (p_user, o.account_id, 'refund', v_amount, v_balance, o.keen_markup_multiplier,
            o.session_id, p_reason,
            CASE WHEN v_actor IS NULL THEN '{}'::jsonb
                 ELSE jsonb_build_object('admin_user_id', v_actor) END,
            v_seq, p_key, v_fp, o.id)
    RETURNING * INTO t;
    IF v_budget IS NOT NULL THEN
        PERFORM keen_budget_give_back(v_root, v_amount);
    END IF;
    RETURN t;
END $$;
ALTER FUNCTION keen_credit_refund(uuid, uuid, numeric, text, text) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_credit_refund(uuid, uuid, numeric, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_credit_refund(uuid, uuid, numeric, text, text) TO keen_billing;
REVOKE EXECUTE ON FUNCTION keen_credit_refund(uuid, uuid, numeric, text, text) FROM keen_ledger;

-- A signed correction, an admin acting (checked and recorded). It cannot take credits that
-- holds have reserved.
CREATE FUNCTION keen_credit_adjust(p_user uuid, p_amount numeric, p_reason text,
                                   p_key text)
RETURNS credit_transactions
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_actor uuid := keen_billing_actor(true);
    v_amount numeric;
    v_account uuid;
    v_balance numeric;
    v_seq bigint;
    v_fp text;
    v_attempt integer := 0;
    t credit_transactions%ROWTYPE;
BEGIN
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
        PERFORM keen_ledger_refuse(v_account, -v_amount, NULL, v_attempt);
    END LOOP;
    INSERT INTO credit_transactions
        (user_id, account_id, transaction_type, amount, balance_after,
         keen_markup_multiplier, description, metadata, sequence_number, idempotency_key,
         idempotency_fingerprint)
    VALUES (p_user, v_account, 'adjustment', v_amount, v_balance,
            (SELECT p.markup FROM credit_pricing p), p_reason,
            jsonb_build_object('admin_user_id', v_actor), v_seq, p_key, v_fp)
    RETURNING * INTO t;
    IF v_amount < 0 THEN
        PERFORM keen_ledger_recharge_check(t, -v_amount);
    END IF;
    RETURN t;
END $$;
ALTER FUNCTION keen_credit_adjust(uuid, numeric, text, text) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_credit_adjust(uuid, numeric, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_credit_adjust(uuid, numeric, text, text) TO keen_billing;
REVOKE EXECUTE ON FUNCTION keen_credit_adjust(uuid, numeric, text, text) FROM keen_ledger;

-- The price, changed by an admin in the billing context; the audit trigger on credit_pricing
-- records the old and new values, the reason, the admin and the role.
CREATE FUNCTION keen_credit_set_markup(p_markup numeric, p_reason text)
RETURNS credit_pricing
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_actor uuid := keen_billing_actor(true);
    r credit_pricing%ROWTYPE;
BEGIN
    IF p_markup IS NULL OR NOT (p_markup > 0 AND p_markup < 100)
       OR p_markup <> round(p_markup, 2) THEN
        RAISE EXCEPTION 'markup must be between 0.01 and 99.99, in hundredths'
            USING ERRCODE = 'KS422', DETAIL = json_build_object('field', 'markup')::text;
    END IF;
    IF p_reason IS NULL OR length(btrim(p_reason)) = 0 OR length(p_reason) > 1000 THEN
        RAISE EXCEPTION 'a reason of 1 to 1000 characters is required'
            USING ERRCODE = 'KS400', DETAIL = json_build_object('field', 'reason')::text;
    END IF;
    UPDATE credit_pricing
       SET markup = p_markup, reason = p_reason, changed_by = v_actor, updated_at = now()
    RETURNING * INTO r;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'ledger: credit_pricing has no row';
    END IF;
    RETURN r;
END $$;
ALTER FUNCTION keen_credit_set_markup(numeric, text) OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_credit_set_markup(numeric, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_credit_set_markup(numeric, text) TO keen_billing;
REVOKE EXECUTE ON FUNCTION keen_credit_set_markup(numeric, text) FROM keen_ledger;

-- === Verification =============================================================================
-- The checks of `keen-stream ledger verify`, one row per problem (system only: it reads
-- every account).
CREATE FUNCTION keen_ledger_verify()
RETURNS TABLE (account_id uuid, user_id uuid, problem text, expected text, actual text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
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
$$;
ALTER FUNCTION keen_ledger_verify() OWNER TO keen_ledger;
REVOKE ALL ON FUNCTION keen_ledger_verify() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_ledger_verify() TO keen_system;
