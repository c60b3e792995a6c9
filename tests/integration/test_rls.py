"""Row-level security, table by table and command by command, as the role keen_app.

Every check looks at rows (as the superuser owner) rather than trusting the absence of an error:
a denied UPDATE or DELETE under RLS silently affects 0 rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import asyncpg
import pytest

from keen_stream.dal.database import TENANT_TABLES, KeenDatabase
from keen_stream.dal.models import User
from keen_stream.errors import InsufficientPrivileges

Owner: TypeAlias = asyncpg.Connection


async def _session_row(owner: Owner, user_id: uuid.UUID) -> uuid.UUID:
    row_id: uuid.UUID = await owner.fetchval(
        """INSERT INTO agent_sessions (user_id, session_id, git_branch, vision, working_directory)
           VALUES ($1, $2, 'main', 'v', '/tmp') RETURNING id""",
        user_id,
        f"s-{uuid.uuid4().hex[:12]}",
    )
    return row_id


async def _arrange_rows(owner: Owner, user: User) -> None:
    """Give ``user`` at least one row in every tenant table (users, accounts, audit exist)."""
    token_id = await owner.fetchval(
        "INSERT INTO auth_tokens (user_id, token_type, token_hash) VALUES ($1, 'api_key', $2)"
        " RETURNING id",
        user.id,
        uuid.uuid4().hex,
    )
    # A ticket and the stream credential redeeming it minted (keen_stream/sql/tickets.sql).
    await owner.execute(
        """WITH ticket AS (
               INSERT INTO stream_tickets (user_id, token_id, kind, secret_hash, expires_at,
                                           used_at)
               VALUES ($1, $2, 'ticket', $3, now() + interval '30 seconds', now())
               RETURNING id)
           INSERT INTO stream_tickets (user_id, token_id, kind, secret_hash, ticket_id,
                                       expires_at)
           SELECT $1, $2, 'credential', $4, id, now() + interval '1 hour' FROM ticket""",
        user.id,
        token_id,
        uuid.uuid4().hex,
        uuid.uuid4().hex,
    )
    session_id = await _session_row(owner, user.id)
    # 0002_ledger: ledger rows are numbered per account and a purchase is positive.
    await owner.execute(
        """INSERT INTO credit_transactions (user_id, account_id, transaction_type, amount,
                                           balance_after, description, sequence_number)
           SELECT $1, id, 'purchase', 1, 1, 'arranged', last_sequence + 1
             FROM credit_accounts WHERE user_id = $1""",
        user.id,
    )
    await owner.execute(
        """INSERT INTO credit_holds (user_id, account_id, estimated_claude_cost_usd,
                                    keen_markup_multiplier, estimated_credits, amount,
                                    description, expires_at)
           SELECT $1, id, 1, 5, 5, 5, 'arranged', now() + interval '1 hour'
             FROM credit_accounts WHERE user_id = $1""",
        user.id,
    )
    await owner.execute(
        """INSERT INTO credit_auto_recharge_requests (user_id, account_id, transaction_id,
                                                     balance_after, threshold)
           SELECT $1, account_id, id, 1, 10 FROM credit_transactions WHERE user_id = $1""",
        user.id,
    )
    await owner.execute(
        """INSERT INTO websocket_connections (user_id, session_id, connection_id, client_ip,
                                             client_type)
           VALUES ($1, $2, $3, '127.0.0.1', 'test')""",
        user.id,
        session_id,
        uuid.uuid4().hex,
    )


@dataclass(frozen=True)
class TableSpec:
    """How to exercise one table as a tenant."""

    owner_column: str
    # An UPDATE that changes nothing meaningful, or None when keen_app has no UPDATE grant.
    update_sql: str | None
    # An INSERT of a row owned by $1, or None when keen_app has no INSERT grant.
    insert_sql: str | None
    delete_granted: bool
    insert_args: Callable[[Owner, uuid.UUID], Awaitable[list[Any]]] = field(
        default=lambda owner, uid: _no_args()
    )


async def _no_args() -> list[Any]:
    return []


async def _session_args(owner: Owner, uid: uuid.UUID) -> list[Any]:
    return [f"s-{uuid.uuid4().hex[:12]}"]


async def _connection_args(owner: Owner, uid: uuid.UUID) -> list[Any]:
    return [uuid.uuid4().hex]


async def _token_args(owner: Owner, uid: uuid.UUID) -> list[Any]:
    return [uuid.uuid4().hex]


SPECS: dict[str, TableSpec] = {
    "users": TableSpec("id", "UPDATE users SET display_name = 'x' WHERE id = $1", None, True),
    "auth_tokens": TableSpec(
        "user_id",
        "UPDATE auth_tokens SET token_name = 'x' WHERE user_id = $1",
        "INSERT INTO auth_tokens (user_id, token_type, token_hash) VALUES ($1, 'api_key', $2)",
        True,
        _token_args,
    ),
    "credit_accounts": TableSpec(
        "user_id", "UPDATE credit_accounts SET daily_limit = 1 WHERE user_id = $1", None, False
    ),
    "credit_transactions": TableSpec("user_id", None, None, False),
    # 0002_ledger: written only by the ledger's SECURITY DEFINER functions.
    "credit_holds": TableSpec("user_id", None, None, False),
    "credit_auto_recharge_requests": TableSpec("user_id", None, None, False),
    # 0003_sessions narrows keen_app to progress/outcome/budget columns and takes DELETE away.
    "agent_sessions": TableSpec(
        "user_id",
        "UPDATE agent_sessions SET current_phase = 'PLAN' WHERE user_id = $1",
        """INSERT INTO agent_sessions (user_id, session_id, git_branch, vision, working_directory)
           VALUES ($1, $2, 'main', 'v', '/tmp')""",
        False,
        _session_args,
    ),
    "websocket_connections": TableSpec(
        "user_id",
        "UPDATE websocket_connections SET user_agent = 'x' WHERE user_id = $1",
        """INSERT INTO websocket_connections (user_id, connection_id, client_ip, client_type)
           VALUES ($1, $2, '127.0.0.1', 'test')""",
        True,
        _connection_args,
    ),
    "audit_log": TableSpec("user_id", None, None, False),
    # Written only by triggers (as keen_system): tenants read their own events.
    "stream_events": TableSpec("user_id", None, None, False),
    # Written only by the ticket functions; tenants list and withdraw their own.
    "stream_tickets": TableSpec("user_id", None, None, True),
}


def test_every_tenant_table_is_in_the_matrix() -> None:
    assert set(SPECS) == set(TENANT_TABLES)


async def test_every_table_with_user_data_has_forced_rls(owner_conn: Owner) -> None:
    """Any public table with a user_id column (or users itself) must be forced under RLS."""
    rows = await owner_conn.fetch(
        """SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity
             FROM pg_class c
            WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'
              AND (c.relname = 'users' OR EXISTS (
                   SELECT 1 FROM pg_attribute a
                    WHERE a.attrelid = c.oid AND a.attname = 'user_id' AND NOT a.attisdropped))"""
    )
    assert rows
    unprotected = [
        r["relname"] for r in rows if not (r["relrowsecurity"] and r["relforcerowsecurity"])
    ]
    assert unprotected == []
    assert {r["relname"] for r in rows} >= set(TENANT_TABLES)


async def test_every_tenant_table_has_one_policy_per_command(owner_conn: Owner) -> None:
    rows = await owner_conn.fetch(
        "SELECT tablename, cmd, count(*) AS n FROM pg_policies WHERE schemaname = 'public' "
        "GROUP BY tablename, cmd"
    )
    by_table: dict[str, dict[str, int]] = {}
    for r in rows:
        by_table.setdefault(r["tablename"], {})[r["cmd"]] = r["n"]
    for table in TENANT_TABLES:
        assert by_table.get(table) == {"SELECT": 1, "INSERT": 1, "UPDATE": 1, "DELETE": 1}, table


async def _count(owner: Owner, table: str, column: str, uid: uuid.UUID) -> int:
    count: int = await owner.fetchval(f"SELECT count(*) FROM {table} WHERE {column} = $1", uid)
    return count


async def _snapshot(owner: Owner, table: str, column: str, uid: uuid.UUID) -> list[str]:
    rows = await owner.fetch(
        f"SELECT to_jsonb(t)::text AS j FROM {table} t WHERE {column} = $1 ORDER BY 1", uid
    )
    return [r["j"] for r in rows]


@pytest.fixture
async def tenants(db: KeenDatabase, owner_conn: Owner, alice: User, bob: User, admin: User):
    for user in (alice, bob, admin):
        await _arrange_rows(owner_conn, user)
    return alice, bob, admin


@pytest.mark.parametrize("table", sorted(SPECS))
async def test_select_sees_only_own_rows(
    db: KeenDatabase, owner_conn: Owner, tenants, table: str
) -> None:
    alice, bob, admin = tenants
    spec = SPECS[table]
    async with db.user_transaction(alice.id) as conn:
        owners = [r[0] for r in await conn.fetch(f"SELECT {spec.owner_column} FROM {table}")]
    assert owners, f"alice sees none of her own {table} rows"
    assert set(owners) == {alice.id}
    assert len(owners) == await _count(owner_conn, table, spec.owner_column, alice.id)

    async with db.user_transaction(admin.id) as conn:
        seen = {r[0] for r in await conn.fetch(f"SELECT {spec.owner_column} FROM {table}")}
    assert {alice.id, bob.id, admin.id} <= seen

    async with db.anonymous_transaction() as conn:
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0


@pytest.mark.parametrize("table", sorted(SPECS))
async def test_insert_for_another_user_is_refused(
    db: KeenDatabase, owner_conn: Owner, tenants, table: str
) -> None:
    alice, bob, _ = tenants
    spec = SPECS[table]
    before = await _count(owner_conn, table, spec.owner_column, bob.id)
    sql = spec.insert_sql or f"INSERT INTO {table} ({spec.owner_column}) VALUES ($1)"
    args = await spec.insert_args(owner_conn, bob.id)
    with pytest.raises(InsufficientPrivileges):
        async with db.user_transaction(alice.id) as conn:
            await conn.execute(sql, bob.id, *args)
    assert await _count(owner_conn, table, spec.owner_column, bob.id) == before

    # With no user at all, not even an insert "for nobody" gets through.
    with pytest.raises(InsufficientPrivileges):
        async with db.anonymous_transaction() as conn:
            await conn.execute(sql, bob.id, *args)
    assert await _count(owner_conn, table, spec.owner_column, bob.id) == before


@pytest.mark.parametrize("table", sorted(s for s in SPECS if SPECS[s].insert_sql))
async def test_insert_own_row_and_admin_for_anyone(
    db: KeenDatabase, owner_conn: Owner, tenants, table: str
) -> None:
    alice, _, admin = tenants
    spec = SPECS[table]
    assert spec.insert_sql is not None
    before = await _count(owner_conn, table, spec.owner_column, alice.id)
    async with db.user_transaction(alice.id) as conn:
        await conn.execute(spec.insert_sql, alice.id, *await spec.insert_args(owner_conn, alice.id))
    async with db.user_transaction(admin.id) as conn:
        await conn.execute(spec.insert_sql, alice.id, *await spec.insert_args(owner_conn, alice.id))
    assert await _count(owner_conn, table, spec.owner_column, alice.id) == before + 2


@pytest.mark.parametrize("table", sorted(SPECS))
async def test_update_of_another_users_rows_changes_nothing(
    db: KeenDatabase, owner_conn: Owner, tenants, table: str
) -> None:
    alice, bob, admin = tenants
    spec = SPECS[table]
    before = await _snapshot(owner_conn, table, spec.owner_column, bob.id)
    col = spec.owner_column
    sql = spec.update_sql or f"UPDATE {table} SET {col} = {col} WHERE {col} = $1"
    try:
        async with db.user_transaction(alice.id) as conn:
            status = await conn.execute(sql, bob.id)
        assert status.endswith(" 0"), status  # RLS hides bob's rows: nothing matched
    except InsufficientPrivileges:
        assert spec.update_sql is None  # only where keen_app has no such grant
    assert await _snapshot(owner_conn, table, spec.owner_column, bob.id) == before

    if spec.update_sql:
        async with db.user_transaction(admin.id) as conn:
            status = await conn.execute(spec.update_sql, bob.id)
        assert not status.endswith(" 0")
        assert await _snapshot(owner_conn, table, spec.owner_column, bob.id) != before


@pytest.mark.parametrize("table", sorted(SPECS))
async def test_delete_of_another_users_rows_removes_nothing(
    db: KeenDatabase, owner_conn: Owner, tenants, table: str
) -> None:
    alice, bob, _ = tenants
    spec = SPECS[table]
    before = await _count(owner_conn, table, spec.owner_column, bob.id)
    try:
        async with db.user_transaction(alice.id) as conn:
            status = await conn.execute(
                f"DELETE FROM {table} WHERE {spec.owner_column} = $1", bob.id
            )
        assert status == "DELETE 0"
    except InsufficientPrivileges as exc:
        assert not spec.delete_granted, exc
    assert await _count(owner_conn, table, spec.owner_column, bob.id) == before


async def test_user_can_update_own_profile_but_not_privileges(
    db: KeenDatabase, owner_conn: Owner, alice: User
) -> None:
    async with db.user_transaction(alice.id) as conn:
        await conn.execute("UPDATE users SET display_name = 'Alice' WHERE id = $1", alice.id)
    for change in (
        "role = 'admin', is_admin = true",
        "account_status = 'active', email_verified = true",
        "admin_privileges = '{\"manage_users\": true}'",
    ):
        with pytest.raises(InsufficientPrivileges):
            async with db.user_transaction(alice.id) as conn:
                await conn.execute(f"UPDATE users SET {change} WHERE id = $1", alice.id)
    row = await owner_conn.fetchrow("SELECT * FROM users WHERE id = $1", alice.id)
    assert row["display_name"] == "Alice"
    assert (row["role"], row["is_admin"], row["email_verified"]) == ("user", False, False)
    assert row["admin_privileges"] == {}


async def test_tenant_cannot_read_secret_columns(db: KeenDatabase, alice: User) -> None:
    for column in ("password_hash", "mfa_secret", "recovery_codes", "email_verification_token"):
        with pytest.raises(InsufficientPrivileges):
            async with db.user_transaction(alice.id) as conn:
                await conn.fetchval(f"SELECT {column} FROM users WHERE id = $1", alice.id)
    with pytest.raises(InsufficientPrivileges):
        async with db.user_transaction(alice.id) as conn:
            await conn.fetchval(
                "SELECT secret_hash FROM stream_tickets WHERE user_id = $1", alice.id
            )


async def test_tickets_are_reached_only_through_their_secrets(
    db: KeenDatabase, owner_conn: Owner, tenants
) -> None:
    """The ticket functions answer for a secret's hash; the one that looks a token up by its id
    (no secret) is not the tenant's to call, and a tenant cannot write a ticket directly."""
    alice, bob, _ = tenants
    token_id = await owner_conn.fetchval("SELECT id FROM auth_tokens WHERE user_id = $1", bob.id)
    with pytest.raises(InsufficientPrivileges):
        async with db.user_transaction(alice.id) as conn:
            await conn.fetch("SELECT * FROM keen_stream_ticket_token($1)", token_id)
    with pytest.raises(InsufficientPrivileges):
        async with db.user_transaction(alice.id) as conn:
            await conn.execute(
                "UPDATE stream_tickets SET expires_at = now() + interval '1 year'"
                " WHERE user_id = $1",
                alice.id,
            )
    async with db.anonymous_transaction() as conn:
        row = await conn.fetchrow(
            "SELECT * FROM keen_stream_credential_authenticate($1, NULL)", uuid.uuid4().hex
        )
    assert row["status"] == "credential_unknown" and row["user_id"] is None


