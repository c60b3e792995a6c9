"""KeenDatabase: the pool, the RLS transaction contexts, and the DAOs hanging off it."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from decimal import Decimal
from typing import Any

import asyncpg

from keen_stream.dal.events import SIGNAL_SETTING, EventSignal
from keen_stream.dal.pgerrors import connect_error, translating
from keen_stream.dal.validation import parse_uuid
from keen_stream.embedded import EmbeddedPostgres
from keen_stream.errors import DatabaseError, DatabaseUnavailable, UnsafeRoleError
from keen_stream.settings import Settings, get_settings

logger = logging.getLogger(__name__)

#: The role tenant work runs as. NOLOGIN, NOSUPERUSER, NOBYPASSRLS, owns nothing.
TENANT_ROLE = "keen_app"
#: The role maintenance work runs as (bypasses RLS; reached only via system_transaction()).
SYSTEM_ROLE = "keen_system"
#: Tables whose rows belong to a user; each must have RLS enabled and forced.
TENANT_TABLES = (
    "users",
    "auth_tokens",
    "credit_accounts",
    "credit_transactions",
    "agent_sessions",
    "websocket_connections",
    "audit_log",
    "stream_events",
    "credit_holds",
    "credit_auto_recharge_requests",
    "stream_tickets",
)

# One statement sets both: the role and the user live until the transaction ends (is_local),
# so nothing leaks to the next borrower of the pooled connection (notes: RLS pitfalls 2-6).
_ENTER_TENANT = (
    "SELECT set_config('role', 'keen_app', true), set_config('app.current_user_id', $1, true)"
)
_ENTER_SYSTEM = "SELECT set_config('role', 'keen_system', true)"
# keen_billing: the only role that may mint credits or set the price (migration 0007).
_ENTER_BILLING = (
    "SELECT set_config('role', 'keen_billing', true), set_config('app.current_user_id', $1, true)"
)
#: The acting user of :meth:`KeenDatabase.user_call`, written as the called function's argument.
USER_CALL_ARG = "set_config('app.current_user_id', $1, true)::uuid"
#: The tenant context of :meth:`KeenDatabase.tenant_call`: the role, then the user, written as the
#: called function's first two arguments (``p_role text, p_user uuid``).
TENANT_CALL_ARGS = f"set_config('role', '{TENANT_ROLE}', true), {USER_CALL_ARG}"

_ROLE_SAFETY = """
SELECT r.rolsuper, r.rolbypassrls,
       (SELECT count(*) FROM pg_class c WHERE c.relowner = r.oid) AS owned,
       (SELECT coalesce(array_agg(c.relname::text), '{}') FROM pg_class c
         WHERE c.relname = ANY($2::text[]) AND c.relkind = 'r'
           AND c.relnamespace = 'public'::regnamespace
           AND NOT (c.relrowsecurity AND c.relforcerowsecurity)) AS unprotected,
       (SELECT coalesce(array_agg(t), '{}') FROM unnest($2::text[]) AS t
         WHERE to_regclass('public.' || t) IS NULL) AS missing,
       has_database_privilege(r.oid, current_database(), 'TEMPORARY') AS can_create_temp,
       has_schema_privilege(r.oid, 'public', 'CREATE') AS can_create_in_public,
       current_database() AS database
  FROM pg_roles r WHERE r.rolname = $1
