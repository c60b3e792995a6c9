"""Stream tickets: short-lived, single-use tickets and stream credentials for GET /events.

Revision ID: 0010_stream_tickets
Revises: 0009_stream_epoch
Create Date: 2026-12-01

A browser's EventSource cannot send an Authorization header and a long-lived token must not sit
in a URL: a client trades its token (in a header) for a ticket, redeemed once by GET /events,
which mints a stream credential (an HttpOnly cookie) for the browser's own reconnects. Only
hashes are stored; every use re-checks the token. keen_stream/sql/tickets.sql is the commented
current text (docs/protocol.md, section 11).
"""

from alembic import op

revision = "0010_stream_tickets"
down_revision = "0009_stream_epoch"
branch_labels = None
depends_on = None

UPGRADE = [
    """
    CREATE TABLE stream_tickets (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        token_id UUID NOT NULL REFERENCES auth_tokens(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        secret_hash TEXT NOT NULL,
        ticket_id UUID REFERENCES stream_tickets(id) ON DELETE CASCADE,
        expires_at TIMESTAMP WITH TIME ZONE NOT NULL,
        used_at TIMESTAMP WITH TIME ZONE,
        created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
        CONSTRAINT stream_tickets_secret_hash_key UNIQUE (secret_hash),
        CONSTRAINT stream_tickets_kind_check CHECK (kind IN ('ticket', 'credential')),
        CONSTRAINT stream_tickets_origin_check CHECK ((kind = 'credential') = (ticket_id IS NOT NULL))
    )
    """,
    """
    CREATE INDEX idx_stream_tickets_user_id ON stream_tickets(user_id)
    """,
    """
    CREATE INDEX idx_stream_tickets_token_id ON stream_tickets(token_id)
    """,
    """
    CREATE INDEX idx_stream_tickets_ticket_id ON stream_tickets(ticket_id)
    """,
    """
    CREATE INDEX idx_stream_tickets_expires_at ON stream_tickets(expires_at)
    """,
    """
    CREATE FUNCTION keen_stream_ticket_token(p_token_id uuid)
    RETURNS TABLE (status text, token_id uuid, user_id uuid, token_type text, scopes text[],
                   expires_at timestamptz, is_admin boolean, bypass_limits boolean, token_hash text)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
    AS $$
        SELECT r.status, r.token_id, r.user_id, r.token_type, r.scopes, r.expires_at, r.is_admin,
               r.bypass_limits, a.token_hash
          FROM public.auth_tokens a,
               LATERAL public.keen_token_authenticate(a.token_hash, NULL, false) r
         WHERE a.id = p_token_id
    $$
    """,
    """
    ALTER FUNCTION keen_stream_ticket_token(uuid) OWNER TO keen_system
    """,
    """
    REVOKE ALL ON FUNCTION keen_stream_ticket_token(uuid) FROM PUBLIC
    """,
    """
    CREATE FUNCTION keen_stream_ticket_issue(p_token_hash text, p_ticket_hash text, p_ttl interval)
    RETURNS TABLE (status text, expires_at timestamptz)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
    AS $$
    DECLARE
        t record;
    BEGIN
        SELECT * INTO t FROM public.keen_token_authenticate(p_token_hash, NULL, false);
        status := t.status;
        IF t.status = 'ok' THEN
            INSERT INTO public.stream_tickets (user_id, token_id, kind, secret_hash, expires_at)
            VALUES (t.user_id, t.token_id, 'ticket', p_ticket_hash, now() + p_ttl)
            RETURNING stream_tickets.expires_at INTO expires_at;
        END IF;
        RETURN NEXT;
    END $$
    """,
    """
    ALTER FUNCTION keen_stream_ticket_issue(text, text, interval) OWNER TO keen_system
    """,
    """
    REVOKE ALL ON FUNCTION keen_stream_ticket_issue(text, text, interval) FROM PUBLIC
    """,
    """
    GRANT EXECUTE ON FUNCTION keen_stream_ticket_issue(text, text, interval) TO keen_app
    """,
    """
    CREATE FUNCTION keen_stream_ticket_redeem(p_ticket_hash text, p_credential_hash text,
                                              p_credential_ttl interval)
    RETURNS TABLE (status text, token_id uuid, user_id uuid, token_type text, scopes text[],
                   expires_at timestamptz, is_admin boolean, bypass_limits boolean, token_hash text,
                   credential_expires_at timestamptz)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
    AS $$
    DECLARE
        k public.stream_tickets%ROWTYPE;
    BEGIN
        UPDATE public.stream_tickets s SET used_at = now()
         WHERE s.secret_hash = p_ticket_hash AND s.kind = 'ticket' AND s.used_at IS NULL
           AND s.expires_at > now()
        RETURNING * INTO k;
        IF NOT FOUND THEN
            SELECT * INTO k FROM public.stream_tickets s
             WHERE s.secret_hash = p_ticket_hash AND s.kind = 'ticket';
            status := CASE WHEN NOT FOUND THEN 'ticket_unknown'
                           WHEN k.used_at IS NOT NULL THEN 'ticket_used'
                           ELSE 'ticket_expired' END;
            RETURN NEXT;
            RETURN;
        END IF;
        SELECT * INTO status, token_id, user_id, token_type, scopes, expires_at, is_admin,
                      bypass_limits, token_hash
          FROM public.keen_stream_ticket_token(k.token_id);
        IF status = 'ok' THEN
            INSERT INTO public.stream_tickets (user_id, token_id, kind, secret_hash, ticket_id,
                                               expires_at)
            VALUES (k.user_id, k.token_id, 'credential', p_credential_hash, k.id,
                    least(now() + p_credential_ttl, coalesce(expires_at, 'infinity')))
            RETURNING stream_tickets.expires_at INTO credential_expires_at;
        END IF;
        RETURN NEXT;
    END $$
    """,
    """
    ALTER FUNCTION keen_stream_ticket_redeem(text, text, interval) OWNER TO keen_system
    """,
    """
    REVOKE ALL ON FUNCTION keen_stream_ticket_redeem(text, text, interval) FROM PUBLIC
    """,
    """
    GRANT EXECUTE ON FUNCTION keen_stream_ticket_redeem(text, text, interval) TO keen_app
    """,
    """
    CREATE FUNCTION keen_stream_credential_authenticate(p_credential_hash text, p_ticket_hash text)
    RETURNS TABLE (status text, token_id uuid, user_id uuid, token_type text, scopes text[],
                   expires_at timestamptz, is_admin boolean, bypass_limits boolean, token_hash text,
                   credential_expires_at timestamptz)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
    AS $$
    DECLARE
        c public.stream_tickets%ROWTYPE;
    BEGIN
        SELECT s.* INTO c FROM public.stream_tickets s
         WHERE s.secret_hash = p_credential_hash AND s.kind = 'credential'
           AND (p_ticket_hash IS NULL OR EXISTS (
                SELECT 1 FROM public.stream_tickets o
                 WHERE o.secret_hash = p_ticket_hash AND o.token_id = s.token_id));
        IF NOT FOUND THEN
            status := 'credential_unknown';
        ELSIF c.expires_at <= now() THEN
            status := 'credential_expired';
        ELSE
            SELECT * INTO status, token_id, user_id, token_type, scopes, expires_at, is_admin,
                          bypass_limits, token_hash
              FROM public.keen_stream_ticket_token(c.token_id);
            credential_expires_at := c.expires_at;
        END IF;
        RETURN NEXT;
    END $$
    """,
    """
    ALTER FUNCTION keen_stream_credential_authenticate(text, text) OWNER TO keen_system
    """,
    """
    REVOKE ALL ON FUNCTION keen_stream_credential_authenticate(text, text) FROM PUBLIC
    """,
    """
    GRANT EXECUTE ON FUNCTION keen_stream_credential_authenticate(text, text) TO keen_app
    """,
    """
    ALTER TABLE stream_tickets ENABLE ROW LEVEL SECURITY
    """,
    """
    ALTER TABLE stream_tickets FORCE ROW LEVEL SECURITY
    """,
    """
    CREATE POLICY stream_tickets_select ON stream_tickets FOR SELECT TO keen_app
        USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))
    """,
    """
    CREATE POLICY stream_tickets_insert ON stream_tickets FOR INSERT TO keen_app
        WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))
    """,
    """
    CREATE POLICY stream_tickets_update ON stream_tickets FOR UPDATE TO keen_app
        USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))
        WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))
    """,
    """
    CREATE POLICY stream_tickets_delete ON stream_tickets FOR DELETE TO keen_app
        USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))
    """,
    """
    GRANT SELECT (id, user_id, token_id, kind, ticket_id, expires_at, used_at, created_at),
          DELETE ON stream_tickets TO keen_app
    """,
    """
    GRANT SELECT, INSERT, UPDATE, DELETE ON stream_tickets TO keen_system
    """,
]

DOWNGRADE = [
    "DROP FUNCTION IF EXISTS keen_stream_credential_authenticate(text, text)",
    "DROP FUNCTION IF EXISTS keen_stream_ticket_redeem(text, text, interval)",
    "DROP FUNCTION IF EXISTS keen_stream_ticket_issue(text, text, interval)",
    "DROP FUNCTION IF EXISTS keen_stream_ticket_token(uuid)",
    "DROP TABLE IF EXISTS stream_tickets",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
