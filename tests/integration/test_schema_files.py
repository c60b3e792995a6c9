"""keen_stream/sql/*.sql and the migrations describe the same database.

Database A is the migrated template (``upgrade head``); database B is an empty database with the
``.sql`` files applied (keen_stream.schema.apply_schema). Their catalogs
(tests/integration/schema_catalog.py) must be equal. When they are not, the failure lists, per
kind of object, what exists on one side only and a unified diff of each definition that differs:
fix the ``.sql`` file (or the migration) until the report is empty.
"""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg
import pytest

from keen_stream.schema import SQL_FILES, apply_schema, sql_text
from tests.integration.schema_catalog import Catalog, catalog, compare


async def _from_files(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await apply_schema(conn)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def migrated(template_dsn: str) -> Catalog:
    return await catalog(template_dsn)


async def test_sql_files_build_the_database_the_migrations_build(
    template_dsn: str, migrated: Catalog, empty_dsn: str
) -> None:
    await _from_files(empty_dsn)
    report = compare(migrated, await catalog(empty_dsn))
    assert not report, (
        "keen_stream/sql/*.sql and the migrations disagree (left: upgrade head, right: the "
        "files). Edit the .sql file or write the missing migration:\n\n" + report
    )
    # Alembic's bookkeeping is the migrated side's alone, and not part of the comparison.
    conn = await asyncpg.connect(template_dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('public.alembic_version') IS NOT NULL")
    finally:
        await conn.close()
    assert not any("alembic_version" in name for names in migrated.values() for name in names)


async def test_a_changed_function_body_is_reported_as_a_diff(
    migrated: Catalog, empty_dsn: str
) -> None:
    """The comparison itself is tested against a real difference: one literal in one body."""
    await _from_files(empty_dsn)
    conn = await asyncpg.connect(empty_dsn)
    try:
        definition = await conn.fetchval(
            "SELECT pg_get_functiondef('keen_reject_change()'::regprocedure)"
        )
        assert "ERRCODE = 'KS405'" in definition
        await conn.execute(definition.replace("ERRCODE = 'KS405'", "ERRCODE = 'KS499'"))
    finally:
        await conn.close()

    report = compare(migrated, await catalog(empty_dsn))

    assert report.startswith("== functions ==\n"), report
    assert report.count("==") == 2, report  # that section only
    changed = [
        re.sub(r"\s+", " ", line.strip())
        for line in report.splitlines()
        if line.strip()[:1] in "+-"
    ]
    assert changed == [
        "--- migrations (upgrade head): keen_reject_change()",
        "+++ keen_stream/sql/*.sql: keen_reject_change()",
        "- USING ERRCODE = 'KS405';",
        "+ USING ERRCODE = 'KS499';",
    ], report


async def test_owners_grants_and_policies_are_compared(migrated: Catalog, empty_dsn: str) -> None:
    await _from_files(empty_dsn)
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute(
            """
            ALTER FUNCTION keen_stream_horizon() OWNER TO keen_system;
            ALTER TABLE hub_nodes OWNER TO keen_system;
            GRANT SELECT ON hub_nodes TO keen_app;
            GRANT UPDATE (mfa_enabled) ON users TO keen_app;
            ALTER TABLE stream_events NO FORCE ROW LEVEL SECURITY;
            ALTER POLICY users_delete ON users USING ((SELECT keen_is_admin()));
            DO $$ BEGIN
                EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO PUBLIC', current_database());
            END $$;
            """
        )
    finally:
        await conn.close()

    report = compare(migrated, await catalog(empty_dsn))

    sections = dict((part.split(" ==\n", 1)[0], part) for part in report.split("== ")[1:])
    assert set(sections) == {
        "database",
        "relations (owner, ACL, RLS)",
        "columns",
        "functions",
        "policies",
    }, report
    assert "+owner: keen_system" in sections["functions"]
    assert "keen_stream_horizon()" in sections["functions"]
    relations = sections["relations (owner, ACL, RLS)"]
    assert "+owner: keen_system" in relations and ": hub_nodes" in relations
    assert "+forced row level security: no" in relations
    assert "users.mfa_enabled" in sections["columns"]
    assert "users.users_delete" in sections["policies"]
    assert "+acl: =Tc/" in sections["database"]


async def test_foundation_creates_every_role_the_schema_uses(
    migrated: Catalog, pg_admin_dsn: str
) -> None:
    """Roles are cluster-wide, so the comparison cannot see a role the files forget to create
    (the migrations created it in the same cluster): check the files' CREATE ROLE statements."""
    conn = await asyncpg.connect(pg_admin_dsn)
    try:
        roles = {r["rolname"] for r in await conn.fetch("SELECT rolname FROM pg_roles")}
    finally:
        await conn.close()
    # Owners, grantees and policy roles ("owner: x", "acl: x=r/y, ...", "roles: x, y").
    named = {
        word
        for kind in migrated.values()
        for text in kind.values()
        for line in text.splitlines()
        if line.startswith(("owner:", "acl:", "column acl:", "roles:"))
        for word in re.findall(r"[\w$]+", line.split(":", 1)[1])
    }
    used = named & roles - {"root", "postgres", "pg_database_owner"}
    used = {role for role in used if role.startswith("keen_")}
    created = set(re.findall(r"CREATE ROLE (\w+)", sql_text(SQL_FILES[0])))
    assert "keen_app" in used
    assert used <= created, f"foundation.sql does not create {sorted(used - created)}"


def _role_statements(text: str) -> dict[str, set[str]]:
    """Each ``CREATE ROLE name ATTR ...`` in ``text``: the role and its attribute words."""
    return {
        name: set(attributes.split())
        for name, attributes in re.findall(r"CREATE ROLE (\w+)((?:\s+[A-Z]+)+)", text)
    }


def test_foundation_creates_each_role_as_the_migrations_do() -> None:
    """The test cluster's roles were created by the migrations before the files ran, so the
    files' CREATE ROLE blocks are no-ops there: compare their attributes (BYPASSRLS above all)
    with the migrations' own statements."""
    versions = Path(__file__).parents[2] / "keen_stream" / "migrations" / "versions"
    migrated: dict[str, set[str]] = {}
    for path in sorted(versions.glob("*.py")):
        migrated |= _role_statements(path.read_text(encoding="utf-8"))
    from_files = _role_statements(sql_text(SQL_FILES[0]))
    assert "keen_ledger" in migrated and "BYPASSRLS" in migrated["keen_ledger"]
    assert from_files == migrated


async def test_a_failing_statement_names_its_file(empty_dsn: str) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute("CREATE TABLE audit_log (id integer)")  # foundation.sql's clashes
        with pytest.raises(asyncpg.DuplicateTableError) as raised:
            await apply_schema(conn)
        # One transaction: nothing of the failed attempt is left behind.
        assert await conn.fetchval("SELECT to_regclass('public.users')") is None
    finally:
        await conn.close()
    notes = getattr(raised.value, "__notes__", [])
    assert len(notes) == 1 and notes[0].startswith(
        "while applying keen_stream/sql/foundation.sql"
    ), notes
