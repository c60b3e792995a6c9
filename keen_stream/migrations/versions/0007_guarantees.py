"""Guarantees: trusted schemas only, no tenant temp objects, money authority, deletions, time zones.

Revision ID: 0007_guarantees
Revises: 0006_stream_latency
Create Date: 2026-11-30

1. Every SECURITY DEFINER function (and every function that pins a schema list) searches
   ``pg_catalog, public, pg_temp``. Left unnamed, ``pg_temp`` is searched FIRST for tables and
   types: a temp table called ``users`` or ``credit_transactions`` was what functions owned by
   keen_system read and wrote. Tenants lose TEMP on the database (it came through PUBLIC), and
   the DAL resets a pooled session after every transaction (keen_stream/dal/database.py).
2. Only an active admin may delete a user row, and nobody but the system role a super-admin's;
   nor may tenant code give or take the super_admin role (it would demote, then delete).
3. Money authority moves to the server: the markup lives in ``credit_pricing`` (one row,
   changed only by ``keen_credit_set_markup``, every change audited) and no function tenant
   code may execute takes one; purchases, refunds, adjustments and the price are executable
   only by the new role ``keen_billing`` (``db.billing``), adjustments and price changes only
   with an admin acting, whom the database checks and records. The price starts as the
   operator's markup (``keen-stream migrate --markup``, ``-x markup=``, ``KEEN_CREDIT_MARKUP``,
   else 5.00), never one read from the ledger (tenants chose theirs before 0007); active holds
   at another markup take it. Separation of duties: the new role ``keen_ledger`` (nobody acts
   as it) owns every function of the ledger and alone writes the money tables; ``keen_system``
   (maintenance, registration) reads them, opens accounts through ``keen_credit_open_account``,
   and can no longer reprice, mint, or grant itself EXECUTE on the minting functions. A
   settle decides the admin bypass when it charges, not from the hold: an admin demoted since
   reserving pays.
4. The spending limits count spend in windows with an absolute end (``spend_day_end``,
   ``spend_month_end``) instead of a local date, so a change of time zone cannot reset them:
   it can only make the open window longer. The rule is written once, in SQL functions the
   planner inlines (``keen_spend_in_window``, ``keen_spend_window_end``, ``keen_credit_fits``).
   A time zone must be a zone name (``pg_timezone_names``), as the DAL requires: a POSIX spec
   can jump 23 hours and open a new daily window an hour after the last.

docs/schema.md and docs/ledger.md explain each. The downgrade restores 0001's, 0002's and
0005's definitions from those migrations' own text.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import ModuleType

from alembic import context, op

revision = "0007_guarantees"
down_revision = "0006_stream_latency"
branch_labels = None
depends_on = None

SAFE_PATH = "pg_catalog, public, pg_temp"
OLD_PATH = "pg_catalog, public"
DEFINER = f"SECURITY DEFINER SET search_path = {SAFE_PATH}"

# Signatures that change (drop and create) or are new.
OLD = {
    "deduct": "keen_credit_deduct(uuid, numeric, numeric, uuid, text, text, text)",
    "deduct_many": "keen_credit_deduct_many(uuid[], numeric[], numeric, text[], text[], text[])",
    "reserve": "keen_credit_reserve(uuid, numeric, numeric, uuid, text, interval, text, text)",
    "purchase": "keen_credit_purchase(uuid, numeric, numeric, text, text, text)",
    "adjust": "keen_credit_adjust(uuid, numeric, numeric, text, text)",
    "refuse": "keen_ledger_refuse(uuid, numeric, numeric, date, date, integer)",
}
NEW = {
    "deduct": "keen_credit_deduct(uuid, numeric, uuid, text, text, text)",
    "deduct_many": "keen_credit_deduct_many(uuid[], numeric[], text[], text[], text[])",
    "reserve": "keen_credit_reserve(uuid, numeric, uuid, text, interval, text, text)",
    "purchase": "keen_credit_purchase(uuid, numeric, text, text, text)",
    "adjust": "keen_credit_adjust(uuid, numeric, text, text)",
    "refuse": "keen_ledger_refuse(uuid, numeric, numeric, integer)",
    "set_markup": "keen_credit_set_markup(numeric, text)",
    "actor": "keen_billing_actor(boolean)",
    "in_window": "keen_spend_in_window(numeric, timestamptz, timestamptz)",
    "window_end": "keen_spend_window_end(text, timestamptz, text, timestamptz)",
    "rezoned": "keen_spend_window_rezoned(text, timestamptz, text, timestamptz)",
    "fits": "keen_credit_fits(numeric, numeric, numeric, numeric, numeric, timestamptz, numeric,"
    " numeric, timestamptz, timestamptz)",
    "rezone_trigger": "keen_users_timezone_changed()",
    "open_account": "keen_credit_open_account(uuid, boolean)",
    "admin_changed": "keen_users_admin_changed()",
}
REFUND = "keen_credit_refund(uuid, uuid, numeric, text, text)"
SETTLE = "keen_credit_settle(uuid, numeric, text)"
CORE = "keen_credit_deduct_core(uuid, numeric, numeric, uuid, text, text, text)"
#: The functions that create or give back money, and the price: keen_billing's alone.
MINTING = (NEW["purchase"], NEW["adjust"], NEW["set_markup"], REFUND)
#: Every function of the ledger (0002's, 0005's and this migration's): owned by keen_ledger.
LEDGER_FUNCTIONS = sorted(
    {
        "keen_credit_account_valid",
        "keen_credit_transaction_valid",
        "keen_credits_for",
        "keen_money_check",
        "keen_ledger_authorize",
        "keen_ledger_refuse",
        "keen_budget_take",
        "keen_budget_give_back",
        "keen_ledger_session",
        "keen_ledger_replay",
        "keen_ledger_recharge_check",
        "keen_ledger_bypass",
        "keen_credit_deduct",
        "keen_credit_deduct_core",
        "keen_credit_deduct_many",
        "keen_credit_purchase",
        "keen_credit_refund",
        "keen_credit_adjust",
        "keen_credit_reserve",
        "keen_credit_settle",
        "keen_credit_release",
        "keen_credit_expire_holds",
        "keen_ledger_verify",
        *(signature.split("(")[0] for signature in NEW.values()),
    }
)

# --- 1. trusted schemas, no tenant temp objects -------------------------------------------
# Database-level grants (current_database(): a database-level statement names its database).
# keen_system keeps TEMP: REFRESH MATERIALIZED VIEW CONCURRENTLY builds its diff in a temp table.
# They are not copied by CREATE DATABASE ... TEMPLATE: tests/conftest.py runs them on copies.
DATABASE_GRANTS = [
    """
    DO $$ BEGIN
        EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
        EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO keen_system', current_database());
    END $$
    """,
]
DATABASE_GRANTS_DOWN = [
    """
    DO $$ BEGIN
        EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM keen_system', current_database());
        EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO PUBLIC', current_database());
    END $$
    """,
]


def _repin(old: str, new: str) -> str:
    """Every function of this schema pinned to ``old`` gets ``new`` instead."""
    return f"""
    DO $$
    DECLARE
        f regprocedure;
    BEGIN
        FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
                  WHERE p.pronamespace = 'public'::regnamespace
                    AND 'search_path={old}' = ANY (p.proconfig) LOOP
            EXECUTE format('ALTER FUNCTION %s SET search_path = {new}', f);
        END LOOP;
    END $$
    """


# --- 2. the billing role ------------------------------------------------------------------
ROLES = [
    # keen_billing: the one role that may mint credits (purchases, refunds, adjustments) and set
    # the price. Reached only through KeenDatabase.billing_transaction() (db.billing): the
    # payment webhook and admin tools, never a tenant transaction.
    """
    DO $$ BEGIN
        CREATE ROLE keen_billing NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE
            NOINHERIT;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END $$
    """,
    """
    DO $$ BEGIN
        IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
            EXECUTE format('GRANT keen_billing TO %I', current_user);
        END IF;
    END $$
    """,
    "GRANT USAGE ON SCHEMA public TO keen_billing",
    # keen_ledger: owns the ledger's functions and alone writes the money tables, so that
    # keen_system (every db.system_transaction(): registration, the hub's maintenance loops)
    # can neither write a balance, a ledger row, a hold or the price, nor, as the owner of the
    # minting functions, grant itself EXECUTE on them. Nobody acts as keen_ledger: it is
    # reached only as the owner of SECURITY DEFINER functions (NOLOGIN, NOINHERIT, member of
    # nothing). BYPASSRLS because those functions act across tenants by design (the batch
    # charges many users, billing credits any account, the expiry sweep and verify read every
    # account) and read users / agent_sessions inside tenant transactions: every tenant table
    # FORCEs RLS with policies for keen_app only, so without it they would see no rows. It
    # had the same attribute as keen_system, the owner it replaces, for the same reason.
    # Creating a BYPASSRLS role needs a superuser (a DBA may create it beforehand).
    """
    DO $$ BEGIN
        CREATE ROLE keen_ledger NOLOGIN NOSUPERUSER BYPASSRLS NOCREATEDB NOCREATEROLE
            NOINHERIT;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END $$
    """,
    # The migrating role must be a member to hand it ownership (as for the other roles).
    """
    DO $$ BEGIN
        IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
            EXECUTE format('GRANT keen_ledger TO %I', current_user);
        END IF;
    END $$
    """,
    "GRANT USAGE ON SCHEMA public TO keen_ledger",
]
ROLES_DOWN = [
    "REVOKE ALL ON SCHEMA public FROM keen_billing, keen_ledger",
    """
    DO $$ BEGIN
        DROP ROLE IF EXISTS keen_billing;
    EXCEPTION WHEN dependent_objects_still_exist OR insufficient_privilege THEN NULL;
    END $$
    """,
    """
    DO $$ BEGIN
        DROP ROLE IF EXISTS keen_ledger;
    EXCEPTION WHEN dependent_objects_still_exist OR insufficient_privilege THEN NULL;
    END $$
    """,
]

# --- 3. who may delete users --------------------------------------------------------------
DELETE_POLICY = [
    "DROP POLICY users_delete ON users",
    # Deleting a user erases an account (and is refused once it has ledger history: the
    # append-only ledger stops the cascade). Users ask; admins do it; a super-admin row is the
    # system role's alone (it bypasses RLS), so no admin, and no super-admin, removes it.
    "CREATE POLICY users_delete ON users FOR DELETE TO keen_app"
    " USING ((SELECT keen_is_admin()) AND role <> 'super_admin')",
]
DELETE_POLICY_DOWN = [
    "DROP POLICY users_delete ON users",
    "CREATE POLICY users_delete ON users FOR DELETE TO keen_app"
    " USING (id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))",
]

# --- 3b. who may make or unmake a super-admin ----------------------------------------------
# 0001's guard let a super-admin change a super-admin's role from tenant context, so the
# delete policy above (which reads the role when the DELETE runs) could be walked around in
# one transaction: demote the row, then delete it as an admin's. Now the super_admin role is
# given and taken only outside tenant context (the system role, `keen-stream create-admin`);
# a super-admin still manages the other columns of a super-admin's row (status, privileges).
USERS_GUARD = [
    """
    CREATE OR REPLACE FUNCTION keen_users_guard() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        IF current_user = 'keen_app'
           AND (OLD.role = 'super_admin') IS DISTINCT FROM (NEW.role = 'super_admin') THEN
            RAISE EXCEPTION 'the super_admin role is given and taken only by the system role'
                USING ERRCODE = 'KS403';
        END IF;
        IF current_user = 'keen_app'
           AND (NEW.role, NEW.is_admin, NEW.admin_privileges, NEW.account_status,
                NEW.email_verified, NEW.email, NEW.username)
               IS DISTINCT FROM
               (OLD.role, OLD.is_admin, OLD.admin_privileges, OLD.account_status,
                OLD.email_verified, OLD.email, OLD.username)
           AND NOT (SELECT public.keen_is_admin()) THEN
            RAISE EXCEPTION 'only an admin may change role, status, email or privileges'
                USING ERRCODE = 'KS403';
        END IF;
        -- A plain admin must not suspend or impersonate the super-admin.
        IF current_user = 'keen_app'
           AND OLD.role = 'super_admin'
           AND (NEW.role, NEW.is_admin, NEW.admin_privileges, NEW.account_status, NEW.email)
               IS DISTINCT FROM
               (OLD.role, OLD.is_admin, OLD.admin_privileges, OLD.account_status, OLD.email)
           AND coalesce((SELECT u.role FROM public.users u
                          WHERE u.id = public.keen_current_user_id()), '') <> 'super_admin' THEN
            RAISE EXCEPTION 'only a super_admin may change a super_admin'
                USING ERRCODE = 'KS403';
        END IF;
        RETURN NEW;
    END $$
    """,
]

# --- 3c. time zones: zone names only -------------------------------------------------------
# 0001 accepted whatever AT TIME ZONE accepts, POSIX specs included: 'AAA0BBB-23,J335/1,J365/0'
# is UTC jumping 23 hours ahead on 1 December, and a window rule that adds "a day" in local
# time then opens a new daily window one hour after the last. The DAL accepts IANA names only
# (ZoneInfo); the database now accepts only the zone names PostgreSQL knows (pg_timezone_names,
# what the DAL's names are drawn from), refused as KS400 (InvalidInput). pg_timezone_names
# reads the zone directory (~20 ms): the trigger fires only on INSERT and UPDATE OF timezone,
# and skips the default 'UTC' and an unchanged value.
TIMEZONE_CHECK = [
    # No pinned path (as 0001's): it names pg_catalog's view, and a GUC per insert is waste.
    """
    CREATE OR REPLACE FUNCTION keen_users_check_timezone() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.timezone = 'UTC'
           OR (TG_OP = 'UPDATE' AND NEW.timezone IS NOT DISTINCT FROM OLD.timezone) THEN
            RETURN NEW;
        END IF;
        IF NEW.timezone IS NULL OR NOT EXISTS (
               SELECT 1 FROM pg_catalog.pg_timezone_names z WHERE z.name = NEW.timezone) THEN
            RAISE EXCEPTION 'unknown time zone % (a zone name such as Europe/Paris)',
                NEW.timezone USING ERRCODE = 'KS400',
                DETAIL = json_build_object('field', 'timezone')::text;
        END IF;
        RETURN NEW;
    END $$
    """,
]
# Rows written before 0007 with something else (raw SQL could store a POSIX spec) go back to
# UTC. Run after the functions: users_spend_windows then moves the account's windows by the
# rule of a zone change (never earlier, never a fresh limit). Audited like any change of users.
TIMEZONE_ROWS = [
    """
    UPDATE users u SET timezone = 'UTC'
     WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_timezone_names z WHERE z.name = u.timezone)
    """,
]

# --- 3d. free charges follow the user row ---------------------------------------------------
# An account's unlimited_credits / bypass_billing make its charges free (admin_bypass rows).
# They are an active admin's alone (keen_credit_open_account sets them only then), so they go
# when the user stops being one: demoted, suspended or deactivated, whoever changes the row (an
# admin in tenant context, the system role). Left set, a demoted admin, or a user the system
# role made admin for a moment, kept paying nothing. An admin made active again needs no flag:
# an active admin's charges are free by the charge rule itself.
UNLIMITED_FOLLOWS_ADMIN = [
    f"""
    CREATE FUNCTION keen_users_admin_changed() RETURNS trigger
    LANGUAGE plpgsql {DEFINER}
    AS $$
    BEGIN
        UPDATE credit_accounts a
           SET unlimited_credits = false, bypass_billing = false, updated_at = now()
         WHERE a.user_id = NEW.id AND (a.unlimited_credits OR a.bypass_billing);
        RETURN NULL;
    END $$
    """,
    "CREATE TRIGGER users_unlimited_follows_admin"
    " AFTER UPDATE OF role, is_admin, account_status ON users FOR EACH ROW"
    " WHEN (NOT (NEW.is_admin AND NEW.account_status = 'active'))"
    " EXECUTE FUNCTION keen_users_admin_changed()",
]
# Accounts that are free already without an active admin behind them.
UNLIMITED_ROWS = [
    """
    UPDATE credit_accounts a
       SET unlimited_credits = false, bypass_billing = false, updated_at = now()
      FROM users u
     WHERE u.id = a.user_id AND (a.unlimited_credits OR a.bypass_billing)
       AND NOT (u.is_admin AND u.account_status = 'active')
    """,
]

# --- 4. spend windows ---------------------------------------------------------------------
# In place (same column positions, so the downgrade gives back exactly the table it found).
WINDOW_COLUMNS = [
    # The end of each local day / month the counters held, first as if every zone were UTC...
    "ALTER TABLE credit_accounts"
    " ALTER COLUMN spend_day TYPE TIMESTAMP WITH TIME ZONE"
    "   USING (spend_day + 1)::timestamp AT TIME ZONE 'UTC',"
    " ALTER COLUMN spend_month TYPE TIMESTAMP WITH TIME ZONE"
    "   USING (spend_month + interval '1 month') AT TIME ZONE 'UTC'",
    # ... then that local midnight read in the user's zone.
    """
    UPDATE credit_accounts a
       SET spend_day = (a.spend_day AT TIME ZONE 'UTC') AT TIME ZONE u.timezone,
           spend_month = (a.spend_month AT TIME ZONE 'UTC') AT TIME ZONE u.timezone
      FROM users u
     WHERE u.id = a.user_id AND (a.spend_day IS NOT NULL OR a.spend_month IS NOT NULL)
    """,
    "ALTER TABLE credit_accounts RENAME COLUMN spend_day TO spend_day_end",
    "ALTER TABLE credit_accounts RENAME COLUMN spend_month TO spend_month_end",
]
WINDOW_COLUMNS_DOWN = [
    "ALTER TABLE credit_accounts RENAME COLUMN spend_day_end TO spend_day",
    "ALTER TABLE credit_accounts RENAME COLUMN spend_month_end TO spend_month",
    # An open window counts as today's / this month's spend, an ended one as its last day's;
    # each local date is written as its midnight UTC for the type change below.
    """
    UPDATE credit_accounts a
       SET spend_day = (CASE WHEN now() < a.spend_day
                             THEN (now() AT TIME ZONE u.timezone)::date
                             ELSE ((a.spend_day AT TIME ZONE u.timezone)
                                   - interval '1 microsecond')::date END)::timestamp
                       AT TIME ZONE 'UTC',
           spend_month = date_trunc('month', CASE WHEN now() < a.spend_month
                             THEN now() AT TIME ZONE u.timezone
                             ELSE (a.spend_month AT TIME ZONE u.timezone)
                                  - interval '1 microsecond' END)
                         AT TIME ZONE 'UTC'
      FROM users u
     WHERE u.id = a.user_id AND (a.spend_day IS NOT NULL OR a.spend_month IS NOT NULL)
    """,
    "ALTER TABLE credit_accounts"
    " ALTER COLUMN spend_day TYPE DATE USING (spend_day AT TIME ZONE 'UTC')::date,"
    " ALTER COLUMN spend_month TYPE DATE USING (spend_month AT TIME ZONE 'UTC')::date",
]

# --- 5. the price -------------------------------------------------------------------------
PRICING = [
    """
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
    )
    """,
    # The price has no owning user: the audit rows' user_id stays NULL (admins read them).
    "CREATE TRIGGER credit_pricing_audit AFTER INSERT OR UPDATE OR DELETE ON credit_pricing"
    " FOR EACH ROW EXECUTE FUNCTION keen_audit('no_owner')",
    # (The row is seeded by _seed_pricing: the operator's markup, read when the upgrade runs.)
    "REVOKE ALL ON credit_pricing FROM PUBLIC",
    "GRANT SELECT ON credit_pricing TO keen_app, keen_system, keen_billing",
    # Written only by keen_credit_set_markup (owned by keen_ledger, see LEDGER).
]

#: The price before 0007 when KEEN_CREDIT_MARKUP was not set (0006's settings default).
DEFAULT_MARKUP = Decimal("5.00")


def operator_markup() -> tuple[Decimal, str]:
    """The markup the operator configured before 0007, and where it came from.

    Before 0007 the price was the KEEN_CREDIT_MARKUP setting (default 5.00), which the DAL passed
    to every charge. The ledger cannot tell us what it was: tenant code could pass its own markup
    (the hole 0007 closes), so the newest charge may be a tenant's 0.01. The operator says it,
    in order: ``keen-stream migrate --markup`` (``config.attributes["credit_markup"]``),
    ``alembic -x markup=...``, the KEEN_CREDIT_MARKUP environment variable the old release read;
    else 0006's default. A value that is not a price (0.01 to 99.99, in hundredths) stops the
    upgrade rather than guess.
    """
    sources = (
        ("keen-stream migrate --markup", context.config.attributes.get("credit_markup")),
        ("-x markup", context.get_x_argument(as_dictionary=True).get("markup")),
        ("KEEN_CREDIT_MARKUP", os.environ.get("KEEN_CREDIT_MARKUP")),
    )
    for source, raw in sources:
        if raw is None or str(raw).strip() == "":
            continue
        try:
            markup = Decimal(str(raw).strip())
        except InvalidOperation:
            markup = Decimal("NaN")
        if not (
            markup.is_finite()
            and Decimal("0") < markup < Decimal("100")
            and markup == markup.quantize(Decimal("0.01"))
        ):
            raise RuntimeError(
                f"migration 0007: {source} = {raw!r} is not a markup (0.01 to 99.99, in hundredths)"
            )
        return markup.quantize(Decimal("0.01")), source
    return DEFAULT_MARKUP, "the default"


def _seed_pricing(markup: Decimal, source: str) -> list[str]:
    """The one credit_pricing row, and the active holds re-priced at it."""
    reason = f"the operator''s markup at migration 0007 ({source})"  # '' : an SQL literal
    return [
        # markup is a validated Decimal of at most 4 digits: safe to write as a literal.
        f"INSERT INTO credit_pricing (markup, reason) VALUES ({markup}, '{reason}')",
        # A hold records its markup and is settled at it (a price change never reprices a call
        # in flight). Before 0007 a tenant chose that markup: an active hold reserved at 0.01
        # would settle any actual cost, up to a day after the upgrade, at 0.01. Every active
        # hold whose markup is not the server's now takes the server's. What it reserved
        # (amount, estimated_credits, the budget taken) is unchanged, so balances, held_amount
        # and budgets stay exactly as they were (ledger verify holds); the settle charges the
        # actual cost at the server's price, any part above what was reserved checked like a
        # deduction (balance, limits, budget).
        """
        UPDATE credit_holds h SET keen_markup_multiplier = p.markup
          FROM credit_pricing p
         WHERE h.status = 'active' AND h.keen_markup_multiplier <> p.markup
        """,
    ]


# --- 6. the rules, written once -----------------------------------------------------------
# Plain SQL functions without SECURITY DEFINER or a pinned path, so the planner inlines them
# into the statements that call them (a pinned path would forbid it): no call per row, and the
# same text in the deduction, the hold, the settle, the refusal and the DAL's reads. They
# name no table (nothing to resolve in any schema). IMMUTABLE: every time-zone conversion they
# use is (PostgreSQL's own timezone(text, ...) is).
HELPERS = [
    # Spend of a window that is still open at p_now; an ended window's spend no longer counts.
    """
    CREATE FUNCTION keen_spend_in_window(p_spent numeric, p_end timestamptz, p_now timestamptz)
    RETURNS numeric
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT CASE WHEN p_now < p_end THEN p_spent ELSE 0 END $$
    """,
    # Where the window a charge at p_now counts in ends (p_unit 'day' or 'month'; p_end: the
    # account's current window end, NULL for none). An open window keeps its end. Otherwise the
    # new window ends at the first local midnight (first of a month) of p_tz that is at least a
    # day (a month) after the previous window's end: in a fixed zone that is simply the end of
    # today (this month); a user who changes zones can never get windows closer together than
    # a day (a month) apart, i.e. never more limits in a stretch of time than a user who stays.
    """
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
    $$
    """,
    # The window after the user's zone changes to p_tz: an open window ends at the later of its
    # end and the end of the new zone's current day (month), so the spend already made counts
    # for the rest of the new "today"; an ended one is replaced by the (empty) window a charge
    # now would open. Never earlier, never a fresh limit.
    """
    CREATE FUNCTION keen_spend_window_rezoned(p_unit text, p_end timestamptz, p_tz text,
                                              p_now timestamptz)
    RETURNS timestamptz
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
        SELECT greatest(public.keen_spend_window_end(p_unit, p_end, p_tz, p_now),
                        public.keen_spend_window_end(p_unit, NULL, p_tz, p_now))
    $$
    """,
    # THE "can this account pay p_credits now" rule: the available balance (active holds
    # reserved) and both limits, active holds counting as spent. Admin / unlimited accounts are
    # decided by the callers (they pay nothing).
    """
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
    $$
    """,
]

# The window columns a charge writes, shared by the deduction and the settle.
_CHARGE_WINDOWS = """
                   spent_day = keen_spend_in_window(a.spent_day, a.spend_day_end, now())
                               + v_credits,
                   spend_day_end = keen_spend_window_end('day', a.spend_day_end, u.timezone,
                                                         now()),
                   spent_month = keen_spend_in_window(a.spent_month, a.spend_month_end, now())
                                 + v_credits,
                   spend_month_end = keen_spend_window_end('month', a.spend_month_end,
                                                           u.timezone, now()),"""


def _fits(credits: str) -> str:
    return (
        f"keen_credit_fits({credits}, a.current_balance, a.held_amount, a.daily_limit,"
        " a.spent_day, a.spend_day_end, a.monthly_limit, a.spent_month, a.spend_month_end,"
        " now())"
    )


# --- 7. the money functions ---------------------------------------------------------------
FUNCTIONS = [
    # Runs only when a conditional UPDATE found nothing: say why the charge does not fit (as
    # keen_credit_fits decides), or return when it fits after all (the caller retries once).
    """
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
    END $$
    """,
    # Who acts in the billing context: app.current_user_id, set by billing_transaction(). When
    # set it must be an active admin; p_required: the change needs one (adjustments, the price).
    """
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
    END $$
    """,
    # 0002's deduction with the spend windows. p_markup comes from the callers, which read it
    # from credit_pricing; nobody else may execute this function.
    f"""
    CREATE OR REPLACE FUNCTION keen_credit_deduct_core(p_user uuid, p_cost numeric,
                                                       p_markup numeric, p_session uuid,
                                                       p_session_handle text,
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
                   last_sequence = a.last_sequence + 1,{_CHARGE_WINDOWS}
                   updated_at = now()
              FROM users u
             WHERE a.user_id = p_user AND u.id = p_user
               AND NOT (a.unlimited_credits OR a.bypass_billing
                        OR (u.is_admin AND u.account_status = 'active'))
               AND {_fits("v_credits")}
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
    END $$
    """,
    # The tenant's deduction: the price is the server's, read here.
    f"""
    CREATE FUNCTION keen_credit_deduct(p_user uuid, p_cost numeric, p_session uuid,
                                       p_session_handle text, p_description text, p_key text)
    RETURNS credit_transactions
    LANGUAGE plpgsql {DEFINER}
    AS $$
    DECLARE
        v_markup numeric;
    BEGIN
        SELECT p.markup INTO v_markup FROM credit_pricing p;
        RETURN keen_credit_deduct_core(p_user, p_cost, v_markup, p_session, p_session_handle,
                                       p_description, p_key);
    END $$
    """,
    # 0005's batch, reading the price once per batch.
    f"""
    CREATE FUNCTION keen_credit_deduct_many(p_users uuid[], p_costs numeric[], p_handles text[],
                                            p_descriptions text[], p_keys text[])
    RETURNS TABLE (ord integer, error_state text, error_message text, error_detail text,
                   error_constraint text, tx credit_transactions)
    LANGUAGE plpgsql {DEFINER}
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
    END $$
    """,
    # 0002's hold with the server's price and the spend windows.
    f"""
    CREATE FUNCTION keen_credit_reserve(p_user uuid, p_cost numeric, p_session uuid,
                                        p_session_handle text, p_ttl interval,
                                        p_description text, p_key text)
    RETURNS credit_holds
    LANGUAGE plpgsql {DEFINER}
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
               AND {_fits("v_credits")}
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
    END $$
    """,
    # 0002's settle with the spend windows (it keeps the hold's recorded markup), deciding the
    # admin bypass when it settles.
    f"""
    CREATE OR REPLACE FUNCTION keen_credit_settle(p_hold uuid, p_cost numeric,
                                                  p_description text)
    RETURNS credit_transactions
    LANGUAGE plpgsql {DEFINER}
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
                   last_sequence = a.last_sequence + 1,{_CHARGE_WINDOWS}
                   updated_at = now()
              FROM users u
             WHERE a.id = h.account_id AND u.id = h.user_id
               AND NOT (a.unlimited_credits OR a.bypass_billing
                        OR (u.is_admin AND u.account_status = 'active'))
               AND (v_uncovered <= 0 OR {_fits("v_uncovered")})
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
    END $$
    """,
    # A purchase, recorded by the billing context (the payment webhook, once the provider's
    # signature is checked). The row records the price in force.
    f"""
    CREATE FUNCTION keen_credit_purchase(p_user uuid, p_amount numeric, p_description text,
                                         p_stripe text, p_key text)
    RETURNS credit_transactions
    LANGUAGE plpgsql {DEFINER}
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
                CASE WHEN v_actor IS NULL THEN '{{}}'::jsonb
                     ELSE jsonb_build_object('admin_user_id', v_actor) END,
                v_seq, p_key, v_fp)
        RETURNING * INTO t;
        RETURN t;
    END $$
    """,
    # 0002's refund in the billing context: any account, an acting admin recorded when given.
    f"""
    CREATE OR REPLACE FUNCTION keen_credit_refund(p_user uuid, p_transaction uuid,
                                                  p_amount numeric, p_reason text, p_key text)
    RETURNS credit_transactions
    LANGUAGE plpgsql {DEFINER}
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
                CASE WHEN v_actor IS NULL THEN '{{}}'::jsonb
                     ELSE jsonb_build_object('admin_user_id', v_actor) END,
                v_seq, p_key, v_fp, o.id)
        RETURNING * INTO t;
        IF v_budget IS NOT NULL THEN
            PERFORM keen_budget_give_back(v_root, v_amount);
        END IF;
        RETURN t;
    END $$
    """,
    # 0002's adjustment in the billing context, an admin acting (checked and recorded).
    f"""
    CREATE FUNCTION keen_credit_adjust(p_user uuid, p_amount numeric, p_reason text,
                                       p_key text)
    RETURNS credit_transactions
    LANGUAGE plpgsql {DEFINER}
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
    END $$
    """,
    # The price, changed by an admin in the billing context; the audit trigger on the table
    # records the old and new values, the reason, the admin and the role.
    f"""
    CREATE FUNCTION keen_credit_set_markup(p_markup numeric, p_reason text)
    RETURNS credit_pricing
    LANGUAGE plpgsql {DEFINER}
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
    END $$
    """,
    # Registration opens an account (balance 0), and create-admin makes an admin's account
    # unlimited: keen_system may do both through this function and may not write
    # credit_accounts otherwise. Unlimited only for an active admin (the flag follows the
    # role, which users_audit records).
    f"""
    CREATE FUNCTION keen_credit_open_account(p_user uuid, p_unlimited boolean) RETURNS uuid
    LANGUAGE plpgsql {DEFINER}
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
    END $$
    """,
    # keen_app may change users.timezone but not the account's windows: SECURITY DEFINER.
    # Always writes the account row, under its lock: a deduction that read the old zone and
    # waits for that lock then finds an open window and only adds to it.
    f"""
    CREATE FUNCTION keen_users_timezone_changed() RETURNS trigger
    LANGUAGE plpgsql {DEFINER}
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
    END $$
    """,
    "CREATE TRIGGER users_spend_windows AFTER UPDATE OF timezone ON users FOR EACH ROW"
    " WHEN (OLD.timezone IS DISTINCT FROM NEW.timezone)"
    " EXECUTE FUNCTION keen_users_timezone_changed()",
    *UNLIMITED_FOLLOWS_ADMIN,
]


def _grants() -> list[str]:
    who = {
        NEW["deduct"]: "keen_app",
        NEW["reserve"]: "keen_app",
        NEW["deduct_many"]: "keen_system",
        NEW["open_account"]: "keen_system",
        # Inlined into the DAL's balance reads, which run as keen_app.
        NEW["in_window"]: "keen_app, keen_system",
        NEW["window_end"]: "keen_app, keen_system",
        NEW["rezoned"]: "keen_app, keen_system",
        NEW["fits"]: "keen_app, keen_system",
        **{signature: "keen_billing" for signature in MINTING},
    }
    out = []
    for signature in NEW.values():
        out.append(f"REVOKE EXECUTE ON FUNCTION {signature} FROM PUBLIC")
        out.append(f"ALTER FUNCTION {signature} OWNER TO keen_ledger")
    # 0002 gave keen_app the refund.
    out.append(f"REVOKE EXECUTE ON FUNCTION {REFUND} FROM keen_app")
    out += [f"GRANT EXECUTE ON FUNCTION {s} TO {roles}" for s, roles in who.items()]
    return out


# --- 8. the ledger role: separation of duties ---------------------------------------------
# keen_ledger owns every function of the ledger and alone may write the money tables; the
# functions keep their grants (an owner change carries them over). keen_system keeps SELECT
# (verify counts, the DAL's system reads) and loses every write; it reaches money only by
# executing what it is granted: the batch, expire_holds, verify, open_account.
_MONEY_TABLES = "credit_accounts, credit_transactions, credit_holds, credit_pricing"
LEDGER = [
    # Ownership: 0002's and 0005's functions (keen_system's until now; this migration's own
    # were given to keen_ledger by _grants).
    f"""
    DO $$
    DECLARE
        f regprocedure;
    BEGIN
        FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
                  WHERE p.pronamespace = 'public'::regnamespace
                    AND p.proowner = 'keen_system'::regrole
                    AND p.proname = ANY (ARRAY{LEDGER_FUNCTIONS!r}::text[]) LOOP
            EXECUTE format('ALTER FUNCTION %s OWNER TO keen_ledger', f);
        END LOOP;
    END $$
    """,
    # An owner change replaces the old owner's entry: keen_system's EXECUTE on what 0002
    # granted it (folded into its owner entry until now) is given back explicitly.
    "GRANT EXECUTE ON FUNCTION keen_ledger_verify(), keen_credit_expire_holds(integer),"
    " keen_credits_for(numeric, numeric), keen_credit_account_valid(credit_accounts),"
    " keen_credit_transaction_valid(credit_transactions) TO keen_system",
    # Minting and the price are keen_billing's alone, not even their owner's.
    *(f"REVOKE EXECUTE ON FUNCTION {signature} FROM keen_ledger" for signature in MINTING),
    # What the functions write and read. (Triggers on these tables that write elsewhere,
    # keen_audit and the stream capture, are SECURITY DEFINER functions of keen_system.)
    "GRANT SELECT, INSERT, UPDATE ON credit_accounts, credit_holds TO keen_ledger",
    "GRANT SELECT, INSERT ON credit_transactions TO keen_ledger",
    "GRANT SELECT, UPDATE (markup, reason, changed_by, updated_at) ON credit_pricing"
    " TO keen_ledger",
    # The auto-recharge queue: written by the charges, resolved by the billing service as
    # keen_system (it holds no money), which keeps its grants.
    "GRANT SELECT, INSERT ON credit_auto_recharge_requests TO keen_ledger",
    # Session budgets (taken and given back under the root row's lock).
    "GRANT SELECT, UPDATE (budget_used) ON agent_sessions TO keen_ledger",
    # Who is an admin, their zone (no secrets).
    "GRANT SELECT (id, email, username, display_name, avatar_url, role, is_admin,"
    " admin_privileges, email_verified, account_status, mfa_enabled, timezone, preferences,"
    " created_at, updated_at, last_login_at, last_login_ip) ON users TO keen_ledger",
    "GRANT EXECUTE ON FUNCTION keen_current_user_id(), keen_is_admin() TO keen_ledger",
    f"REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {_MONEY_TABLES} FROM keen_system",
]
LEDGER_DOWN = [
    """
    DO $$
    DECLARE
        f regprocedure;
    BEGIN
        FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
                  WHERE p.pronamespace = 'public'::regnamespace
                    AND p.proowner = 'keen_ledger'::regrole LOOP
            EXECUTE format('ALTER FUNCTION %s OWNER TO keen_system', f);
        END LOOP;
    END $$
    """,
    "REVOKE ALL ON credit_accounts, credit_transactions, credit_holds,"
    " credit_auto_recharge_requests, agent_sessions, users FROM keen_ledger",
    "REVOKE ALL ON FUNCTION keen_current_user_id(), keen_is_admin() FROM keen_ledger",
    # 0001's and 0002's grants (credit_pricing goes with the downgrade).
    "GRANT SELECT, INSERT, UPDATE, DELETE ON credit_accounts, credit_transactions, credit_holds"
    " TO keen_system",
]


UPGRADE = [
    *ROLES,
    *DATABASE_GRANTS,
    *DELETE_POLICY,
    *USERS_GUARD,
    *TIMEZONE_CHECK,
    *WINDOW_COLUMNS,
    *PRICING,
    *HELPERS,
    *(f"DROP FUNCTION {signature}" for signature in OLD.values()),
    *FUNCTIONS,
    *_grants(),
    *LEDGER,
    _repin(OLD_PATH, SAFE_PATH),
    *TIMEZONE_ROWS,
    *UNLIMITED_ROWS,
]


def _earlier(name: str) -> ModuleType:
    """An earlier revision's module: the downgrade restores definitions from their own text."""
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"keen_migration_{name}", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load migration {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _definition(statements: list[str], name: str, *, replace: bool = False) -> str:
    """The one CREATE FUNCTION statement of ``name`` in ``statements``."""
    found = [s for s in statements if f"CREATE FUNCTION {name}(" in s]
    if len(found) != 1:
        raise RuntimeError(f"expected one definition of {name}, found {len(found)}")
    text = found[0]
    return text.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1) if replace else text