async def test_tenant_cannot_change_balances_or_the_ledger(
    db: KeenDatabase, owner_conn: Owner, alice: User
) -> None:
    for sql in (
        "UPDATE credit_accounts SET current_balance = 1000 WHERE user_id = $1",
        "UPDATE credit_accounts SET unlimited_credits = true WHERE user_id = $1",
        """INSERT INTO credit_transactions (user_id, account_id, transaction_type, amount,
               balance_after, description)
           SELECT $1, id, 'purchase', 1000, 1000, 'free money' FROM credit_accounts
            WHERE user_id = $1""",
    ):
        with pytest.raises(InsufficientPrivileges):
            async with db.user_transaction(alice.id) as conn:
                await conn.execute(sql, alice.id)
    account = await owner_conn.fetchrow(
        "SELECT * FROM credit_accounts WHERE user_id = $1", alice.id
    )
    assert account["current_balance"] == 0 and not account["unlimited_credits"]
    assert await owner_conn.fetchval("SELECT count(*) FROM credit_transactions") == 0


async def test_settings_do_not_leak_to_the_next_pooled_transaction(settings, alice: User) -> None:
    single = await KeenDatabase.connect(
        settings=settings.model_copy(update={"pool_min_size": 1, "pool_max_size": 1}),
        migrate=False,
    )
    try:
        async with single.user_transaction(alice.id) as conn:
            first_pid = conn.get_server_pid()
            assert await conn.fetchval("SELECT current_user") == "keen_app"
            assert await conn.fetchval("SELECT keen_current_user_id()") == alice.id
        async with single.pool.acquire() as conn:
            assert conn.get_server_pid() == first_pid  # the very same backend
            assert await conn.fetchval("SELECT keen_current_user_id()") is None
            assert await conn.fetchval("SELECT current_user") != "keen_app"
        async with single.anonymous_transaction() as conn:
            assert conn.get_server_pid() == first_pid
            assert await conn.fetchval("SELECT count(*) FROM users") == 0
    finally:
        await single.close()


