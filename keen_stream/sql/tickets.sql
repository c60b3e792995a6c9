-- keen_stream: stream tickets (server-sent events, docs/protocol.md section 11).
--
-- A browser's EventSource cannot send an Authorization header, and a long-lived token must not
-- sit in a URL (proxy and access logs keep URLs). So a client trades its token, in a header,
-- for a ticket: short-lived, single-use, good only for GET /events. Redeeming it mints a
-- stream credential (an HttpOnly cookie) that lets the browser's own reconnects of the same
-- stream authenticate. Only SHA-256 hashes of both secrets are stored, and every use re-checks
-- the token they came from (revoked, expired, user suspended: refused).
--
-- Several hub nodes share this table: a ticket issued by one node is redeemed on another.

-- === stream_tickets =============================================================================
CREATE TABLE stream_tickets (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    -- The token the ticket was issued for: every use re-checks it.
    token_id UUID NOT NULL REFERENCES auth_tokens(id) ON DELETE CASCADE,
    -- 'ticket': single use, seconds; 'credential': minted by redeeming the ticket ticket_id.
    kind TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    ticket_id UUID REFERENCES stream_tickets(id) ON DELETE CASCADE,
    expires_at TIMESTAMP WITH TIME ZONE NOT NULL,
    used_at TIMESTAMP WITH TIME ZONE,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    CONSTRAINT stream_tickets_secret_hash_key UNIQUE (secret_hash),
    CONSTRAINT stream_tickets_kind_check CHECK (kind IN ('ticket', 'credential')),
    CONSTRAINT stream_tickets_origin_check CHECK ((kind = 'credential') = (ticket_id IS NOT NULL))
);
CREATE INDEX idx_stream_tickets_user_id ON stream_tickets(user_id);
CREATE INDEX idx_stream_tickets_token_id ON stream_tickets(token_id);
CREATE INDEX idx_stream_tickets_ticket_id ON stream_tickets(ticket_id);
CREATE INDEX idx_stream_tickets_expires_at ON stream_tickets(expires_at);

-- The status of the ticket's token, as keen_token_authenticate reports it (without touching
-- the token's usage counters), plus the token's hash: the hub re-checks connected clients by it.
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
$$;
ALTER FUNCTION keen_stream_ticket_token(uuid) OWNER TO keen_system;
REVOKE ALL ON FUNCTION keen_stream_ticket_token(uuid) FROM PUBLIC;

-- Issue a ticket for the token whose hash is p_token_hash (proof of holding it). The caller
-- (the hub) has validated the token and its scopes; this re-checks that it is usable.
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
END $$;
ALTER FUNCTION keen_stream_ticket_issue(text, text, interval) OWNER TO keen_system;
REVOKE ALL ON FUNCTION keen_stream_ticket_issue(text, text, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_stream_ticket_issue(text, text, interval) TO keen_app;

-- Redeem a ticket, once: the UPDATE takes the row's lock, so of two concurrent redemptions the
-- second re-reads the row after the first commits, finds used_at set and reports ticket_used.
-- On success a stream credential (p_credential_hash) is minted from it, expiring after
-- p_credential_ttl or with the token, whichever comes first. status: ticket_unknown,
-- ticket_used, ticket_expired, or the token's status (ok, revoked, expired, inactive, unknown).
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
END $$;
ALTER FUNCTION keen_stream_ticket_redeem(text, text, interval) OWNER TO keen_system;
REVOKE ALL ON FUNCTION keen_stream_ticket_redeem(text, text, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_stream_ticket_redeem(text, text, interval) TO keen_app;

-- Authenticate a reconnect by its stream credential. p_ticket_hash, when given (the spent
-- ticket still in the EventSource's URL), must be a ticket of the same token: two tabs that
-- opened streams with the same token share the one cookie the later redemption left.
-- status: credential_unknown, credential_expired, or the token's status.
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
END $$;
ALTER FUNCTION keen_stream_credential_authenticate(text, text) OWNER TO keen_system;
REVOKE ALL ON FUNCTION keen_stream_credential_authenticate(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_stream_credential_authenticate(text, text) TO keen_app;

ALTER TABLE stream_tickets ENABLE ROW LEVEL SECURITY;
ALTER TABLE stream_tickets FORCE ROW LEVEL SECURITY;
CREATE POLICY stream_tickets_select ON stream_tickets FOR SELECT TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY stream_tickets_insert ON stream_tickets FOR INSERT TO keen_app
    WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY stream_tickets_update ON stream_tickets FOR UPDATE TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))
    WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY stream_tickets_delete ON stream_tickets FOR DELETE TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));

-- Tenants may list and withdraw their own tickets and credentials (not read the hashes); they
-- are written only by the functions above.
GRANT SELECT (id, user_id, token_id, kind, ticket_id, expires_at, used_at, created_at),
      DELETE ON stream_tickets TO keen_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON stream_tickets TO keen_system;
