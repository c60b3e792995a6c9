"""Foundation: roles, the seed's tables with constraints, RLS, triggers, audit log.

Revision ID: 0001_foundation
Revises:
Create Date: 2026-11-25

Every deviation from the seed is listed in docs/schema.md. Roles are cluster-wide: they are
created if missing and never dropped while another database still uses them.
"""

from alembic import op

revision = "0001_foundation"
down_revision = None
branch_labels = None
depends_on = None

# Tables holding a user's data: RLS is ENABLEd and FORCEd on each, with one policy per command.
TENANT_TABLES = {
    # table: the column naming the owning user
    "users": "id",
    "auth_tokens": "user_id",
    "credit_accounts": "user_id",
    "credit_transactions": "user_id",
    "agent_sessions": "user_id",
    "websocket_connections": "user_id",
    "audit_log": "user_id",
}

ROLES = [
    # keen_app: every tenant transaction runs as this role (SET LOCAL ROLE). It can never bypass
    # RLS and owns nothing, so a bug in our code cannot read across tenants.
    """
    DO $$ BEGIN
        CREATE ROLE keen_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOINHERIT;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END $$
    """,
    # keen_system: maintenance jobs and the few SECURITY DEFINER functions (login lookup, token
    # validation, audit). It bypasses RLS, so it is NOLOGIN and reached only through code paths
    # that say so (KeenDatabase.system_transaction()).
    """
    DO $$ BEGIN
        CREATE ROLE keen_system NOLOGIN NOSUPERUSER BYPASSRLS NOCREATEDB NOCREATEROLE NOINHERIT;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END $$
    """,
    # The migrating (login) role must be able to SET ROLE to both; a superuser already can.
    """
    DO $$ BEGIN
        IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
            EXECUTE format('GRANT keen_app, keen_system TO %I', current_user);
        END IF;
    END $$
    """,
]