async def test_a_failed_transaction_leaks_nothing_either(settings, alice: User) -> None:
    single = await KeenDatabase.connect(
        settings=settings.model_copy(update={"pool_min_size": 1, "pool_max_size": 1}),
        migrate=False,
    )
    try:
        with pytest.raises(ZeroDivisionError):
            async with single.user_transaction(alice.id):
                raise ZeroDivisionError
        async with single.anonymous_transaction() as conn:
            assert await conn.fetchval("SELECT count(*) FROM users") == 0
            assert await conn.fetchval("SELECT keen_current_user_id()") is None
    finally:
        await single.close()


async def test_seed_isolation_user_sees_own_sessions_admin_sees_all(
    db: KeenDatabase, owner_conn: Owner, alice: User, bob: User, admin: User
) -> None:
    """The seed's 'enforces user isolation at database level', at the SQL level."""
    a = await _session_row(owner_conn, alice.id)
    b = await _session_row(owner_conn, bob.id)
    async with db.user_transaction(alice.id) as conn:
        mine = [r["id"] for r in await conn.fetch("SELECT id FROM agent_sessions")]
    assert mine == [a]
    async with db.user_transaction(admin.id) as conn:
        every = {r["id"] for r in await conn.fetch("SELECT id FROM agent_sessions")}
    assert {a, b} <= every


async def test_suspended_admin_loses_admin_view(
    db: KeenDatabase, owner_conn: Owner, alice: User, admin: User
) -> None:
    await owner_conn.execute(
        "UPDATE users SET account_status = 'suspended' WHERE id = $1", admin.id
    )
    async with db.user_transaction(admin.id) as conn:
        ids = {r["id"] for r in await conn.fetch("SELECT id FROM users")}
    assert ids == {admin.id}


@pytest.mark.parametrize("table", ["auth_tokens", "websocket_connections"])
async def test_users_delete_their_own_rows_and_admins_anyones(
    db: KeenDatabase, owner_conn: Owner, tenants, table: str
) -> None:
    alice, bob, admin = tenants
    async with db.user_transaction(alice.id) as conn:
        mine = await conn.execute(f"DELETE FROM {table} WHERE user_id = $1", alice.id)
    assert mine != "DELETE 0"
    assert await _count(owner_conn, table, "user_id", alice.id) == 0
    async with db.user_transaction(admin.id) as conn:
        theirs = await conn.execute(f"DELETE FROM {table} WHERE user_id = $1", bob.id)
    assert theirs != "DELETE 0"
    assert await _count(owner_conn, table, "user_id", bob.id) == 0