def _downgrade_statements() -> list[str]:
    foundation = _earlier("0001_foundation")
    ledger = _earlier("0002_ledger")
    batch = _earlier("0005_ledger_batch")
    functions = ledger.HELPERS + ledger.MONEY_FUNCTIONS
    restored = (
        "keen_ledger_refuse",
        "keen_credit_purchase",
        "keen_credit_adjust",
        "keen_credit_reserve",
    )

    def grants(*names: str) -> list[str]:
        return [s for s in ledger._grants() if any(f" {name}(" in s for name in names)]

    return [
        *LEDGER_DOWN,
        "DROP TRIGGER users_spend_windows ON users",
        "DROP TRIGGER users_unlimited_follows_admin ON users",
        *(f"DROP FUNCTION {signature}" for signature in NEW.values()),
        *WINDOW_COLUMNS_DOWN,
        # 0002's deduction comes back under its own name, then 0005 splits it again.
        f"DROP FUNCTION {CORE}",
        _definition(functions, "keen_credit_deduct"),
        *grants("keen_credit_deduct"),
        *batch.CORE,
        *(s for s in batch.UPGRADE if s not in batch.CORE and s not in batch.TOUCH),
        *(_definition(functions, name) for name in restored),
        _definition(functions, "keen_credit_refund", replace=True),
        _definition(functions, "keen_credit_settle", replace=True),
        f"REVOKE EXECUTE ON FUNCTION {REFUND} FROM keen_billing",
        f"GRANT EXECUTE ON FUNCTION {REFUND} TO keen_system",
        *grants(*restored, "keen_credit_refund"),
        "DROP TABLE credit_pricing",
        *DELETE_POLICY_DOWN,
        _definition(foundation.FUNCTIONS, "keen_users_guard", replace=True),
        _definition(foundation.FUNCTIONS, "keen_users_check_timezone", replace=True),
        _repin(SAFE_PATH, OLD_PATH),
        *DATABASE_GRANTS_DOWN,
        *ROLES_DOWN,
    ]