FUNCTIONS = [
    # pitfall 5: an unset custom setting can read back as ''.
    """
    CREATE FUNCTION keen_current_user_id() RETURNS uuid
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT nullif(current_setting('app.current_user_id', true), '')::uuid $$
    """,
    """
    CREATE FUNCTION keen_touch_updated_at() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        NEW.updated_at := now();
        RETURN NEW;
    END $$
    """,
    """
    CREATE FUNCTION keen_reject_change() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
            USING ERRCODE = 'KS405';
    END $$
    """,
    # A user may edit their profile; only an admin may change role, admin flags, status or
    # verification. Column grants cannot say "only admins", so a trigger does.
    """
    CREATE FUNCTION keen_users_guard() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
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
        -- A plain admin must not suspend, demote or impersonate the super-admin, nor make one.
        IF current_user = 'keen_app'
           AND (OLD.role = 'super_admin' OR NEW.role = 'super_admin')
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
    # A token's privileges come from its owner, not from whoever inserts it; a revoked token
    # stays revoked.
    """
    CREATE FUNCTION keen_auth_tokens_guard() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            NEW.bypass_limits := coalesce(
                (SELECT u.is_admin FROM public.users u WHERE u.id = NEW.user_id), false);
        ELSIF (NOT OLD.is_active OR OLD.revoked_at IS NOT NULL)
              AND (NEW.is_active OR NEW.revoked_at IS DISTINCT FROM OLD.revoked_at) THEN
            RAISE EXCEPTION 'a revoked token cannot be reactivated' USING ERRCODE = 'KS403';
        END IF;
        RETURN NEW;
    END $$
    """,
    # The ledger computes days and months in the user's time zone: reject unknown zones early.
    """
    CREATE FUNCTION keen_users_check_timezone() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM now() AT TIME ZONE NEW.timezone;
        RETURN NEW;
    EXCEPTION WHEN invalid_parameter_value THEN
        RAISE EXCEPTION 'unknown time zone %', NEW.timezone USING ERRCODE = 'KS400';
    END $$
    """,
    # Generic audit trigger. TG_ARGV[0] names the owning-user column. Secrets are never copied:
    # a changed secret shows as "[redacted]".
    """
    CREATE FUNCTION keen_audit() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
    DECLARE
        secret_columns CONSTANT text[] := ARRAY[
            'password_hash', 'mfa_secret', 'recovery_codes', 'email_verification_token',
            'token_hash'];
        old_row jsonb := CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END;
        new_row jsonb := CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END;
        changes jsonb := '{}'::jsonb;
        key text;
        owner_col text := TG_ARGV[0];
    BEGIN
        FOR key IN SELECT jsonb_object_keys(coalesce(new_row, old_row)) LOOP
            CONTINUE WHEN key = 'updated_at';
            IF old_row IS NULL OR new_row IS NULL
               OR (old_row -> key) IS DISTINCT FROM (new_row -> key) THEN
                IF key = ANY (secret_columns) THEN
                    changes := changes || jsonb_build_object(key, '[redacted]');
                ELSIF TG_OP = 'UPDATE' THEN
                    changes := changes || jsonb_build_object(
                        key, jsonb_build_object('old', old_row -> key, 'new', new_row -> key));
                ELSE
                    changes := changes || jsonb_build_object(
                        key, coalesce(new_row, old_row) -> key);
                END IF;
            END IF;
        END LOOP;
        IF TG_OP = 'UPDATE' AND changes = '{}'::jsonb THEN
            RETURN NULL;
        END IF;
        INSERT INTO audit_log (table_name, row_id, user_id, actor_user_id, db_role, action, changes)
        VALUES (TG_TABLE_NAME,
                (coalesce(new_row, old_row) ->> 'id')::uuid,
                (coalesce(new_row, old_row) ->> owner_col)::uuid,
                keen_current_user_id(),
                session_user || '/' || current_setting('role'),
                TG_OP,
                changes);
        RETURN NULL;
    END $$
    """,
]

TABLES = [
    """
    CREATE TABLE users (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        email VARCHAR(255) NOT NULL,
        username VARCHAR(64) NOT NULL,
        password_hash VARCHAR(255) NOT NULL,
        display_name VARCHAR(255),
        avatar_url TEXT,
        role VARCHAR(20) NOT NULL DEFAULT 'user',
        is_admin BOOLEAN NOT NULL DEFAULT FALSE,
        admin_privileges JSONB NOT NULL DEFAULT '{}',
        email_verified BOOLEAN NOT NULL DEFAULT FALSE,
        email_verification_token VARCHAR(255),
        account_status VARCHAR(20) NOT NULL DEFAULT 'active',
        mfa_enabled BOOLEAN NOT NULL DEFAULT FALSE,
        mfa_secret VARCHAR(255),
        recovery_codes TEXT[],
        timezone VARCHAR(50) NOT NULL DEFAULT 'UTC',
        preferences JSONB NOT NULL DEFAULT '{}',
        created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
        updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
        last_login_at TIMESTAMP WITH TIME ZONE,
        last_login_ip INET,
        CONSTRAINT users_email_key UNIQUE (email),
        CONSTRAINT users_username_key UNIQUE (username),
        CONSTRAINT users_email_check
            CHECK (email = lower(email) AND email ~ '^[^@[:space:]]+@[^@[:space:]]+$'),
        CONSTRAINT users_username_check CHECK (username ~ '^[A-Za-z0-9_][A-Za-z0-9_.-]{2,63}$'),
        CONSTRAINT users_role_check CHECK (role IN ('user', 'admin', 'super_admin')),
        CONSTRAINT users_is_admin_matches_role
            CHECK (is_admin = (role IN ('admin', 'super_admin'))),
        CONSTRAINT users_account_status_check
            CHECK (account_status IN ('active', 'suspended', 'deactivated', 'pending_verification')),
        CONSTRAINT users_admin_privileges_object CHECK (jsonb_typeof(admin_privileges) = 'object'),
        CONSTRAINT users_preferences_object CHECK (jsonb_typeof(preferences) = 'object'),
        CONSTRAINT users_preferences_size CHECK (pg_column_size(preferences) <= 65536),
        CONSTRAINT users_avatar_url_length CHECK (length(avatar_url) <= 2048)
    )
    """,
    "CREATE INDEX idx_users_role ON users(role)",
    "CREATE INDEX idx_users_created_at ON users(created_at)",
    """
    CREATE TABLE auth_tokens (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        token_type VARCHAR(20) NOT NULL,
        token_hash VARCHAR(255) NOT NULL,
        token_name VARCHAR(255),
        scopes TEXT[] NOT NULL DEFAULT '{}',
        expires_at TIMESTAMP WITH TIME ZONE,
        last_used_at TIMESTAMP WITH TIME ZONE,
        usage_count INTEGER NOT NULL DEFAULT 0,
        created_ip INET,
        last_used_ip INET,
        user_agent TEXT,
        is_active BOOLEAN NOT NULL DEFAULT TRUE,
        revoked_at TIMESTAMP WITH TIME ZONE,
        rate_limit_per_hour INTEGER DEFAULT 1000,
        bypass_limits BOOLEAN NOT NULL DEFAULT FALSE,
        created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
        updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
        CONSTRAINT auth_tokens_token_hash_key UNIQUE (token_hash),
        CONSTRAINT auth_tokens_token_type_check
            CHECK (token_type IN ('api_key', 'jwt_refresh', 'session')),
        CONSTRAINT auth_tokens_usage_count_check CHECK (usage_count >= 0),
        CONSTRAINT auth_tokens_rate_limit_check CHECK (rate_limit_per_hour > 0),
        CONSTRAINT auth_tokens_user_agent_length CHECK (length(user_agent) <= 1024),
        CONSTRAINT auth_tokens_revoked_inactive CHECK (revoked_at IS NULL OR NOT is_active)
    )
    """,
    "CREATE INDEX idx_auth_tokens_user_id ON auth_tokens(user_id)",
    "CREATE INDEX idx_auth_tokens_expires_at ON auth_tokens(expires_at)",
    "CREATE INDEX idx_auth_tokens_bypass_limits ON auth_tokens(bypass_limits)",
    """
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
        CONSTRAINT credit_accounts_user_id_key UNIQUE (user_id),
        CONSTRAINT credit_accounts_balance_nonnegative CHECK (current_balance >= 0),
        CONSTRAINT credit_accounts_lifetime_nonnegative
            CHECK (lifetime_purchased >= 0 AND lifetime_spent >= 0),
        CONSTRAINT credit_accounts_limits_positive
            CHECK ((daily_limit IS NULL OR daily_limit > 0)
                   AND (monthly_limit IS NULL OR monthly_limit > 0)),
        CONSTRAINT credit_accounts_recharge_positive
            CHECK ((auto_recharge_threshold IS NULL OR auto_recharge_threshold >= 0)
                   AND (auto_recharge_amount IS NULL OR auto_recharge_amount > 0))
    )
    """,
    "CREATE INDEX idx_credit_accounts_unlimited ON credit_accounts(unlimited_credits)",
    """
    CREATE TABLE agent_sessions (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        session_id VARCHAR(64) NOT NULL,
        parent_session_id UUID REFERENCES agent_sessions(id),
        root_session_id UUID REFERENCES agent_sessions(id),
        session_depth INTEGER NOT NULL DEFAULT 0,
        git_branch VARCHAR(255) NOT NULL,
        vision TEXT NOT NULL,
        working_directory TEXT NOT NULL,
        current_phase VARCHAR(20) NOT NULL DEFAULT 'EXPLORE',
        start_time TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
        end_time TIMESTAMP WITH TIME ZONE,
        last_activity_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
        iteration_count INTEGER NOT NULL DEFAULT 0,
        tool_calls_count INTEGER NOT NULL DEFAULT 0,
        claude_cost_usd NUMERIC(18,6) NOT NULL DEFAULT 0,
        keen_cost_credits NUMERIC(18,6) NOT NULL DEFAULT 0,
        tokens_used BIGINT NOT NULL DEFAULT 0,
        context_tokens_used BIGINT NOT NULL DEFAULT 0,
        files_modified TEXT[] NOT NULL DEFAULT '{}',
        files_created TEXT[] NOT NULL DEFAULT '{}',
        files_deleted TEXT[] NOT NULL DEFAULT '{}',
        execution_status VARCHAR(20) NOT NULL DEFAULT 'running',
        success BOOLEAN,
        error_message TEXT,
        completion_report JSONB,
        streaming_enabled BOOLEAN NOT NULL DEFAULT TRUE,
        websocket_connections TEXT[] NOT NULL DEFAULT '{}',
        is_admin_session BOOLEAN NOT NULL DEFAULT FALSE,
        bypass_credit_deduction BOOLEAN NOT NULL DEFAULT FALSE,
        credit_budget NUMERIC(18,6),
        budget_used NUMERIC(18,6) NOT NULL DEFAULT 0,
        created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
        updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
        CONSTRAINT agent_sessions_session_id_key UNIQUE (session_id),
        CONSTRAINT agent_sessions_session_id_check CHECK (session_id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
        CONSTRAINT agent_sessions_current_phase_check
            CHECK (current_phase IN ('EXPLORE', 'PLAN', 'SUMMON', 'COMPLETE')),
        CONSTRAINT agent_sessions_execution_status_check
            CHECK (execution_status IN ('running', 'completed', 'failed', 'cancelled', 'timed_out')),
        CONSTRAINT agent_sessions_depth_check CHECK (session_depth >= 0),
        CONSTRAINT agent_sessions_parent_depth_check
            CHECK ((parent_session_id IS NULL) = (session_depth = 0)),
        CONSTRAINT agent_sessions_counters_nonnegative
            CHECK (iteration_count >= 0 AND tool_calls_count >= 0 AND tokens_used >= 0
                   AND context_tokens_used >= 0),
        CONSTRAINT agent_sessions_costs_nonnegative
            CHECK (claude_cost_usd >= 0 AND keen_cost_credits >= 0),
        CONSTRAINT agent_sessions_budget_check
            CHECK ((credit_budget IS NULL OR credit_budget > 0) AND budget_used >= 0),
        CONSTRAINT agent_sessions_ended_check
            CHECK ((execution_status = 'running') = (end_time IS NULL))
    )
    """,
    "CREATE INDEX idx_agent_sessions_user_id ON agent_sessions(user_id)",
    "CREATE INDEX idx_agent_sessions_parent_session_id ON agent_sessions(parent_session_id)",
    "CREATE INDEX idx_agent_sessions_root_session_id ON agent_sessions(root_session_id)",
    "CREATE INDEX idx_agent_sessions_current_phase ON agent_sessions(current_phase)",
    "CREATE INDEX idx_agent_sessions_is_admin ON agent_sessions(is_admin_session)",
    "CREATE INDEX idx_agent_sessions_start_time ON agent_sessions(start_time)",
    """
    CREATE TABLE credit_transactions (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
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
        CONSTRAINT credit_transactions_type_check
            CHECK (transaction_type IN ('purchase', 'usage', 'refund', 'adjustment', 'admin_bypass')),
        CONSTRAINT credit_transactions_claude_cost_check
            CHECK (claude_cost_usd IS NULL OR claude_cost_usd >= 0),
        CONSTRAINT credit_transactions_markup_check CHECK (keen_markup_multiplier > 0),
        CONSTRAINT credit_transactions_bypass_check
            CHECK (is_admin_bypass = (transaction_type = 'admin_bypass')),
        CONSTRAINT credit_transactions_bypass_zero
            CHECK (transaction_type <> 'admin_bypass' OR amount = 0),
        CONSTRAINT credit_transactions_description_length CHECK (length(description) <= 1000)
    )
    """,
    "CREATE INDEX idx_credit_transactions_user_id ON credit_transactions(user_id)",
    "CREATE INDEX idx_credit_transactions_account_id ON credit_transactions(account_id)",
    "CREATE INDEX idx_credit_transactions_session_id ON credit_transactions(session_id)",
    "CREATE INDEX idx_credit_transactions_admin_bypass ON credit_transactions(is_admin_bypass)",
    "CREATE INDEX idx_credit_transactions_created_at ON credit_transactions(created_at)",
    """
    CREATE TABLE websocket_connections (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        session_id UUID REFERENCES agent_sessions(id) ON DELETE CASCADE,
        connection_id VARCHAR(255) NOT NULL,
        client_ip INET NOT NULL,
        user_agent TEXT,
        client_type VARCHAR(50) NOT NULL,
        connected_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
        last_ping_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
        disconnected_at TIMESTAMP WITH TIME ZONE,
        subscribed_events TEXT[] NOT NULL DEFAULT '{}',
        session_filters UUID[],
        admin_connection BOOLEAN NOT NULL DEFAULT FALSE,
        can_view_all_sessions BOOLEAN NOT NULL DEFAULT FALSE,
        connection_status VARCHAR(20) NOT NULL DEFAULT 'active',
        CONSTRAINT websocket_connections_connection_id_key UNIQUE (connection_id),
        CONSTRAINT websocket_connections_status_check
            CHECK (connection_status IN ('active', 'disconnected', 'timed_out', 'reaped')),
        CONSTRAINT websocket_connections_user_agent_length CHECK (length(user_agent) <= 1024)
    )
    """,
    "CREATE INDEX idx_websocket_connections_user_id ON websocket_connections(user_id)",
    "CREATE INDEX idx_websocket_connections_admin ON websocket_connections(admin_connection)",
    """
    CREATE TABLE daily_analytics (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        date_bucket DATE NOT NULL,
        total_users INTEGER NOT NULL DEFAULT 0,
        active_users INTEGER NOT NULL DEFAULT 0,
        new_users INTEGER NOT NULL DEFAULT 0,
        total_sessions INTEGER NOT NULL DEFAULT 0,
        successful_sessions INTEGER NOT NULL DEFAULT 0,
        failed_sessions INTEGER NOT NULL DEFAULT 0,
        avg_session_duration_minutes NUMERIC(8,2),
        total_claude_costs_usd NUMERIC(18,6) NOT NULL DEFAULT 0,
        total_credit_revenue NUMERIC(18,6) NOT NULL DEFAULT 0,
        total_credits_purchased NUMERIC(18,6) NOT NULL DEFAULT 0,
        total_credits_used NUMERIC(18,6) NOT NULL DEFAULT 0,
        total_tokens_consumed BIGINT NOT NULL DEFAULT 0,
        context_tokens_used BIGINT NOT NULL DEFAULT 0,
        total_agents_spawned INTEGER NOT NULL DEFAULT 0,
        avg_recursion_depth NUMERIC(6,2),
        max_recursion_depth INTEGER,
        admin_sessions INTEGER NOT NULL DEFAULT 0,
        admin_bypass_transactions INTEGER NOT NULL DEFAULT 0,
        created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
        updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
    )
    """,
    "CREATE UNIQUE INDEX idx_daily_analytics_date ON daily_analytics(date_bucket)",
    "CREATE INDEX idx_daily_analytics_created_at ON daily_analytics(created_at)",
    """
    CREATE TABLE audit_log (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        occurred_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
        table_name TEXT NOT NULL,
        row_id UUID,
        user_id UUID,
        actor_user_id UUID,
        db_role TEXT NOT NULL,
        action TEXT NOT NULL,
        changes JSONB NOT NULL DEFAULT '{}',
        CONSTRAINT audit_log_action_check CHECK (action IN ('INSERT', 'UPDATE', 'DELETE'))
    )
    """,
    "CREATE INDEX idx_audit_log_user_id ON audit_log(user_id, occurred_at)",
    "CREATE INDEX idx_audit_log_row ON audit_log(table_name, row_id)",
    # The seed's dashboard view, over the 24 hours before each refresh.
    """
    CREATE MATERIALIZED VIEW admin_dashboard_metrics AS
    SELECT
        date_trunc('hour', s.start_time) AS hour_bucket,
        count(*) AS sessions_started,
        count(*) FILTER (WHERE s.success = true) AS sessions_completed,
        avg(s.keen_cost_credits) AS avg_credit_cost_per_session,
        sum(s.tokens_used) AS total_tokens,
        sum(s.context_tokens_used) AS total_context_tokens,
        count(*) FILTER (WHERE s.is_admin_session = true) AS admin_sessions,
        sum(s.claude_cost_usd) AS total_claude_costs,
        avg(s.session_depth) AS avg_recursion_depth
    FROM agent_sessions s
    WHERE s.start_time >= now() - interval '24 hours'
    GROUP BY date_trunc('hour', s.start_time)
    """,
    # Unique so that REFRESH ... CONCURRENTLY works.
    "CREATE UNIQUE INDEX idx_admin_dashboard_metrics_hour ON admin_dashboard_metrics(hour_bucket)",
]

# Functions whose SQL bodies name tables (so they come after them). The pre-authentication
# lookups run before any user context exists, so they are narrow SECURITY DEFINER functions
# (owned by keen_system) instead of a wide grant to keen_app.
AUTH_FUNCTIONS = [
    # Admin status is decided by the database from the user row, never by a caller's flag.
    # SECURITY DEFINER as keen_system so the lookup does not recurse into the users policies.
    """
    CREATE FUNCTION keen_is_admin() RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
        SELECT coalesce(
            (SELECT u.is_admin AND u.account_status = 'active'
               FROM public.users u WHERE u.id = public.keen_current_user_id()),
            false)
    $$
    """,
    """
    CREATE FUNCTION keen_login_lookup(p_email text)
    RETURNS TABLE (user_id uuid, password_hash text, account_status text)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
        SELECT u.id, u.password_hash::text, u.account_status::text
          FROM public.users u WHERE u.email = lower(p_email)
    $$
    """,
    # One round trip: find the token by hash, judge it, and (p_touch) record the use.
    """
    CREATE FUNCTION keen_token_authenticate(p_hash text, p_ip inet, p_touch boolean)
    RETURNS TABLE (status text, token_id uuid, user_id uuid, token_type text, scopes text[],
                   expires_at timestamptz, is_admin boolean, bypass_limits boolean)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
    DECLARE
        t public.auth_tokens%ROWTYPE;
        u_status text;
    BEGIN
        SELECT * INTO t FROM public.auth_tokens a WHERE a.token_hash = p_hash;
        IF NOT FOUND THEN
            status := 'unknown';
            RETURN NEXT;
            RETURN;
        END IF;
        token_id := t.id; user_id := t.user_id; token_type := t.token_type;
        scopes := t.scopes; expires_at := t.expires_at; bypass_limits := t.bypass_limits;
        SELECT u.account_status, u.is_admin INTO u_status, is_admin
          FROM public.users u WHERE u.id = t.user_id;
        -- Limits bypass lasts only while the owner is still an admin.
        bypass_limits := t.bypass_limits AND is_admin;
        IF NOT t.is_active THEN
            status := 'revoked';
        ELSIF t.expires_at IS NOT NULL AND t.expires_at <= now() THEN
            status := 'expired';
        ELSIF u_status <> 'active' THEN
            status := 'inactive';
        ELSE
            status := 'ok';
            IF p_touch THEN
                UPDATE public.auth_tokens a
                   SET usage_count = a.usage_count + 1, last_used_at = now(),
                       last_used_ip = coalesce(p_ip, a.last_used_ip)
                 WHERE a.id = t.id;
            END IF;
        END IF;
        RETURN NEXT;
    END $$
    """,
]

TRIGGERS = [
    *(
        f"CREATE TRIGGER {t}_touch_updated_at BEFORE UPDATE ON {t} "
        "FOR EACH ROW EXECUTE FUNCTION keen_touch_updated_at()"
        for t in ("users", "auth_tokens", "credit_accounts", "agent_sessions", "daily_analytics")
    ),
    "CREATE TRIGGER auth_tokens_guard BEFORE INSERT OR UPDATE ON auth_tokens "
    "FOR EACH ROW EXECUTE FUNCTION keen_auth_tokens_guard()",
    "CREATE TRIGGER users_guard BEFORE UPDATE ON users "
    "FOR EACH ROW EXECUTE FUNCTION keen_users_guard()",
    "CREATE TRIGGER users_check_timezone BEFORE INSERT OR UPDATE OF timezone ON users "
    "FOR EACH ROW EXECUTE FUNCTION keen_users_check_timezone()",
    "CREATE TRIGGER users_audit AFTER INSERT OR UPDATE OR DELETE ON users "
    "FOR EACH ROW EXECUTE FUNCTION keen_audit('id')",
    "CREATE TRIGGER credit_transactions_append_only BEFORE UPDATE OR DELETE ON credit_transactions "
    "FOR EACH ROW EXECUTE FUNCTION keen_reject_change()",
    "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
    "FOR EACH ROW EXECUTE FUNCTION keen_reject_change()",
]


def _policies() -> list[str]:
    """One policy per command on every tenant table; admins (by the database's word) see all.

    The settings are wrapped in ``(SELECT ...)`` so PostgreSQL evaluates them once per statement
    (an InitPlan) instead of once per row; tenant queries also say ``WHERE user_id = $1`` so
    the planner can use the user_id index.
    """
    me = "(SELECT keen_current_user_id())"
    admin = "(SELECT keen_is_admin())"
    out: list[str] = []
    for table, owner in TENANT_TABLES.items():
        mine = f"{owner} = {me}"
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
    # Aggregates across tenants: admins only.
    out += [
        "ALTER TABLE daily_analytics ENABLE ROW LEVEL SECURITY",
        "ALTER TABLE daily_analytics FORCE ROW LEVEL SECURITY",
        f"CREATE POLICY daily_analytics_select ON daily_analytics FOR SELECT TO keen_app "
        f"USING ({admin})",
    ]
    return out


# Only what tenant code needs. Users never see password hashes or MFA secrets through keen_app;
# balances and the ledger change only through server-side functions (the ledger migration).
USER_COLUMNS_VISIBLE = (
    "id, email, username, display_name, avatar_url, role, is_admin, admin_privileges, "
    "email_verified, account_status, mfa_enabled, timezone, preferences, created_at, "
    "updated_at, last_login_at, last_login_ip"
)
GRANTS = [
    "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC",
    "REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA public FROM PUBLIC",
    "GRANT USAGE ON SCHEMA public TO keen_app, keen_system",
    f"GRANT SELECT ({USER_COLUMNS_VISIBLE}) ON users TO keen_app",
    "GRANT UPDATE (display_name, avatar_url, timezone, preferences, last_login_at, last_login_ip,"
    " role, is_admin, admin_privileges, account_status, email_verified) ON users TO keen_app",
    "GRANT DELETE ON users TO keen_app",
    "GRANT SELECT, DELETE ON auth_tokens TO keen_app",
    "GRANT INSERT (user_id, token_type, token_hash, token_name, scopes, expires_at, created_ip,"
    " user_agent) ON auth_tokens TO keen_app",
    # Usage columns are written by keen_token_authenticate (as keen_system), never by tenants.
    "GRANT UPDATE (token_name, is_active, revoked_at) ON auth_tokens TO keen_app",
    "GRANT SELECT ON credit_accounts TO keen_app",
    "GRANT UPDATE (daily_limit, monthly_limit, auto_recharge_enabled, auto_recharge_threshold,"
    " auto_recharge_amount) ON credit_accounts TO keen_app",
    "GRANT SELECT ON credit_transactions TO keen_app",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON agent_sessions TO keen_app",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON websocket_connections TO keen_app",
    "GRANT SELECT ON audit_log TO keen_app",
    "GRANT SELECT ON daily_analytics TO keen_app",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO keen_system",
    "GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO keen_system",
    "REVOKE ALL ON alembic_version FROM keen_app, keen_system",
    "GRANT EXECUTE ON FUNCTION keen_current_user_id(), keen_is_admin() TO keen_app, keen_system",
    # SECURITY DEFINER functions run as keen_system, which bypasses RLS (no policy recursion).
    "ALTER FUNCTION keen_is_admin() OWNER TO keen_system",
    "ALTER FUNCTION keen_audit() OWNER TO keen_system",
    "ALTER FUNCTION keen_login_lookup(text) OWNER TO keen_system",
    "ALTER FUNCTION keen_token_authenticate(text, inet, boolean) OWNER TO keen_system",
    # The login lookup returns a password hash: only the system context may call it.
    "GRANT EXECUTE ON FUNCTION keen_login_lookup(text) TO keen_system",
    "GRANT EXECUTE ON FUNCTION keen_token_authenticate(text, inet, boolean) TO keen_app, keen_system",
]

UPGRADE = [*ROLES, *FUNCTIONS, *TABLES, *AUTH_FUNCTIONS, *TRIGGERS, *_policies(), *GRANTS]

DOWNGRADE = [
    "DROP MATERIALIZED VIEW IF EXISTS admin_dashboard_metrics",
    "DROP TABLE IF EXISTS audit_log, daily_analytics, websocket_connections, credit_transactions,"
    " agent_sessions, credit_accounts, auth_tokens, users CASCADE",
    "DROP FUNCTION IF EXISTS keen_token_authenticate(text, inet, boolean), keen_login_lookup(text)",
    "DROP FUNCTION IF EXISTS keen_auth_tokens_guard()",
    "DROP FUNCTION IF EXISTS keen_audit(), keen_users_check_timezone(), keen_users_guard(),"
    " keen_reject_change(), keen_touch_updated_at(), keen_is_admin(), keen_current_user_id()",
    "REVOKE ALL ON SCHEMA public FROM keen_app, keen_system",
    # Roles are shared by every database in the cluster: drop them only if nothing uses them.
    """
    DO $$ BEGIN
        DROP ROLE IF EXISTS keen_app;
        DROP ROLE IF EXISTS keen_system;
    EXCEPTION WHEN dependent_objects_still_exist OR insufficient_privilege THEN NULL;
    END $$
    """,
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