"""

#: Prepared statements are session state the reset cannot clear: DEALLOCATE ALL would drop
#: asyncpg's own, which it runs by name. PREPARE and DEALLOCATE need no privilege, so a
#: borrower's SQL can put its own statement under the name of one asyncpg cached, and the next
#: borrower would run it in its own context. A statement prepared by SQL (``from_sql``) is
#: never the DAL's: the connection is closed instead of being handed out again. The check
#: answers in its command status (``SELECT 1``: one is there) rather than by raising, so it can
#: never be mistaken for a failure of the COMMIT before it. (A borrower that only DEALLOCATEs
#: one of asyncpg's leaves nothing to run: the next use fails with 26000, and that connection is
#: closed then, see pgerrors.)
STATEMENTS_LEFT = "SELECT 1 FROM pg_catalog.pg_prepared_statements WHERE from_sql LIMIT 1"
#: The command status of :data:`STATEMENTS_LEFT` when the session must not be pooled again.
NOT_RESETTABLE = "SELECT 1"
_NOT_RESETTABLE_MESSAGE = "a borrower left SQL-level prepared statements on the session"
#: Everything a borrower can leave on its session: DISCARD ALL without DEALLOCATE ALL (which
#: would drop asyncpg's prepared statements) and DISCARD PLANS. SET SESSION AUTHORIZATION
#: DEFAULT also ends a session-level SET ROLE, which RESET ALL leaves alone; RESET ALL goes
#: back to the settings the connection started with (statement_timeout, keen.stream_signal).
#: Then the one thing it cannot reset, checked last (so a refusal comes after everything else).
RESET_SESSION = (
    "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DISCARD TEMP; DISCARD SEQUENCES;"
    f" CLOSE ALL; UNLISTEN *; SELECT pg_advisory_unlock_all(); {STATEMENTS_LEFT}"
)


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default, separators=(",", ":"))


async def init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=dumps, decoder=json.loads, schema="pg_catalog")


class SessionReset:
    """Nothing one borrower leaves on a pooled session reaches the next one.

    SQL in a transaction context can leave temp tables, session-level settings (a
    ``SET ROLE``, a ``search_path``), advisory locks, LISTENs and open cursors. asyncpg's own
    reset on release costs one more round trip per borrow (about a fifth of a deduction) and
    keeps temp tables and the role. So the DAL's transaction contexts send :data:`RESET_SESSION`
    in the same message as their COMMIT or ROLLBACK, and the one-statement calls need none (a
    statement we wrote, which sets nothing beyond its own transaction): both vouch for the
    connection. The pool's reset hook resets every other borrow (code using ``db.pool``).
    """

    def __init__(self) -> None:
        self._clean: set[int] = set()  # backend pids vouched for until their release

    def vouch(self, conn: asyncpg.Connection) -> None:
        self._clean.add(conn.get_server_pid())

    async def on_connect(self, conn: asyncpg.Connection) -> None:
        """The pool's ``init``: a new backend may reuse a pid vouched for on a dead one."""
        self._clean.discard(conn.get_server_pid())
        await init_connection(conn)

    async def on_release(self, conn: asyncpg.Connection) -> None:
        """The pool's ``reset`` (asyncpg has already rolled back an open transaction).

        A session that cannot be reset (:data:`STATEMENTS_LEFT`) is refused with an error that
        reaches the releaser, and asyncpg terminates the connection instead of pooling it.
        """
        pid = conn.get_server_pid()
        if pid in self._clean:
            self._clean.discard(pid)
        elif await conn.execute(RESET_SESSION) == NOT_RESETTABLE:
            raise DatabaseError(_NOT_RESETTABLE_MESSAGE)

    @asynccontextmanager
    async def transaction(self, conn: asyncpg.Connection) -> AsyncIterator[None]:
        """A transaction that ends with its COMMIT (or ROLLBACK) and the reset, one message.

        It is asyncpg's, so ``conn.transaction()`` inside it still nests as a savepoint.
        asyncpg cannot end a transaction with another statement than its own, so it is told
        the transaction is over as its own commit() and rollback() tell it, first.
        """
        tx = conn.transaction()
        await tx.start()
        try:
            yield
        except BaseException:
            await self._end(tx, conn, f"ROLLBACK; {RESET_SESSION}")
            raise
        await self._end(tx, conn, f"COMMIT; {RESET_SESSION}")

    async def _end(self, tx: Any, conn: asyncpg.Connection, query: str) -> None:
        tx._connection._top_xact = None
        if await conn.execute(query) == NOT_RESETTABLE:
            # The transaction ended as asked; only the session is unfit to be pooled.
            logger.warning("closing a pooled connection: %s", _NOT_RESETTABLE_MESSAGE)
            conn.terminate()
            return
        self.vouch(conn)


