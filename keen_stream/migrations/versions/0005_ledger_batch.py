"""Batched deductions: many callers' deductions in one statement and one commit.

Revision ID: 0005_ledger_batch
Revises: 0004_events
Create Date: 2026-11-25

``keen_credit_deduct_many`` runs the deduction of 0002 (its body, unchanged, is now
``keen_credit_deduct_core``, and ``keen_credit_deduct`` a thin wrapper: there is still one
definition of a deduction) for each item of a batch, each in its own subtransaction, so one
item's refusal (insufficient credits, a limit, a budget, an idempotency conflict) is returned as
that item's error and undoes only that item. The batch commits once. TigerBeetle's design: the
fixed cost of a transaction (the statement, the commit and its WAL flush, the round trip, the
client's call) is paid once per batch instead of once per deduction.

Each item acts as its own user: the context (``app.current_user_id``) is set per item, so the
deduction's own authorization check sees exactly the user it charges. Only the system context
may call the batch (``keen_app`` has no EXECUTE): a tenant transaction acts as one user.
"""

from alembic import op

revision = "0005_ledger_batch"
down_revision = "0004_events"
branch_labels = None
depends_on = None

#: Subtransactions beyond 64 in one transaction overflow each backend's subxid cache, and every
#: snapshot in the cluster then has to consult pg_subtrans: keep batches well below it.
MAX_BATCH = 50

SIGNATURE = "keen_credit_deduct_many(uuid[], numeric[], numeric, text[], text[], text[])"
DEDUCT_ARGS = "(uuid, numeric, numeric, uuid, text, text, text)"

# The deduction's body becomes keen_credit_deduct_core: no SECURITY DEFINER frame and no pinned
# search_path of its own (a GUC save/restore per call, ~5% of a batched item's server time).
# It runs only inside SECURITY DEFINER functions that pin the path (the single-call wrapper and
# the batch), and only keen_system may execute it.
CORE = [
    f"ALTER FUNCTION keen_credit_deduct{DEDUCT_ARGS} RENAME TO keen_credit_deduct_core",
    f"ALTER FUNCTION keen_credit_deduct_core{DEDUCT_ARGS} SECURITY INVOKER RESET ALL",
    f"REVOKE EXECUTE ON FUNCTION keen_credit_deduct_core{DEDUCT_ARGS} FROM keen_app",
    """
    CREATE FUNCTION keen_credit_deduct(p_user uuid, p_cost numeric, p_markup numeric,
                                       p_session uuid, p_session_handle text, p_description text,
                                       p_key text)
    RETURNS credit_transactions
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
    BEGIN
        RETURN keen_credit_deduct_core(p_user, p_cost, p_markup, p_session, p_session_handle,
                                       p_description, p_key);
    END $$
    """,
    f"REVOKE EXECUTE ON FUNCTION keen_credit_deduct{DEDUCT_ARGS} FROM PUBLIC",
    f"ALTER FUNCTION keen_credit_deduct{DEDUCT_ARGS} OWNER TO keen_system",
    f"GRANT EXECUTE ON FUNCTION keen_credit_deduct{DEDUCT_ARGS} TO keen_app",
]
CORE_DOWN = [
    f"DROP FUNCTION IF EXISTS keen_credit_deduct{DEDUCT_ARGS}",
    f"ALTER FUNCTION keen_credit_deduct_core{DEDUCT_ARGS} RENAME TO keen_credit_deduct",
    f"ALTER FUNCTION keen_credit_deduct{DEDUCT_ARGS} SECURITY DEFINER"
    " SET search_path = pg_catalog, public",
    f"GRANT EXECUTE ON FUNCTION keen_credit_deduct{DEDUCT_ARGS} TO keen_app",
]

# Any BEFORE UPDATE row trigger makes PostgreSQL lock the row before the update (one more WAL
# record) and costs ~4% of a deduction even when its WHEN clause skips it. The money functions
# set updated_at themselves; the two tenant setters now do too (credits.py), so the
# foundation's touch trigger goes.
TOUCH = [
    "DROP TRIGGER credit_accounts_touch_updated_at ON credit_accounts",
    "GRANT UPDATE (updated_at) ON credit_accounts TO keen_app",
]
TOUCH_DOWN = [
    "REVOKE UPDATE (updated_at) ON credit_accounts FROM keen_app",
    "CREATE TRIGGER credit_accounts_touch_updated_at BEFORE UPDATE ON credit_accounts"
    " FOR EACH ROW WHEN (NEW.updated_at IS NOT DISTINCT FROM OLD.updated_at)"
    " EXECUTE FUNCTION keen_touch_updated_at()",
]

UPGRADE = [
    *CORE,
    *TOUCH,
    f"""
    CREATE FUNCTION keen_credit_deduct_many(p_users uuid[], p_costs numeric[], p_markup numeric,
                                            p_handles text[], p_descriptions text[],
                                            p_keys text[])
    RETURNS TABLE (ord integer, error_state text, error_message text, error_detail text,
                   error_constraint text, tx credit_transactions)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
    DECLARE
        n integer := coalesce(cardinality(p_users), 0);
    BEGIN
        IF n > {MAX_BATCH} OR coalesce(cardinality(p_costs), 0) <> n
           OR coalesce(cardinality(p_handles), 0) <> n
           OR coalesce(cardinality(p_descriptions), 0) <> n
           OR coalesce(cardinality(p_keys), 0) <> n THEN
            RAISE EXCEPTION 'a batch holds 0 to {MAX_BATCH} deductions, every array as long'
                USING ERRCODE = 'KS400';
        END IF;
        -- Lock order. A single deduction takes its idempotency key's advisory lock, then its
        -- session budget's root row, then its account row. A batch holds an account row from
        -- its first item on that account to its commit, so a later item's key or budget lock,
        -- taken then, would be taken after the account row: against a single call (or another
        -- batch) doing the reverse, a deadlock. So a batch first takes every key lock (by user,
        -- key), then every budget row (by id), and only then charges, items in user order (the
        -- caller sorts them): every transaction takes keys < budget rows < account rows, each
        -- kind in one order.
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
          -- the lock the budget's own UPDATE takes; FOR UPDATE would also hold off foreign-key
          -- checks on the root (a new sub-session) for the whole batch
          FOR NO KEY UPDATE OF r;
        FOR i IN 1 .. n LOOP
            ord := i;
            BEGIN
                -- Undone with the subtransaction if the item fails; lasts until the statement's
                -- transaction ends otherwise (the caller's implicit transaction).
                PERFORM set_config('app.current_user_id', p_users[i]::text, true);
                tx := keen_credit_deduct_core(p_users[i], p_costs[i], p_markup, NULL,
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
    f"REVOKE EXECUTE ON FUNCTION {SIGNATURE} FROM PUBLIC",
    f"ALTER FUNCTION {SIGNATURE} OWNER TO keen_system",
    f"GRANT EXECUTE ON FUNCTION {SIGNATURE} TO keen_system",
]

DOWNGRADE = [f"DROP FUNCTION IF EXISTS {SIGNATURE}", *TOUCH_DOWN, *CORE_DOWN]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
