-- keen_stream's schema, part 1 of 5: roles, users, tokens, the audit log, row-level security.
--
-- What the database does NOW. The files in keen_stream/sql/ are applied in the order of
-- keen_stream.schema.SQL_FILES (foundation, sessions, ledger, events, analytics) to an empty
-- database; the Alembic migrations (the history, and how deployments upgrade) must produce the
-- same database, which tests/integration/test_schema_files.py checks. To change the schema,
-- edit the .sql file AND write a migration: the test fails until both agree.
--
-- Every tenant table has RLS ENABLEd and FORCEd, with one policy per command for keen_app:
-- the owning user's rows, or every row for an admin (as the database decides: keen_is_admin()).
-- The settings are wrapped in (SELECT ...) so PostgreSQL evaluates them once per statement (an
-- InitPlan) instead of once per row; tenant queries also say WHERE user_id = $1 so the planner
-- can use the user_id index.

-- === Roles ====================================================================================
-- Roles are cluster-wide: created here if missing (as the migrations do), never dropped by the
-- schema, shared by every keen_stream database of the cluster.

-- keen_app: every tenant transaction runs as this role (SET LOCAL ROLE). It can never bypass
-- RLS and owns nothing, so a bug in our code cannot read across tenants.
DO $$ BEGIN
    CREATE ROLE keen_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOINHERIT;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;

-- keen_system: maintenance jobs, registration, and the owner of the SECURITY DEFINER functions
-- outside the ledger (login lookup, token validation, audit, sessions, the stream). It bypasses
-- RLS, so it is NOLOGIN and reached only through code paths that say so
-- (KeenDatabase.system_transaction()). It reads the money tables but writes none of them: it
-- reaches money only through the ledger functions it may execute (ledger.sql).
DO $$ BEGIN
    CREATE ROLE keen_system NOLOGIN NOSUPERUSER BYPASSRLS NOCREATEDB NOCREATEROLE NOINHERIT;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;

-- keen_billing: the one role that may mint credits (purchases, refunds, adjustments) and set
-- the price. Reached only through KeenDatabase.billing_transaction() (db.billing): the payment
-- webhook and admin tools, never a tenant transaction.
DO $$ BEGIN
    CREATE ROLE keen_billing NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE
        NOINHERIT;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;

-- keen_ledger: owns the ledger's functions and alone writes the money tables, so that
-- keen_system (every db.system_transaction(): registration, the hub's maintenance loops) can
-- neither write a balance, a ledger row, a hold or the price, nor, as the owner of the minting
-- functions, grant itself EXECUTE on them. Nobody acts as keen_ledger: it is reached only as
-- the owner of SECURITY DEFINER functions (NOLOGIN, NOINHERIT, member of nothing). BYPASSRLS
-- because those functions act across tenants by design (the batch charges many users, billing
-- credits any account, the expiry sweep and verify read every account) and read users /
-- agent_sessions inside tenant transactions: every tenant table FORCEs RLS with policies for
-- keen_app only, so without it they would see no rows (keen_system, the owner it replaced,
-- has the attribute for the same reason). Creating a BYPASSRLS role needs a superuser (a DBA
-- may create it beforehand).
DO $$ BEGIN
    CREATE ROLE keen_ledger NOLOGIN NOSUPERUSER BYPASSRLS NOCREATEDB NOCREATEROLE NOINHERIT;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;

-- The login role that owns the schema must be able to SET ROLE to each, and be a member of
-- keen_ledger to hand it ownership of the ledger's functions; a superuser already can.
DO $$ BEGIN
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        EXECUTE format('GRANT keen_app, keen_system, keen_billing, keen_ledger TO %I',
                       current_user);
    END IF;
END $$;

-- === The database and the schema ==============================================================
-- No tenant temp objects: a temp table named users or credit_transactions would shadow the real
-- one for SECURITY DEFINER code (pg_temp is searched first unless named). TEMP came through
-- PUBLIC. keen_system keeps it: REFRESH MATERIALIZED VIEW CONCURRENTLY builds its diff in a
-- temp table. Database-level grants name their database, hence current_database(); they are not
-- copied by CREATE DATABASE ... TEMPLATE.
DO $$ BEGIN
    EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO keen_system', current_database());
END $$;

GRANT USAGE ON SCHEMA public TO keen_app, keen_system, keen_billing, keen_ledger;

-- === Helpers ==================================================================================
-- The acting user, set per transaction with set_config('app.current_user_id', $1, true).
-- nullif: an unset custom setting can read back as ''.
CREATE FUNCTION keen_current_user_id() RETURNS uuid
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT nullif(current_setting('app.current_user_id', true), '')::uuid $$;
REVOKE ALL ON FUNCTION keen_current_user_id() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_current_user_id() TO keen_app, keen_system, keen_ledger;

CREATE FUNCTION keen_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;
REVOKE ALL ON FUNCTION keen_touch_updated_at() FROM PUBLIC;

-- Append-only tables (the ledger, the audit log) refuse UPDATE and DELETE.
CREATE FUNCTION keen_reject_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'KS405';
END $$;
REVOKE ALL ON FUNCTION keen_reject_change() FROM PUBLIC;

-- === users ====================================================================================
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
);
CREATE INDEX idx_users_role ON users(role);
CREATE INDEX idx_users_created_at ON users(created_at);