class KeenDatabase:
    """Entry point of the data layer.

    ``await KeenDatabase.connect()`` opens a pool (starting the embedded PostgreSQL when no DSN is
    configured), checks that the tenant role cannot bypass RLS, and exposes the DAOs:
    ``db.users``, ``db.tokens`` (and, as their issues land, ``db.credits``, ``db.sessions``...).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        *,
        dsn: str,
        embedded: EmbeddedPostgres | None = None,
        session_reset: SessionReset | None = None,
    ) -> None:
        from keen_stream.dal.analytics import AnalyticsDAO
        from keen_stream.dal.billing import BillingDAO
        from keen_stream.dal.connections import ConnectionDAO
        from keen_stream.dal.credits import CreditManager
        from keen_stream.dal.events import EventDAO
        from keen_stream.dal.sessions import SessionDAO
        from keen_stream.dal.tickets import TicketDAO
        from keen_stream.dal.tokens import TokenDAO
        from keen_stream.dal.users import UserDAO

        self.pool = pool
        self.settings = settings
        self.dsn = dsn
        self._embedded = embedded
        self.users = UserDAO(self)
        self.tokens = TokenDAO(self)
        self.tickets = TicketDAO(self)
        self.events = EventDAO(self)
        self.connections = ConnectionDAO(self)
        self.credits = CreditManager(self)
        self.sessions = SessionDAO(self)
        self.analytics = AnalyticsDAO(self)
        self.billing = BillingDAO(self)
        self._session_reset = session_reset or SessionReset()
        self._closed = False

    # --- lifecycle -------------------------------------------------------------------------
    @classmethod
    async def connect(
        cls,
        dsn: str | None = None,
        *,
        settings: Settings | None = None,
        migrate: bool | None = None,
    ) -> KeenDatabase:
        """Open the pool. ``dsn=None`` uses ``KEEN_DATABASE_URL`` or the embedded PostgreSQL.

        Migrations run first when ``migrate`` is true; by default (``KEEN_AUTO_MIGRATE`` unset)
        only the embedded database, which belongs to keen_stream alone, is migrated on connect.
        """
        settings = settings or get_settings()
        embedded: EmbeddedPostgres | None = None
        dsn = dsn or settings.database_url
        if dsn is None:
            embedded = EmbeddedPostgres(settings.embedded_dir, settings.embedded_database)
            dsn = embedded.start()
        if migrate is None:
            migrate = settings.auto_migrate if settings.auto_migrate is not None else bool(embedded)
        session_reset = SessionReset()
        try:
            if migrate:
                from keen_stream.migrate import upgrade_async

                await upgrade_async(dsn)
            pool = await asyncpg.create_pool(
                dsn,
                min_size=settings.pool_min_size,
                max_size=settings.pool_max_size,
                max_inactive_connection_lifetime=settings.pool_max_inactive_lifetime,
                max_queries=settings.pool_max_queries,
                timeout=settings.connect_timeout,
                init=session_reset.on_connect,
                reset=session_reset.on_release,
                server_settings={
                    "statement_timeout": str(settings.statement_timeout_ms),
                    # Whatever the database's default: code that waits for a lock and then reads
                    # (the analytics roll, the ledger's idempotency replay) needs each
                    # statement's own snapshot.
                    "default_transaction_isolation": "read committed",
                    "application_name": "keen_stream",
                    **SIGNAL_SETTING,
                },
            )
        except BaseException as exc:
            if embedded is not None:
                embedded.stop()
            error = connect_error(exc)
            if error is None:
                raise
            raise error from exc
        db = cls(pool, settings, dsn=dsn, embedded=embedded, session_reset=session_reset)
        try:
            await db.check_role_safety()
        except BaseException:
            await db.close()
            raise
        return db

    async def close(self) -> None:
        """Close the pool (and stop the embedded server, if it was started here). Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.credits.drain()
        await self.events.close()
        await self.pool.close()
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None

    async def __aenter__(self) -> KeenDatabase:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def check_role_safety(self, role: str = TENANT_ROLE) -> None:
        """Refuse tenant work if ``role`` could bypass RLS or a tenant table is unprotected."""
        async with self._transaction(None) as conn:
            row = await conn.fetchrow(_ROLE_SAFETY, role, list(TENANT_TABLES))
        if row is None:
            raise UnsafeRoleError(
                f"role {role} does not exist: the cluster is not migrated"
                " (run `keen-stream migrate`)"
            )
        problems = []
        if row["rolsuper"]:
            problems.append("is a superuser")
        if row["rolbypassrls"]:
            problems.append("has BYPASSRLS")
        if row["owned"]:
            problems.append(f"owns {row['owned']} relations")
        if len(row["missing"]) == len(TENANT_TABLES):
            problems.append(
                "finds none of keen_stream's tables: the database is not migrated"
                " (run migrations: `keen-stream migrate`)"
            )
        elif row["missing"]:
            # Some tables but not all: a database at an older revision than this release
            # (every release that adds a tenant table lands here before any other check).
            revision = await self.schema_revision()
            problems.append(
                f"finds no tables {', '.join(row['missing'])}: its schema is at revision"
                f" {revision or '(none)'} (run migrations: `keen-stream migrate`)"
            )
        if row["unprotected"]:
            problems.append(f"tables without forced RLS: {', '.join(row['unprotected'])}")
        if row["can_create_temp"]:
            # A database copied from a template, or restored without --create, has the
            # default grant back: temp tables would be searched first by unqualified names.
            database = row["database"]
            problems.append(
                f'can create temporary tables (run: REVOKE TEMPORARY ON DATABASE "{database}"'
                f' FROM PUBLIC; GRANT TEMPORARY ON DATABASE "{database}" TO keen_system)'
            )
        if row["can_create_in_public"]:
            problems.append("can create objects in schema public")
        if problems:
            raise UnsafeRoleError(f"{role} {'; '.join(problems)}; refusing tenant work")

    async def schema_revision(self) -> str | None:
        """The Alembic revision the database is at; None if it was never migrated."""
        async with self._transaction(None) as conn:
            if await conn.fetchval("SELECT to_regclass('public.alembic_version')") is None:
                return None
            revision: str | None = await conn.fetchval(
                "SELECT version_num FROM public.alembic_version"
            )
        return revision

    async def health(self) -> dict[str, Any]:
        """Round-trip the database; report latency and pool use. Never raises."""
        started = time.perf_counter()
        try:
            # One statement of ours, as the other DAL calls run it: a connection that failed
            # (26000 included) is closed, so the next probe does not fail on it again.
            async with self._transaction(None) as conn:
                version = await conn.fetchval("SELECT current_setting('server_version')")
        except Exception as exc:  # health reports; it does not throw
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {
            "ok": True,
            "server_version": version,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            "pool_size": self.pool.get_size(),
            "pool_idle": self.pool.get_idle_size(),
            "embedded": self._embedded is not None,
        }

    # --- transaction contexts --------------------------------------------------------------
    @asynccontextmanager
    async def user_transaction(self, user_id: uuid.UUID | str) -> AsyncIterator[asyncpg.Connection]:
        """A transaction running as ``keen_app`` with ``app.current_user_id`` = ``user_id``.

        Every statement inside is filtered by RLS for this user (admins see all, decided by the
        database). Known PostgreSQL errors surface as domain errors.
        """
        uid = parse_uuid(user_id, "user_id")
        async with self._transaction(_ENTER_TENANT, str(uid)) as conn:
            yield conn

    @asynccontextmanager
    async def anonymous_transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A transaction as ``keen_app`` with no user: it sees no tenant row at all."""
        async with self._transaction(_ENTER_TENANT, "") as conn:
            yield conn

    @asynccontextmanager
    async def billing_transaction(
        self, actor_id: uuid.UUID | str | None = None
    ) -> AsyncIterator[asyncpg.Connection]:
        """A transaction as ``keen_billing``: purchases, refunds, adjustments, the price.

        For the payment webhook and admin tools only (``db.billing``), never for tenant code.
        ``actor_id`` is the admin acting, if any: the database checks that they are an active
        admin and records them (adjustments and price changes require one).
        """
        actor = "" if actor_id is None else str(parse_uuid(actor_id, "actor_id"))
        async with self._transaction(_ENTER_BILLING, actor) as conn:
            yield conn

    @asynccontextmanager
    async def system_transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A transaction as ``keen_system`` (bypasses RLS) for maintenance jobs and registration.

        Use it only where no single tenant's context applies; every use is a reviewed code path.
        """
        async with self._transaction(_ENTER_SYSTEM) as conn:
            yield conn

    async def user_call(
        self, user_id: uuid.UUID | str, query: str, *args: Any
    ) -> asyncpg.Record | None:
        """One round trip acting as ``user_id``: ``query`` alone, in its own implicit transaction.

        For calling ONE SECURITY DEFINER function that authorizes by ``keen_current_user_id()``
        (the ledger's deduction): ``query`` passes :data:`USER_CALL_ARG` (``$1``) as that
        function's user argument. Arguments are evaluated before the body runs, so the body sees
        the context; ``set_config(..., true)`` outside BEGIN lasts until the statement's implicit
        transaction ends, so nothing reaches the next borrower. One message instead of four
        (BEGIN, context, call, COMMIT). The statement does not run as keen_app (privileges are
        checked when it starts), so it must not read tenant tables itself: RLS would not filter
        them. ``tests/integration/test_credits_one_round_trip.py`` holds these claims.
        """
        if USER_CALL_ARG not in query:
            raise ValueError("user_call: the query must pass USER_CALL_ARG to the function")
        return await self._call_as(user_id, query, args)

    async def tenant_call(
        self, user_id: uuid.UUID | str, query: str, *args: Any
    ) -> asyncpg.Record | None:
        """One round trip running ONE SECURITY INVOKER function as ``keen_app`` for ``user_id``.

        Like :meth:`user_call`, but the function's body runs as the tenant, under RLS and the
        tenant-only triggers, exactly as it would inside :meth:`user_transaction`: ``query``
        passes :data:`TENANT_CALL_ARGS` as the function's first arguments, which switch the
        role and the user before the body runs (the function's own statements are planned and
        checked when they run, as ``keen_app``). Both settings end with the statement's
        implicit transaction. The function must refuse to run as anyone else (see migration
        0006): called without the switch, its statements would not be filtered by RLS.

        Why: the statement's transaction commits on the server as soon as it ends, so a write
        that produces stream events never holds its transaction id across a client round
        trip, which every later event would wait for (dal/events.py, the horizon).
        """
        if TENANT_CALL_ARGS not in query:
            raise ValueError("tenant_call: the query must pass TENANT_CALL_ARGS to the function")
        return await self._call_as(user_id, query, args)

    async def _call_as(
        self, user_id: uuid.UUID | str, query: str, args: tuple[Any, ...]
    ) -> asyncpg.Record | None:
        uid = parse_uuid(user_id, "user_id")
        async with self._transaction(None) as conn:
            return await conn.fetchrow(query, str(uid), *args)

    async def system_call(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """One round trip, ``query`` alone in its own implicit transaction, as the login role.

        For SECURITY DEFINER functions that only the system context may execute and that
        authorize each item themselves (the ledger's batched deduction sets each item's user
        before charging it). Like :meth:`user_call`, the statement itself must not read tenant
        tables: RLS would not filter them.
        """
        async with self._transaction(None) as conn:
            rows: list[asyncpg.Record] = await conn.fetch(query, *args)
            return rows

    @asynccontextmanager
    async def _transaction(
        self, enter: str | None, *args: Any
    ) -> AsyncIterator[asyncpg.Connection]:
        # Stream-event triggers raise a NOTICE on our connections; after the commit (never
        # inside the transaction) the event readers get a coalesced wake-up (dal/events.py).
        signal = EventSignal()
        with translating():  # only the pool runs here: whatever it raises is the driver's
            acquire = self.pool.acquire(timeout=self.settings.pool_acquire_timeout)
            conn = await acquire.__aenter__()
        failed = True
        try:
            conn.add_log_listener(signal)
            with translating(conn):
                if enter is None:  # user_call: the one statement is its own transaction
                    self._session_reset.vouch(conn)
                    yield conn
                else:
                    async with self._session_reset.transaction(conn):
                        await conn.execute(enter, *args)
                        yield conn
            failed = False
        except DatabaseUnavailable:
            # The connection may be half dead: asyncpg can read a killed backend's FATAL while
            # idle and fail every later query with InternalClientError long before the socket
            # closes. Never hand it out again.
            with suppress(asyncpg.InterfaceError):
                conn.terminate()
            raise
        finally:
            # If the connection died, asyncpg has already released it (and its listeners).
            with suppress(asyncpg.InterfaceError):
                conn.remove_log_listener(signal)
            try:
                with translating():  # the release may roll back or wait for a cancel
                    await acquire.__aexit__(None, None, None)
            except DatabaseError:
                if not failed:
                    raise
                # Else the call's own error (or cancellation) is the one the caller must see.
        if signal.seen:
            self.events.after_commit()
