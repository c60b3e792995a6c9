"""SECURITY DEFINER functions resolve only trusted schemas; tenants create no temporary objects.

A schema list without ``pg_temp`` makes PostgreSQL search the session's temporary schema FIRST
for tables and types, so a temp table named like one of ours would be what a function owned by
keen_system reads and writes. Each attack below is the issue's, run for real: it worked before
migration 0007.
"""

from __future__ import annotations

from decimal import Decimal

import asyncpg
import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.errors import InsufficientPrivileges, UnsafeRoleError
from keen_stream.settings import Settings
from tests.integration.credits_support import account, fund

D = Decimal

#: Every function that runs with a pinned schema list, and every SECURITY DEFINER function.
PINNED_FUNCTIONS = """
    SELECT p.oid::regprocedure::text AS function, p.prosecdef AS definer,
           (SELECT substr(c, length('search_path=') + 1) FROM unnest(p.proconfig) AS c
             WHERE c LIKE 'search_path=%') AS search_path
      FROM pg_proc p
     WHERE p.pronamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
       AND (p.prosecdef
            OR EXISTS (SELECT 1 FROM unnest(p.proconfig) AS c WHERE c LIKE 'search_path=%'))
"""
AUDIT_LOG_COPY = "(LIKE public.audit_log INCLUDING DEFAULTS INCLUDING IDENTITY)"
#: The schemas a pinned path may name between pg_catalog (first) and pg_temp (last).
TRUSTED = {"public"}


async def unsafe_search_paths(conn: asyncpg.Connection) -> list[str]:
    """Functions whose schema list is missing, does not start with pg_catalog, names an
    untrusted schema, or does not end with pg_temp (which is then searched first)."""
    unsafe = []
    for row in await conn.fetch(PINNED_FUNCTIONS):
        path = row["search_path"]
        schemas = [s.strip().strip('"') for s in path.split(",")] if path else []
        if (
            len(schemas) < 2
            or schemas[0] != "pg_catalog"
            or schemas[-1] != "pg_temp"
            or not set(schemas[1:-1]) <= TRUSTED
        ):
            unsafe.append(f"{row['function']}: {path}")
    return sorted(unsafe)


async def plant_temp_table(conn: asyncpg.Connection, name: str, definition: str) -> None:
    """Tenant SQL leaving a temp table where a definer function might look.

    keen_app had TEMP through PUBLIC. It no longer has, but SQL in a tenant transaction can
    still step back to the login role (RESET ROLE; docs/schema.md says what the role switch
    does and does not guard), so the functions themselves must not look in pg_temp.
    """
    await conn.execute("RESET ROLE")
    await conn.execute(f"CREATE TEMP TABLE {name} {definition}")
    await conn.execute(f"GRANT ALL ON pg_temp.{name} TO PUBLIC")
    await conn.execute("SET LOCAL ROLE keen_app")


def _single(settings: Settings) -> Settings:
    return settings.model_copy(update={"pool_min_size": 1, "pool_max_size": 1})


# --- the catalogue --------------------------------------------------------------------------
async def test_every_security_definer_function_pins_a_path_ending_with_pg_temp(owner_conn):
    definers = await owner_conn.fetchval(
        "SELECT count(*) FROM pg_proc WHERE prosecdef AND pronamespace = 'public'::regnamespace"
    )
    assert definers >= 20
    assert await unsafe_search_paths(owner_conn) == []


async def test_the_catalogue_check_flags_a_function_that_does_not(owner_conn):
    for name, clause in {
        "probe_no_path": "",
        "probe_temp_searched_first": "SET search_path = pg_catalog, public",
        "probe_temp_named_first": "SET search_path = pg_temp, pg_catalog, public",
        "probe_untrusted_schema": "SET search_path = pg_catalog, elsewhere, pg_temp",
        "probe_safe": "SET search_path = pg_catalog, public, pg_temp",
    }.items():
        await owner_conn.execute(
            f"CREATE FUNCTION {name}() RETURNS int LANGUAGE sql SECURITY DEFINER {clause}"
            " AS 'SELECT 1'"
        )
    flagged = await unsafe_search_paths(owner_conn)
    assert [f.split(":")[0] for f in flagged] == [
        "probe_no_path()",
        "probe_temp_named_first()",
        "probe_temp_searched_first()",
        "probe_untrusted_schema()",
    ]