-- Admin status is decided by the database from the user row, never by a caller's flag.
-- SECURITY DEFINER as keen_system so the lookup does not recurse into the users policies.
CREATE FUNCTION keen_is_admin() RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
    SELECT coalesce(
        (SELECT u.is_admin AND u.account_status = 'active'
           FROM public.users u WHERE u.id = public.keen_current_user_id()),
        false)
$$;
ALTER FUNCTION keen_is_admin() OWNER TO keen_system;
REVOKE ALL ON FUNCTION keen_is_admin() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_is_admin() TO keen_app, keen_ledger;

-- The pre-authentication lookups run before any user context exists, so they are narrow
-- SECURITY DEFINER functions (owned by keen_system) instead of a wide grant to keen_app.
-- The login lookup returns a password hash: only the system context may call it.
CREATE FUNCTION keen_login_lookup(p_email text)
RETURNS TABLE (user_id uuid, password_hash text, account_status text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
    SELECT u.id, u.password_hash::text, u.account_status::text
      FROM public.users u WHERE u.email = lower(p_email)
$$;
ALTER FUNCTION keen_login_lookup(text) OWNER TO keen_system;
REVOKE ALL ON FUNCTION keen_login_lookup(text) FROM PUBLIC;

-- A user may edit their profile; only an admin may change role, admin flags, status or
-- verification. Column grants cannot say "only admins", so a trigger does.
-- The super_admin role is given and taken only outside tenant context (the system role,
-- `keen-stream create-admin`): were a super-admin able to change a super-admin's role from
-- tenant context, the delete policy below (which reads the role when the DELETE runs) could be
-- walked around in one transaction, demoting the row and then deleting it as an admin's. A
-- super-admin still manages the other columns of a super-admin's row (status, privileges).
CREATE FUNCTION keen_users_guard() RETURNS trigger
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
END $$;
REVOKE ALL ON FUNCTION keen_users_guard() FROM PUBLIC;

-- The ledger computes days and months in the user's time zone: a time zone must be one of the
-- zone names PostgreSQL knows (pg_timezone_names, what the DAL's IANA names are drawn from),
-- else KS400 (InvalidInput). Not whatever AT TIME ZONE accepts: a POSIX spec such as
-- 'AAA0BBB-23,J335/1,J365/0' is UTC jumping 23 hours ahead on 1 December, and a window rule
-- that adds "a day" in local time would then open a new daily window one hour after the last.
-- pg_timezone_names reads the zone directory (~20 ms): the trigger fires only on INSERT and
-- UPDATE OF timezone, and skips the default 'UTC' and an unchanged value. No pinned path: it
-- names pg_catalog's view, and a GUC per insert is waste.
CREATE FUNCTION keen_users_check_timezone() RETURNS trigger
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
END $$;
REVOKE ALL ON FUNCTION keen_users_check_timezone() FROM PUBLIC;

CREATE TRIGGER users_touch_updated_at BEFORE UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION keen_touch_updated_at();
CREATE TRIGGER users_guard BEFORE UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION keen_users_guard();
CREATE TRIGGER users_check_timezone BEFORE INSERT OR UPDATE OF timezone ON users
    FOR EACH ROW EXECUTE FUNCTION keen_users_check_timezone();
-- users_audit is created with keen_audit below; users_spend_windows in ledger.sql.

ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE users FORCE ROW LEVEL SECURITY;
CREATE POLICY users_select ON users FOR SELECT TO keen_app
    USING (id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY users_insert ON users FOR INSERT TO keen_app
    WITH CHECK (id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY users_update ON users FOR UPDATE TO keen_app
    USING (id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))
    WITH CHECK (id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
-- Deleting a user erases an account (and is refused once it has ledger history: the
-- append-only ledger stops the cascade). Users ask; admins do it; a super-admin row is the
-- system role's alone (it bypasses RLS), so no admin, and no super-admin, removes it.
CREATE POLICY users_delete ON users FOR DELETE TO keen_app
    USING ((SELECT keen_is_admin()) AND role <> 'super_admin');

-- Users never see password hashes or MFA secrets through keen_app.
GRANT SELECT (id, email, username, display_name, avatar_url, role, is_admin, admin_privileges,
              email_verified, account_status, mfa_enabled, timezone, preferences, created_at,
              updated_at, last_login_at, last_login_ip) ON users TO keen_app;
GRANT UPDATE (display_name, avatar_url, timezone, preferences, last_login_at, last_login_ip,
              role, is_admin, admin_privileges, account_status, email_verified)
    ON users TO keen_app;
GRANT DELETE ON users TO keen_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON users TO keen_system;
-- The ledger's functions (keen_ledger, ledger.sql) read who is an admin and their zone, no
-- secrets.
GRANT SELECT (id, email, username, display_name, avatar_url, role, is_admin, admin_privileges,
              email_verified, account_status, mfa_enabled, timezone, preferences, created_at,
              updated_at, last_login_at, last_login_ip) ON users TO keen_ledger;

-- === auth_tokens ==============================================================================
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
);
CREATE INDEX idx_auth_tokens_user_id ON auth_tokens(user_id);
CREATE INDEX idx_auth_tokens_expires_at ON auth_tokens(expires_at);
CREATE INDEX idx_auth_tokens_bypass_limits ON auth_tokens(bypass_limits);

-- A token's privileges come from its owner, not from whoever inserts it; a revoked token
-- stays revoked.
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
END $$;
REVOKE ALL ON FUNCTION keen_auth_tokens_guard() FROM PUBLIC;

-- One round trip: find the token by hash, judge it, and (p_touch) record the use. The usage
-- columns are written here (as keen_system), never by tenants.
CREATE FUNCTION keen_token_authenticate(p_hash text, p_ip inet, p_touch boolean)
RETURNS TABLE (status text, token_id uuid, user_id uuid, token_type text, scopes text[],
               expires_at timestamptz, is_admin boolean, bypass_limits boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
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
END $$;
ALTER FUNCTION keen_token_authenticate(text, inet, boolean) OWNER TO keen_system;
REVOKE ALL ON FUNCTION keen_token_authenticate(text, inet, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_token_authenticate(text, inet, boolean) TO keen_app;

CREATE TRIGGER auth_tokens_touch_updated_at BEFORE UPDATE ON auth_tokens
    FOR EACH ROW EXECUTE FUNCTION keen_touch_updated_at();
CREATE TRIGGER auth_tokens_guard BEFORE INSERT OR UPDATE ON auth_tokens
    FOR EACH ROW EXECUTE FUNCTION keen_auth_tokens_guard();

ALTER TABLE auth_tokens ENABLE ROW LEVEL SECURITY;
ALTER TABLE auth_tokens FORCE ROW LEVEL SECURITY;
CREATE POLICY auth_tokens_select ON auth_tokens FOR SELECT TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY auth_tokens_insert ON auth_tokens FOR INSERT TO keen_app
    WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY auth_tokens_update ON auth_tokens FOR UPDATE TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))
    WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY auth_tokens_delete ON auth_tokens FOR DELETE TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));

GRANT SELECT, DELETE ON auth_tokens TO keen_app;
GRANT INSERT (user_id, token_type, token_hash, token_name, scopes, expires_at, created_ip,
              user_agent) ON auth_tokens TO keen_app;
GRANT UPDATE (token_name, is_active, revoked_at) ON auth_tokens TO keen_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON auth_tokens TO keen_system;

-- === audit_log ================================================================================
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
);
CREATE INDEX idx_audit_log_user_id ON audit_log(user_id, occurred_at);
CREATE INDEX idx_audit_log_row ON audit_log(table_name, row_id);

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION keen_reject_change();

-- Generic audit trigger. TG_ARGV[0] names the owning-user column. Secrets are never copied:
-- a changed secret shows as "[redacted]".
CREATE FUNCTION keen_audit() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
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
END $$;
ALTER FUNCTION keen_audit() OWNER TO keen_system;
REVOKE ALL ON FUNCTION keen_audit() FROM PUBLIC;

CREATE TRIGGER users_audit AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION keen_audit('id');

ALTER TABLE audit_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_log FORCE ROW LEVEL SECURITY;
CREATE POLICY audit_log_select ON audit_log FOR SELECT TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY audit_log_insert ON audit_log FOR INSERT TO keen_app
    WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY audit_log_update ON audit_log FOR UPDATE TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))
    WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY audit_log_delete ON audit_log FOR DELETE TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));

GRANT SELECT ON audit_log TO keen_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON audit_log TO keen_system;
GRANT USAGE, SELECT ON SEQUENCE audit_log_id_seq TO keen_system;