# The markup most of the last charges recorded: never the price (tenants could choose theirs
# before 0007), only a hint that the operator forgot to give one.
RECENT_MARKUP = """
    SELECT keen_markup_multiplier FROM (
        SELECT t.keen_markup_multiplier FROM credit_transactions t
         WHERE t.transaction_type = 'usage' ORDER BY t.created_at DESC LIMIT 1000) recent
     GROUP BY keen_markup_multiplier ORDER BY count(*) DESC LIMIT 1
"""


def _warn_if_default_differs(markup: Decimal, source: str) -> None:
    if source != "the default":
        return
    recent = op.get_bind().exec_driver_sql(RECENT_MARKUP).scalar()
    if recent is not None and Decimal(recent) != markup:
        logging.getLogger("alembic.runtime.migration").warning(
            "migration 0007 seeds the price at %s (the default; no --markup, -x markup or"
            " KEEN_CREDIT_MARKUP was given), but most recent charges were at %s. If that was"
            " this deployment's price, set it now: keen-stream ledger set-markup %s --reason ...",
            markup,
            recent,
            recent,
        )


def upgrade() -> None:
    markup, source = operator_markup()
    _warn_if_default_differs(markup, source)
    seed = _seed_pricing(markup, source)
    # The price goes in right after its table, before anything reads it.
    at = UPGRADE.index(PRICING[-1]) + 1
    for statement in [*UPGRADE[:at], *seed, *UPGRADE[at:]]:
        op.execute(statement)


def downgrade() -> None:
    for statement in _downgrade_statements():
        op.execute(statement)