# --- temporary objects ----------------------------------------------------------------------
async def test_the_tenant_role_cannot_create_temporary_tables(db: KeenDatabase, alice: User):
    with pytest.raises(InsufficientPrivileges):
        async with db.user_transaction(alice.id) as conn:
            await conn.execute("CREATE TEMP TABLE users (id uuid, is_admin boolean)")


@pytest.mark.parametrize("grantee", ["PUBLIC", "keen_app"])
async def test_startup_refuses_a_tenant_role_that_can_create_temporary_tables(
    settings: Settings, owner_conn, grantee: str
):
    database = await owner_conn.fetchval("SELECT current_database()")
    await owner_conn.execute(f'GRANT TEMPORARY ON DATABASE "{database}" TO {grantee}')
    with pytest.raises(UnsafeRoleError, match="temporary"):
        await KeenDatabase.connect(settings=settings, migrate=False)


# --- the three attacks --------------------------------------------------------------
async def test_a_temp_users_table_does_not_turn_a_charge_into_an_admin_bypass(
    db: KeenDatabase, alice: User, owner_conn
):
    await fund(db, alice, "1000")
    async with db.user_transaction(alice.id) as conn:
        await plant_temp_table(
            conn,
            "users",
            "(id uuid, role text, is_admin boolean, account_status text, timezone text)",
        )
        await conn.execute(
            "INSERT INTO pg_temp.users VALUES ($1, 'admin', true, 'active', 'UTC')", alice.id
        )
        tx = await db.credits.deduct_in(
            conn, alice.id, D("200"), session_id=None, description="a $1,000 call"
        )
    assert (tx.transaction_type, tx.amount, tx.balance_after) == ("usage", D("-1000"), D(0))
    assert (await account(owner_conn, alice))["current_balance"] == 0
    assert (
        await owner_conn.fetchval("SELECT count(*) FROM credit_transactions WHERE is_admin_bypass")
        == 0
    )
    assert (await db.credits.verify_ledger()).ok


async def test_a_temp_ledger_left_on_a_pooled_connection_receives_no_other_tenants_row(
    settings: Settings, db: KeenDatabase, alice: User, bob: User, owner_conn
):
    await fund(db, bob, "10")
    single = await KeenDatabase.connect(settings=_single(settings), migrate=False)
    try:
        async with single.user_transaction(alice.id) as conn:
            await plant_temp_table(
                conn, "credit_transactions", "(LIKE public.credit_transactions INCLUDING DEFAULTS)"
            )
        charge = await single.credits.deduct_credits(bob.id, D("1"), None, "bob's call")
    finally:
        await single.close()
    assert (
        await owner_conn.fetchval(
            "SELECT count(*) FROM credit_transactions WHERE id = $1 AND user_id = $2",
            charge.id,
            bob.id,
        )
        == 1
    )
    assert (await account(owner_conn, bob))["current_balance"] == D("5")
    assert (await db.credits.verify_ledger()).ok


async def _admin_change_is_audited(owner_conn, admin: User, bob: User) -> None:
    row = await owner_conn.fetchrow(
        "SELECT actor_user_id, changes FROM audit_log"
        " WHERE table_name = 'users' AND row_id = $1 AND action = 'UPDATE'",
        bob.id,
    )
    assert row is not None, "the admin's change is missing from audit_log"
    assert row["actor_user_id"] == admin.id
    assert row["changes"]["account_status"] == {"old": "active", "new": "suspended"}


async def test_a_temp_audit_log_left_on_a_pooled_connection_swallows_no_admin_change(
    settings: Settings, alice: User, bob: User, admin: User, owner_conn
):
    single = await KeenDatabase.connect(settings=_single(settings), migrate=False)
    try:
        async with single.user_transaction(alice.id) as conn:
            await plant_temp_table(conn, "audit_log", AUDIT_LOG_COPY)
        await single.users.set_account_status(bob.id, "suspended", actor_id=admin.id)
    finally:
        await single.close()
    await _admin_change_is_audited(owner_conn, admin, bob)


async def test_an_admin_cannot_hide_their_own_change_in_a_temp_audit_log(
    db: KeenDatabase, bob: User, admin: User, owner_conn
):
    async with db.user_transaction(admin.id) as conn:
        await plant_temp_table(conn, "audit_log", AUDIT_LOG_COPY)
        await conn.execute("UPDATE users SET account_status = 'suspended' WHERE id = $1", bob.id)
    await _admin_change_is_audited(owner_conn, admin, bob)
