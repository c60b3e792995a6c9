"""Agent sessions: create, progress, end (with its charge), lists, trees, roll-ups, the sweep.

Every method addresses a session by its handle (``session_handle``, the string the agent
core chose; the schema's ``agent_sessions.session_id`` column). Writes run as the owning user
under RLS and also say ``user_id = $1``, so even an admin changes only their own sessions
here; reads are filtered by RLS alone (a user sees their own sessions, an admin everyone's).
The schema guards the rest (migration 0003): derived columns, the parent rule, the "ended is
final" rule and monotonic counters hold whoever writes.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, Unpack

import asyncpg

from keen_stream.dal.database import TENANT_CALL_ARGS
from keen_stream.dal.models.sessions import (
    PHASES,
    STATUSES,
    AgentSession,
    SessionCompletion,
    SessionCompletionFields,
    SessionCreate,
    SessionCreateFields,
    SessionNode,
    SessionRollup,
    SessionTree,
    parse_paths,
)
from keen_stream.dal.validation import (
    build,
    parse_count,
    parse_money,
    parse_session_handle,
    parse_uuid,
)
from keen_stream.errors import InvalidInput, NotFound, SessionAlreadyEnded

if TYPE_CHECKING:
    from keen_stream.dal.database import KeenDatabase

_INT_MAX: Final = 2**31 - 1  # iteration_count, tool_calls_count are INTEGER
_BIGINT_MAX: Final = 2**63 - 1  # tokens are BIGINT
MAX_PAGE: Final = 500

_TREE: Final = """
    WITH RECURSIVE tree AS (
        SELECT s.* FROM agent_sessions s WHERE s.session_id = $1
        UNION ALL
        SELECT c.* FROM agent_sessions c JOIN tree t ON c.parent_session_id = t.id
    )"""

SQL: Final = {
    "create": "SELECT * FROM keen_session_create($1, $2, $3, $4, $5, $6, $7, $8)",
    "get": "SELECT * FROM agent_sessions WHERE session_id = $1",
    # The UPDATE lives in keen_session_progress (migration 0006): one statement, run as the
    # tenant (tenant_call), so its transaction never waits on this client to commit.
    # Increments and appends are computed on the row version it changes (concurrent reports
    # add up; no read-modify-write in Python); an ended session raises SessionAlreadyEnded.
    # $1 user, $2 handle, $3 phase, $4-$7 counters, $8-$10 file paths.
    "progress": f"SELECT * FROM keen_session_progress({TENANT_CALL_ARGS},"
    " $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    # Serialises enders of one session: a second completion waits, then sees the first's result.
    "lock_own": "SELECT * FROM agent_sessions WHERE session_id = $2 AND user_id = $1 FOR UPDATE",
    "end": """
        UPDATE agent_sessions s SET
            execution_status = $2,
            success = $3,
            end_time = now(),
            last_activity_at = now(),
            claude_cost_usd = $4,
            keen_cost_credits = $5,
            error_message = $6,
            completion_report = $7,
            files_created = keen_append_distinct(s.files_created, $8),
            files_modified = keen_append_distinct(s.files_modified, $9),
            files_deleted = keen_append_distinct(s.files_deleted, $10)
        WHERE s.id = $1
        RETURNING s.*""",
    # The floor is checked in the same statement as the write: a charge committing meanwhile
    # cannot slip the budget under what is already used.
    "set_budget": """
        UPDATE agent_sessions s SET credit_budget = $3
        WHERE s.session_id = $2 AND s.user_id = $1 AND s.parent_session_id IS NULL
          AND ($3::numeric IS NULL OR $3::numeric >= s.budget_used)
        RETURNING s.*""",
    "own_kind": """
        SELECT parent_session_id IS NULL AS is_root, budget_used
          FROM agent_sessions WHERE session_id = $2 AND user_id = $1""",
    "is_admin": "SELECT keen_is_admin()",
    "cursor": "SELECT start_time, id FROM agent_sessions WHERE session_id = $1",
    # Newest first. The keyset bound is an index condition on both list indexes; without a
    # cursor it is (infinity, max uuid), which every row sorts before.
    "list_own": """
        SELECT * FROM agent_sessions s
        WHERE s.user_id = $1
          AND (s.start_time, s.id) < (coalesce($2::timestamptz, 'infinity'),
                                      coalesce($3::uuid, 'ffffffff-ffff-ffff-ffff-ffffffffffff'))
          AND ($4::text IS NULL OR s.execution_status = $4)
        ORDER BY s.start_time DESC, s.id DESC
        LIMIT $5""",
    "list_all": """
        SELECT * FROM agent_sessions s
        WHERE (s.start_time, s.id) < (coalesce($1::timestamptz, 'infinity'),
                                      coalesce($2::uuid, 'ffffffff-ffff-ffff-ffff-ffffffffffff'))
          AND ($3::text IS NULL OR s.execution_status = $3)
        ORDER BY s.start_time DESC, s.id DESC
        LIMIT $4""",
    "tree": _TREE + " SELECT * FROM tree ORDER BY session_depth, start_time, id",
    "rollup": _TREE
    + """
        SELECT count(*) AS sessions,
               count(*) FILTER (WHERE execution_status = 'running') AS running,
               count(*) FILTER (WHERE execution_status = 'completed') AS completed,
               count(*) FILTER (WHERE execution_status = 'failed') AS failed,
               count(*) FILTER (WHERE execution_status = 'cancelled') AS cancelled,
               count(*) FILTER (WHERE execution_status = 'timed_out') AS timed_out,
               max(session_depth) AS max_depth,
               max(session_depth) - min(session_depth) AS height,
               coalesce(sum(claude_cost_usd), 0) AS claude_cost_usd,
               coalesce(sum(keen_cost_credits), 0) AS keen_cost_credits,
               coalesce(sum(tokens_used), 0) AS tokens_used,
               coalesce(sum(context_tokens_used), 0) AS context_tokens_used,
               coalesce(sum(iteration_count), 0) AS iteration_count,
               coalesce(sum(tool_calls_count), 0) AS tool_calls_count,
               (SELECT credit_budget FROM tree WHERE session_id = $1) AS credit_budget,
               (SELECT budget_used FROM tree WHERE session_id = $1) AS budget_used
          FROM tree""",
    # A system job. SKIP LOCKED leaves alone a session someone is updating right now (which is
    # not idle) or ending; the outer conditions are re-checked on the row version it updates.
    "sweep": """
        UPDATE agent_sessions s SET
            execution_status = 'timed_out',
            success = false,
            end_time = now(),
            error_message = coalesce(s.error_message, $2)
        WHERE s.id IN (
                SELECT id FROM agent_sessions
                 WHERE execution_status = 'running' AND last_activity_at < now() - $1::interval
                 ORDER BY last_activity_at
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED)
          AND s.execution_status = 'running'
          AND s.last_activity_at < now() - $1::interval
        RETURNING s.*""",
}


def session_from_row(row: asyncpg.Record) -> AgentSession:
    values = dict(row)
    # The schema's column (the seed's name) is the caller's handle: session_handle in the API.
    values["session_handle"] = values.pop("session_id")
    return AgentSession.model_validate(values)


class SessionDAO:
    """``db.sessions``: the agent-session lifecycle. Every method takes the acting user first."""

    def __init__(self, db: KeenDatabase) -> None:
        self._db = db

    # --- commands ---------------------------------------------------------------------------
    async def create_session(
        self,
        user_id: uuid.UUID | str,
        data: SessionCreate | None = None,
        **fields: Unpack[SessionCreateFields],
    ) -> AgentSession:
        """Start a session (a root, or a sub-agent under ``parent_session_handle``).

        The database sets ``session_depth`` (parent's + 1), ``root_session_id`` (a root's own
        id), and ``is_admin_session`` / ``bypass_credit_deduction`` from the owner's account.
        Raises NotFound (no such parent, or another user's), SessionAlreadyEnded (the parent
        has ended), SessionDepthExceeded, SessionExists (the handle is taken).
        """
        new = build(SessionCreate, data, **fields)
        uid = parse_uuid(user_id, "user_id")
        async with self._db.user_transaction(uid) as conn:
            row = await conn.fetchrow(
                SQL["create"],
                uid,
                new.session_handle,
                new.parent_session_handle,
                new.git_branch,
                new.vision,
                new.working_directory,
                new.streaming_enabled,
                self._db.settings.max_session_depth,
            )
        return session_from_row(row)

    async def update_progress(
        self,
        user_id: uuid.UUID | str,
        session_handle: str,
        *,
        phase: str | None = None,
        iterations: int = 0,
        tool_calls: int = 0,
        tokens: int = 0,
        context_tokens: int = 0,
        files_created: Any = (),
        files_modified: Any = (),
        files_deleted: Any = (),
    ) -> AgentSession:
        """Add to a running session's counters, append file paths (once each), set the phase.

        Bumps ``last_activity_at``. Raises NotFound, SessionAlreadyEnded, InvalidInput.
        """
        uid = parse_uuid(user_id, "user_id")
        handle = parse_session_handle(session_handle)
        if phase is not None and phase not in PHASES:
            raise InvalidInput(f"phase must be one of {', '.join(PHASES)}", field="phase")
        args = (
            parse_count(iterations, "iterations", _INT_MAX),
            parse_count(tool_calls, "tool_calls", _INT_MAX),
            parse_count(tokens, "tokens", _BIGINT_MAX),
            parse_count(context_tokens, "context_tokens", _BIGINT_MAX),
            parse_paths(files_created, "files_created"),
            parse_paths(files_modified, "files_modified"),
            parse_paths(files_deleted, "files_deleted"),
        )
        row = await self._db.tenant_call(uid, SQL["progress"], handle, phase, *args)
        if row is None:
            raise NotFound("no such session", session_handle=handle)
        return session_from_row(row)

    async def complete_session(
        self,
        user_id: uuid.UUID | str,
        session_handle: str,
        completion: SessionCompletion | None = None,
        **fields: Unpack[SessionCompletionFields],
    ) -> AgentSession:
        """End a session as ``completed`` (``success=True``) or ``failed`` and charge its cost.

        The end state and the ledger charge (or the admin-bypass record) commit in one
        transaction. Retrying with the same outcome (status, success, Claude cost) returns the
        stored session and charges nothing; a different outcome raises SessionAlreadyEnded.
        A refused charge (InsufficientCredits, SpendingLimitExceeded, SessionBudgetExceeded)
        rolls everything back: the session stays running.
        """
        done = build(SessionCompletion, completion, **fields)
        status = "completed" if done.success else "failed"
        return await self._end(user_id, session_handle, status, done)

    async def fail_session(
        self,
        user_id: uuid.UUID | str,
        session_handle: str,
        *,
        error_message: str,
        claude_cost_usd: Decimal | int | str = Decimal(0),
        completion_report: dict[str, Any] | None = None,
    ) -> AgentSession:
        """End a session as ``failed``, charging what it cost so far (see complete_session)."""
        done = build(
            SessionCompletion,
            success=False,
            claude_cost_usd=claude_cost_usd,
            error_message=error_message,
            completion_report=completion_report,
        )
        return await self._end(user_id, session_handle, "failed", done)

    async def cancel_session(
        self,
        user_id: uuid.UUID | str,
        session_handle: str,
        *,
        claude_cost_usd: Decimal | int | str = Decimal(0),
        reason: str | None = None,
    ) -> AgentSession:
        """End a session as ``cancelled``, charging what it cost so far (see complete_session)."""
        done = build(
            SessionCompletion, success=False, claude_cost_usd=claude_cost_usd, error_message=reason
        )
        return await self._end(user_id, session_handle, "cancelled", done)

    async def _end(
        self, user_id: uuid.UUID | str, session_handle: str, status: str, done: SessionCompletion
    ) -> AgentSession:
        uid = parse_uuid(user_id, "user_id")
        handle = parse_session_handle(session_handle)
        async with self._db.user_transaction(uid) as conn:
            row = await conn.fetchrow(SQL["lock_own"], uid, handle)
            if row is None:
                raise NotFound("no such session", session_handle=handle)
            if row["execution_status"] != "running":
                stored = (row["execution_status"], row["success"], row["claude_cost_usd"])
                if stored == (status, status == "completed", done.claude_cost_usd):
                    return session_from_row(row)
                raise SessionAlreadyEnded(
                    f"session {handle} has already ended ({row['execution_status']})",
                    session_handle=handle,
                    status=row["execution_status"],
                )
            credits = Decimal(0)
            if done.claude_cost_usd > 0:
                # Keyed by the row id: even a path that skipped the lock above could not charge
                # the same session's end twice.
                charge = await self._db.credits.deduct_in(
                    conn,
                    uid,
                    done.claude_cost_usd,
                    session_id=row["id"],
                    description=f"agent session {handle} ({status})",
                    idempotency_key=f"session-end:{row['id']}",
                )
                credits = abs(charge.amount)
            ended = await conn.fetchrow(
                SQL["end"],
                row["id"],
                status,
                status == "completed",
                done.claude_cost_usd,
                credits,
                done.error_message,
                done.completion_report,
                list(done.files_created),
                list(done.files_modified),
                list(done.files_deleted),
            )
        return session_from_row(ended)

    async def set_budget(
        self,
        user_id: uuid.UUID | str,
        root_session_handle: str,
        credit_budget: Decimal | int | str | None,
    ) -> AgentSession:
        """Cap the credits a root session's whole subtree may charge or hold (None: no cap).

        The ledger enforces the cap when charging or reserving (SessionBudgetExceeded). Only a
        running root session takes a budget, and never one below what it has already used.
        """
        uid = parse_uuid(user_id, "user_id")
        handle = parse_session_handle(root_session_handle, "root_session_handle")
        budget = None if credit_budget is None else parse_money(credit_budget, "credit_budget")
        async with self._db.user_transaction(uid) as conn:
            row = await conn.fetchrow(SQL["set_budget"], uid, handle, budget)
            if row is not None:
                return session_from_row(row)
            kind = await conn.fetchrow(SQL["own_kind"], uid, handle)
        if kind is None:
            raise NotFound("no such session", session_handle=handle)
        if not kind["is_root"]:
            raise InvalidInput(
                "a budget can be set on a root session only", field="root_session_handle"
            )
        raise InvalidInput(
            f"credit_budget is below what the session has already used ({kind['budget_used']})",
            field="credit_budget",
        )

    # --- queries ----------------------------------------------------------------------------
    async def get_session(self, user_id: uuid.UUID | str, session_handle: str) -> AgentSession:
        """A session as ``user_id`` sees it (their own; an admin any). NotFound otherwise."""
        uid = parse_uuid(user_id, "user_id")
        handle = parse_session_handle(session_handle)
        async with self._db.user_transaction(uid) as conn:
            row = await conn.fetchrow(SQL["get"], handle)
        if row is None:
            raise NotFound("no such session", session_handle=handle)
        return session_from_row(row)

    async def get_user_sessions(
        self,
        user_id: uuid.UUID | str,
        *,
        status: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[AgentSession]:
        """Sessions newest first: a user's own, or everyone's for an admin (the database says).

        ``before`` is the handle of the last session of the previous page (keyset pagination:
        stable while new sessions start, no OFFSET scans).
        """
        uid = parse_uuid(user_id, "user_id")
        if status is not None and status not in STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(STATUSES)}", field="status")
        limit = parse_count(limit, "limit", MAX_PAGE, minimum=1)
        cursor = None if before is None else parse_session_handle(before, "before")
        async with self._db.user_transaction(uid) as conn:
            bound: tuple[Any, Any] = (None, None)
            if cursor is not None:
                found = await conn.fetchrow(SQL["cursor"], cursor)
                if found is None:
                    raise NotFound("no such session", session_handle=cursor)
                bound = (found["start_time"], found["id"])
            # Two statements instead of "user_id = $1 OR is_admin": each keeps its own index.
            if await conn.fetchval(SQL["is_admin"]):
                rows = await conn.fetch(SQL["list_all"], *bound, status, limit)
            else:
                rows = await conn.fetch(SQL["list_own"], uid, *bound, status, limit)
        return [session_from_row(r) for r in rows]

    async def get_session_tree(
        self, user_id: uuid.UUID | str, root_session_handle: str
    ) -> SessionTree:
        """A session and all its descendants (recursive CTE), nested, with exact totals."""
        uid = parse_uuid(user_id, "user_id")
        handle = parse_session_handle(root_session_handle, "root_session_handle")
        async with self._db.user_transaction(uid) as conn:
            rows = await conn.fetch(SQL["tree"], handle)
        if not rows:
            raise NotFound("no such session", session_handle=handle)
        sessions = [session_from_row(r) for r in rows]
        return SessionTree(root=_nest(sessions), rollup=_rollup(sessions))

    async def get_tree_rollup(
        self, user_id: uuid.UUID | str, root_session_handle: str
    ) -> SessionRollup:
        """The subtree totals only, summed by the database (one row back, however big)."""
        uid = parse_uuid(user_id, "user_id")
        handle = parse_session_handle(root_session_handle, "root_session_handle")
        async with self._db.user_transaction(uid) as conn:
            row = await conn.fetchrow(SQL["rollup"], handle)
        if row is None or row["sessions"] == 0:
            raise NotFound("no such session", session_handle=handle)
        values = dict(row)
        for key in ("tokens_used", "context_tokens_used", "iteration_count", "tool_calls_count"):
            values[key] = int(values[key])  # sum(bigint) is numeric
        return SessionRollup(session_handle=handle, **values)

    # --- maintenance ------------------------------------------------------------------------
    async def sweep_timed_out(
        self, older_than: timedelta | None = None, *, limit: int = 1000
    ) -> list[AgentSession]:
        """Mark running sessions idle for longer than ``older_than`` as ``timed_out``.

        A system job (bypasses RLS). It charges nothing: a session's cost is reported only when
        the agent ends it, and a timed-out session cannot be ended again (see docs/sessions.md).
        Returns the sessions it ended, at most ``limit`` per call.
        """
        if older_than is None:
            older_than = timedelta(seconds=self._db.settings.session_idle_timeout)
        if not isinstance(older_than, timedelta) or older_than <= timedelta(0):
            raise InvalidInput("older_than must be a positive timedelta", field="older_than")
        limit = parse_count(limit, "limit", 100_000)
        message = f"no activity for {older_than}"
        async with self._db.system_transaction() as conn:
            rows = await conn.fetch(SQL["sweep"], older_than, message, limit)
        return [session_from_row(r) for r in rows]


def _nest(sessions: list[AgentSession]) -> SessionNode:
    """Nest rows ordered by depth (parents before children) under the first one."""
    children: dict[uuid.UUID, list[AgentSession]] = defaultdict(list)
    for s in sessions[1:]:
        if s.parent_session_id is not None:
            children[s.parent_session_id].append(s)

    def node(s: AgentSession) -> SessionNode:
        return SessionNode(session=s, children=[node(c) for c in children[s.id]])

    return node(sessions[0])


def _rollup(sessions: list[AgentSession]) -> SessionRollup:
    top = sessions[0]
    by_status = {status: 0 for status in STATUSES}
    for s in sessions:
        by_status[s.execution_status] += 1
    depths = [s.session_depth for s in sessions]
    return SessionRollup(
        session_handle=top.session_handle,
        sessions=len(sessions),
        running=by_status["running"],
        completed=by_status["completed"],
        failed=by_status["failed"],
        cancelled=by_status["cancelled"],
        timed_out=by_status["timed_out"],
        max_depth=max(depths),
        height=max(depths) - top.session_depth,
        claude_cost_usd=sum((s.claude_cost_usd for s in sessions), Decimal(0)),
        keen_cost_credits=sum((s.keen_cost_credits for s in sessions), Decimal(0)),
        tokens_used=sum(s.tokens_used for s in sessions),
        context_tokens_used=sum(s.context_tokens_used for s in sessions),
        iteration_count=sum(s.iteration_count for s in sessions),
        tool_calls_count=sum(s.tool_calls_count for s in sessions),
        credit_budget=top.credit_budget,
        budget_used=top.budget_used,
    )
