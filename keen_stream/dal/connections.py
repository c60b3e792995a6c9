"""``websocket_connections`` rows and hub nodes: what the streaming hub records about itself.

Writes come in batches (:meth:`ConnectionDAO.flush`): a hub node collects opens, subscription
changes, pings and closes in memory and writes them in one transaction every few seconds, so a
ping costs no write and a connection storm costs one INSERT per batch, not one per client.
Every hub node heartbeats; :meth:`ConnectionDAO.reap` marks nodes that stopped heartbeating as
dead and closes their connection rows.

``agent_sessions.websocket_connections`` (the seed's array) is not maintained: a write to the
session row on every subscribe would contend with the agent's own progress updates on that row.
:meth:`ConnectionDAO.open_for_session` answers the same question from this table.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from keen_stream.dal.models.connections import ConnectionBatch, ConnectionRecord, HubNode
from keen_stream.dal.validation import parse_uuid
from keen_stream.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    from keen_stream.dal.database import KeenDatabase

CONNECTION_COLUMNS: Final = (
    "id, connection_id, user_id, session_id, client_ip, user_agent, client_type, connected_at,"
    " last_ping_at, disconnected_at, subscribed_events, session_filters, admin_connection,"
    " can_view_all_sessions, connection_status, hub_node_id, token_id, subscription_scope,"
    " close_code, close_reason"
)
NODE_COLUMNS: Final = (
    "id, hostname, pid, listen_address, started_at, last_heartbeat_at, stopped_at, status"
)

#: Rows per flush transaction: each holds the event horizon for a few milliseconds at most.
FLUSH_CHUNK: Final = 100

SQL: Final = {
    # Batches arrive as one JSON array each (rows of different shapes, one parameter). Between
    # a connection's authentication and the flush its token may have been deleted (a tenant may
    # delete its own) or its user (by an admin): the row is recorded without the token, or not
    # at all, instead of failing the whole batch on a foreign key, batch after batch.
    "open": """
        INSERT INTO websocket_connections (connection_id, user_id, token_id, client_ip, user_agent,
            client_type, admin_connection, can_view_all_sessions, hub_node_id, connected_at,
            last_ping_at)
        SELECT v.connection_id, v.user_id, t.id, v.client_ip, v.user_agent, v.client_type,
               v.admin_connection, v.can_view_all_sessions, v.hub_node_id, v.connected_at,
               v.connected_at
          FROM jsonb_to_recordset($1::jsonb) AS v(connection_id text, user_id uuid, token_id uuid,
               client_ip inet, user_agent text, client_type text, admin_connection boolean,
               can_view_all_sessions boolean, hub_node_id uuid, connected_at timestamptz)
          JOIN users u ON u.id = v.user_id
          LEFT JOIN auth_tokens t ON t.id = v.token_id
        ON CONFLICT (connection_id) DO NOTHING""",
    # session_id (the seed's single-session column) is set when exactly one session is watched.
    "subscriptions": """
        UPDATE websocket_connections w
           SET subscription_scope = v.scope, subscribed_events = v.events,
               session_filters = v.filters,
               session_id = CASE WHEN cardinality(v.filters) = 1 THEN v.filters[1] END
          FROM jsonb_to_recordset($1::jsonb) AS v(connection_id text, scope text, events text[],
               filters uuid[])
         WHERE w.connection_id = v.connection_id AND w.disconnected_at IS NULL""",
    "pings": """
        UPDATE websocket_connections w SET last_ping_at = greatest(w.last_ping_at, v.at)
          FROM jsonb_to_recordset($1::jsonb) AS v(connection_id text, at timestamptz)
         WHERE w.connection_id = v.connection_id AND w.disconnected_at IS NULL""",
    "close": """
        UPDATE websocket_connections w
           SET disconnected_at = v.at, connection_status = v.status, close_code = v.code,
               close_reason = v.reason
          FROM jsonb_to_recordset($1::jsonb) AS v(connection_id text, at timestamptz, status text,
               code integer, reason text)
         WHERE w.connection_id = v.connection_id AND w.disconnected_at IS NULL""",
    "register_node": f"""
        INSERT INTO hub_nodes (id, hostname, pid, listen_address) VALUES ($1, $2, $3, $4)
        RETURNING {NODE_COLUMNS}""",
    "heartbeat": """
        UPDATE hub_nodes SET last_heartbeat_at = now() WHERE id = $1 AND status = 'running'
        RETURNING id""",
    "stop_node": """
        WITH node AS (
            UPDATE hub_nodes SET status = 'stopped', stopped_at = now()
             WHERE id = $1 AND status = 'running' RETURNING id)
        UPDATE websocket_connections w
           SET disconnected_at = now(), connection_status = 'disconnected', close_code = 1001,
               close_reason = 'hub node stopped'
         WHERE w.hub_node_id = $1 AND w.disconnected_at IS NULL""",
    # Nodes silent for longer than $1 are dead; their open rows (and open rows of nodes already
    # gone, or of no node and silent as long) are closed as 'reaped'. SKIP LOCKED: two reapers
    # never wait on each other. $2 is the reaping node itself (never reaped by itself).
    "reap": """
        WITH dead AS (
            UPDATE hub_nodes n SET status = 'dead', stopped_at = now()
             WHERE n.id IN (SELECT id FROM hub_nodes
                             WHERE status = 'running' AND id <> $2
                               AND last_heartbeat_at < now() - $1::interval
                             FOR UPDATE SKIP LOCKED)
            RETURNING n.id),
        closed AS (
            UPDATE websocket_connections w
               SET disconnected_at = now(), connection_status = 'reaped', close_code = 1006,
                   close_reason = 'hub node stopped heartbeating'
             WHERE w.disconnected_at IS NULL
               AND (w.hub_node_id IN (SELECT id FROM dead)
                    OR w.hub_node_id IN (SELECT id FROM hub_nodes WHERE status <> 'running')
                    OR (w.hub_node_id IS NULL AND w.last_ping_at < now() - $1::interval))
            RETURNING w.id)
        SELECT (SELECT count(*) FROM dead) AS nodes,
               (SELECT count(*) FROM closed) AS connections""",
    # The same judgement as tokens.validate (one SQL function), for many tokens in one trip.
    "token_statuses": """
        SELECT h.token_hash, a.status, a.is_admin, a.expires_at
          FROM unnest($1::text[]) AS h(token_hash)
         CROSS JOIN LATERAL keen_token_authenticate(h.token_hash, NULL, false) AS a""",
    "get": f"SELECT {CONNECTION_COLUMNS} FROM websocket_connections WHERE connection_id = $1",
    "list_own": f"""
        SELECT {CONNECTION_COLUMNS} FROM websocket_connections
         WHERE user_id = $1 AND ($2 OR disconnected_at IS NULL)
         ORDER BY connected_at DESC, id""",
    "open_for_session": """
        SELECT connection_id FROM websocket_connections
         WHERE disconnected_at IS NULL
           AND (session_id = $1 OR $1 = ANY(session_filters)
                OR (subscription_scope = 'mine' AND user_id = $2)
                OR (subscription_scope = 'all' AND can_view_all_sessions))
         ORDER BY connected_at, id""",
    "get_node": f"SELECT {NODE_COLUMNS} FROM hub_nodes WHERE id = $1",
    "session_owner": "SELECT user_id FROM agent_sessions WHERE id = $1",
    "revive_node": """
        WITH node AS (
            UPDATE hub_nodes SET status = 'running', stopped_at = NULL, last_heartbeat_at = now()
             WHERE id = $1 RETURNING id)
        UPDATE websocket_connections w
           SET disconnected_at = NULL, connection_status = 'active', close_code = NULL,
               close_reason = NULL
         WHERE w.hub_node_id = (SELECT id FROM node) AND w.connection_status = 'reaped'
           AND w.connection_id = ANY($2::text[])""",
}


def _iso(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


class ConnectionDAO:
    """``db.connections``: connection records and hub nodes."""

    def __init__(self, db: KeenDatabase) -> None:
        self._db = db

    # --- hub nodes -------------------------------------------------------------------------
    async def register_node(self, listen_address: str | None = None) -> HubNode:
        """A new node row for this process (a restarted process is a new node)."""
        async with self._db.system_transaction() as conn:
            row = await conn.fetchrow(
                SQL["register_node"],
                uuid.uuid4(),
                socket.gethostname()[:255],
                os.getpid(),
                listen_address[:255] if listen_address else None,
            )
        return HubNode.model_validate(dict(row))

    async def heartbeat(self, node_id: uuid.UUID) -> bool:
        """Record that the node is alive. False if it was declared dead meanwhile."""
        async with self._db.system_transaction() as conn:
            return await conn.fetchval(SQL["heartbeat"], node_id) is not None

    async def revive_node(self, node_id: uuid.UUID, live_connection_ids: Iterable[str]) -> None:
        """A node declared dead while it was only slow: mark it running again and reopen the
        rows of the connections it still serves."""
        async with self._db.system_transaction() as conn:
            await conn.execute(SQL["revive_node"], node_id, list(live_connection_ids))

    async def stop_node(self, node_id: uuid.UUID) -> None:
        """Clean shutdown: the node and its still-open connection rows are closed."""
        async with self._db.system_transaction() as conn:
            await conn.execute(SQL["stop_node"], node_id)

    async def reap(
        self, stale_after: timedelta, *, reaper: uuid.UUID | None = None
    ) -> tuple[int, int]:
        """Close the rows of nodes silent for ``stale_after``. Returns (nodes, connections)."""
        if stale_after <= timedelta(0):
            raise InvalidInput("stale_after must be positive", field="stale_after")
        async with self._db.system_transaction() as conn:
            row = await conn.fetchrow(SQL["reap"], stale_after, reaper or uuid.UUID(int=0))
        return int(row["nodes"]), int(row["connections"])

    async def get_node(self, node_id: uuid.UUID) -> HubNode:
        async with self._db.system_transaction() as conn:
            row = await conn.fetchrow(SQL["get_node"], node_id)
        if row is None:
            raise NotFound("no such hub node")
        return HubNode.model_validate(dict(row))

    # --- connection records ----------------------------------------------------------------
    async def flush(self, batch: ConnectionBatch) -> None:
        """Write one node's accumulated changes (opens first, closes last)."""
        if not batch:
            return
        opened = [
            {**o.model_dump(), "client_ip": str(o.client_ip), "connected_at": _iso(o.connected_at)}
            for o in batch.opened
        ]
        subs = [
            {
                "connection_id": s.connection_id,
                "scope": s.subscription_scope,
                "events": list(s.subscribed_events),
                "filters": None if s.session_filters is None else list(s.session_filters),
            }
            for s in batch.subscriptions
        ]
        pings = [{"connection_id": cid, "at": _iso(at)} for cid, at in batch.pings]
        closed = [
            {
                "connection_id": c.connection_id,
                "at": _iso(c.disconnected_at),
                "status": c.connection_status,
                "code": c.close_code,
                "reason": c.close_reason,
            }
            for c in batch.closed
        ]
        # Short transactions, not one: every write transaction holds the event stream's horizon
        # (dal/events.py) until it commits, so one transaction writing a thousand rows (a node
        # start, a reconnect storm) stalled every event behind it (~80 ms, fanout_bench.py).
        # Order is kept (opens first, closes last); each row's change is independent.
        for name, rows in (
            ("open", opened),
            ("subscriptions", subs),
            ("pings", pings),
            ("close", closed),
        ):
            for start in range(0, len(rows), FLUSH_CHUNK):
                async with self._db.system_transaction() as conn:
                    await conn.execute(SQL[name], rows[start : start + FLUSH_CHUNK])

    async def get(self, connection_id: str) -> ConnectionRecord:
        """One record by its connection id (maintenance view: any user's)."""
        async with self._db.system_transaction() as conn:
            row = await conn.fetchrow(SQL["get"], connection_id)
        if row is None:
            raise NotFound("no such connection", connection_id=connection_id)
        return _record(row)

    async def list_for_user(
        self, user_id: uuid.UUID | str, *, include_closed: bool = False
    ) -> list[ConnectionRecord]:
        uid = parse_uuid(user_id, "user_id")
        async with self._db.user_transaction(uid) as conn:
            rows = await conn.fetch(SQL["list_own"], uid, include_closed)
        return [_record(r) for r in rows]

    async def open_for_session(
        self, user_id: uuid.UUID | str, session_id: uuid.UUID | str
    ) -> list[str]:
        """Connection ids currently receiving this session's events (what the seed kept in
        ``agent_sessions.websocket_connections``), as ``user_id`` may see them."""
        uid = parse_uuid(user_id, "user_id")
        sid = parse_uuid(session_id, "session_id")
        async with self._db.user_transaction(uid) as conn:
            owner = await conn.fetchval(SQL["session_owner"], sid)
            if owner is None:
                raise NotFound("no such session")
            rows = await conn.fetch(SQL["open_for_session"], sid, owner)
        return [r["connection_id"] for r in rows]

    async def token_statuses(self, token_hashes: Iterable[str]) -> dict[str, tuple[str, bool]]:
        """``{hash: (status, is_admin)}`` for many tokens in one round trip; status is what
        ``tokens.validate`` judges ('ok', 'unknown', 'revoked', 'expired', 'inactive')."""
        hashes = list(dict.fromkeys(token_hashes))
        if not hashes:
            return {}
        async with self._db.anonymous_transaction() as conn:
            rows = await conn.fetch(SQL["token_statuses"], hashes)
        return {r["token_hash"]: (r["status"], bool(r["is_admin"])) for r in rows}


def _record(row: asyncpg.Record) -> ConnectionRecord:
    data = dict(row)
    data["subscribed_events"] = list(data["subscribed_events"])
    return ConnectionRecord.model_validate(data)
