"""keen_stream/sql/*.sql and the migrations describe the same database.

Database A is the migrated template (``upgrade head``); database B is an empty database with the
``.sql`` files applied (keen_stream.schema.apply_schema). Their catalogs
(tests/integration/schema_catalog.py) must be equal. When they are not, the failure lists, per
kind of object, what exists on one side only and a unified diff of each definition that differs:
fix the ``.sql`` file (or the migration) until the report is empty.

Roles are cluster-wide, so database A and B (one shared server) cannot differ in them: the
keen_* roles' attributes, memberships and settings are compared by building each side alone in
its own private cluster (``initdb``, tests/pgcluster.py), where the files' CREATE ROLE
statements are the ones that run.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from keen_stream.migrate import upgrade_async
from keen_stream.schema import SQL_FILES, apply_schema, sql_text
from tests.integration.schema_catalog import Catalog, catalog, compare
from tests.pgcluster import OwnedPostgres, owned_postgres_available, requires_owned_postgres


async def _from_files(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await apply_schema(conn)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def migrated(template_dsn: str) -> Catalog:
    return await catalog(template_dsn)


def _sections(report: str) -> dict[str, str]:
    """The report's sections by kind ("== kind ==" headings)."""
    return dict((part.split(" ==\n", 1)[0], part) for part in report.split("== ")[1:])


def _changed(section: str) -> list[str]:
    """A section's names and diff lines, whitespace collapsed (headers of the diff included)."""
    return [re.sub(r"\s+", " ", line.strip()) for line in section.splitlines()[1:]]


def _in_database(statement: str) -> str:
    """``statement`` with ``{db}`` naming the connection's database (run through EXECUTE)."""
    quoted = statement.replace("'", "''").replace("{db}", "%I")
    return f"DO $$ BEGIN EXECUTE format('{quoted}', current_database()); END $$"


@dataclass
class Change:
    """A change to a database built from the files, its undo, and what the report must say:
    the section it appears in, lines that section must contain (``{user}``: the connected
    role), and the other sections it may show in (none unless named)."""

    sql: str
    undo: str
    section: str
    lines: tuple[str, ...]
    also: tuple[str, ...] = ()


DATABASE_CHANGES = {
    "rule": Change(
        "CREATE RULE swallow AS ON UPDATE TO credit_accounts DO INSTEAD NOTHING",
        "DROP RULE swallow ON credit_accounts",
        "rules",
        ("only in keen_stream/sql/*.sql:", "credit_accounts.swallow"),
    ),
    "database setting": Change(
        _in_database("ALTER DATABASE {db} SET default_transaction_read_only = on"),
        _in_database("ALTER DATABASE {db} RESET default_transaction_read_only"),
        "settings in this database",
        ("only in keen_stream/sql/*.sql:", "ALTER DATABASE current_database()"),
    ),
    "role setting in this database": Change(
        _in_database("ALTER ROLE keen_app IN DATABASE {db} SET statement_timeout = 1"),
        _in_database("ALTER ROLE keen_app IN DATABASE {db} RESET statement_timeout"),
        "settings in this database",
        ("only in keen_stream/sql/*.sql:", "ALTER ROLE keen_app IN DATABASE current_database()"),
    ),
    "default privileges": Change(
        "ALTER DEFAULT PRIVILEGES GRANT ALL ON TABLES TO keen_app",
        "ALTER DEFAULT PRIVILEGES REVOKE ALL ON TABLES FROM keen_app",
        "default privileges",
        ("only in keen_stream/sql/*.sql:", "FOR ROLE {user} ON TABLES"),
    ),
    "default privileges in a schema": Change(
        "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON SEQUENCES TO keen_app",
        "ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE SELECT ON SEQUENCES FROM keen_app",
        "default privileges",
        ("only in keen_stream/sql/*.sql:", "FOR ROLE {user} IN SCHEMA public ON SEQUENCES"),
        # The entry depends on the schema, so it is also one more object in schema public.
        also=("objects in schema public",),
    ),
    "replica identity": Change(
        "ALTER TABLE users REPLICA IDENTITY FULL",
        "ALTER TABLE users REPLICA IDENTITY DEFAULT",
        "relations (owner, ACL, RLS)",
        ("-replica identity: DEFAULT", "+replica identity: FULL"),
    ),
    "column statistics": Change(
        "ALTER TABLE users ALTER COLUMN email SET STATISTICS 5",
        "ALTER TABLE users ALTER COLUMN email SET STATISTICS -1",
        "columns",
        ("+++ keen_stream/sql/*.sql: users.email", "+statistics: 5"),
    ),
    "column storage": Change(
        "ALTER TABLE users ALTER COLUMN preferences SET STORAGE EXTERNAL",
        "ALTER TABLE users ALTER COLUMN preferences SET STORAGE EXTENDED",
        "columns",
        ("+++ keen_stream/sql/*.sql: users.preferences", "+storage: EXTERNAL"),
    ),
    "column compression": Change(
        "ALTER TABLE users ALTER COLUMN preferences SET COMPRESSION pglz",
        "ALTER TABLE users ALTER COLUMN preferences SET COMPRESSION default",
        "columns",
        ("+++ keen_stream/sql/*.sql: users.preferences", "+compression: pglz"),
    ),
    "cluster on": Change(
        "ALTER TABLE users CLUSTER ON idx_users_role",
        "ALTER TABLE users SET WITHOUT CLUSTER",
        "indexes",
        (
            "+++ keen_stream/sql/*.sql: idx_users_role",
            "+CREATE INDEX idx_users_role ON public.users USING btree (role) -- CLUSTER ON (the "
            "table's clustering index)",
        ),
    ),
}


def _assert_reported(report: str, change: Change, user: str) -> None:
    sections = _sections(report)
    assert set(sections) == {change.section, *change.also}, report
    changed = _changed(sections[change.section])
    missing = [line.format(user=user) for line in change.lines]
    missing = [line for line in missing if line not in changed]
    assert not missing, f"{missing} not in:\n{report}"


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


@pytest.mark.parametrize("name", DATABASE_CHANGES)
async def test_each_kind_of_database_change_is_reported(
    name: str, migrated: Catalog, empty_dsn: str
) -> None:
    """Per-database state beyond tables and functions: rules, settings, default privileges,
    replica identity, column storage details, the clustering index."""
    change = DATABASE_CHANGES[name]
    await _from_files(empty_dsn)
    conn = await asyncpg.connect(empty_dsn)
    try:
        user = await conn.fetchval("SELECT current_user")
        await conn.execute(change.sql)
        try:
            report = compare(migrated, await catalog(empty_dsn))
        finally:
            # Settings and default privileges sit in shared catalogs until the database goes;
            # undo them on this connection (a read-only default would refuse a new one).
            await conn.execute(change.undo)
    finally:
        await conn.close()
    _assert_reported(report, change, user)


@dataclass
class PrivateBuilds:
    """One database built by the migrations alone, one by the files alone, each in a private
    cluster of its own: the cluster-wide state of each is what that source created."""

    migrated_dsn: str
    files_dsn: str
    migrated: Catalog


@pytest.fixture(scope="module")
async def private_builds() -> AsyncIterator[PrivateBuilds]:
    if not owned_postgres_available():
        pytest.skip("needs PostgreSQL server binaries to start a private server")
    clusters: list[OwnedPostgres] = []
    try:
        dsns = []
        for _ in range(2):
            cluster = OwnedPostgres.create()
            clusters.append(cluster)
            cluster.start()
            admin = await asyncpg.connect(cluster.dsn("postgres"))
            try:
                await admin.execute("CREATE DATABASE keen")
            finally:
                await admin.close()
            dsns.append(cluster.dsn("keen"))
        migrated_dsn, files_dsn = dsns
        await upgrade_async(migrated_dsn)
        await _from_files(files_dsn)
        yield PrivateBuilds(migrated_dsn, files_dsn, await catalog(migrated_dsn, cluster=True))
    finally:
        for cluster in clusters:
            cluster.destroy()


@requires_owned_postgres
async def test_files_alone_build_the_roles_the_migrations_build(
    private_builds: PrivateBuilds,
) -> None:
    """Everything, roles included, with each source alone in a cluster of its own."""
    from_files = await catalog(private_builds.files_dsn, cluster=True)
    report = compare(private_builds.migrated, from_files)
    assert not report, (
        "Built alone in a private cluster each, keen_stream/sql/*.sql and the migrations "
        "disagree (left: upgrade head, right: the files):\n\n" + report
    )
    roles = private_builds.migrated["roles"]
    assert {"keen_app", "keen_system", "keen_billing", "keen_ledger"} <= roles.keys()
    assert "bypassrls: True" in roles["keen_ledger"].splitlines()


CLUSTER_CHANGES = {
    "role attribute": Change(
        "ALTER ROLE keen_billing BYPASSRLS",
        "ALTER ROLE keen_billing NOBYPASSRLS",
        "roles",
        ("+++ keen_stream/sql/*.sql: keen_billing", "-bypassrls: False", "+bypassrls: True"),
    ),
    "connection limit": Change(
        "ALTER ROLE keen_app CONNECTION LIMIT 3",
        "ALTER ROLE keen_app CONNECTION LIMIT -1",
        "roles",
        ("-connection limit: -1", "+connection limit: 3"),
    ),
    "role membership": Change(
        "GRANT keen_system TO keen_app",
        "REVOKE keen_system FROM keen_app",
        "role memberships",
        ("only in keen_stream/sql/*.sql:", "GRANT keen_system TO keen_app"),
    ),
    "login role membership": Change(
        "GRANT keen_ledger TO CURRENT_USER",
        "REVOKE keen_ledger FROM CURRENT_USER",
        "role memberships",
        ("only in keen_stream/sql/*.sql:", "GRANT keen_ledger TO CURRENT_USER"),
    ),
    "role setting": Change(
        "ALTER ROLE keen_app SET search_path = pg_temp, public",
        "ALTER ROLE keen_app RESET search_path",
        "role settings (all databases)",
        ("only in keen_stream/sql/*.sql:", "ALTER ROLE keen_app"),
    ),
}


@requires_owned_postgres
@pytest.mark.parametrize("name", CLUSTER_CHANGES)
async def test_each_kind_of_role_change_is_reported(
    name: str, private_builds: PrivateBuilds
) -> None:
    """Made in the files' private cluster (never the shared one), and undone after."""
    change = CLUSTER_CHANGES[name]
    conn = await asyncpg.connect(private_builds.files_dsn)
    try:
        user = await conn.fetchval("SELECT current_user")
        await conn.execute(change.sql)
        try:
            report = compare(
                private_builds.migrated, await catalog(private_builds.files_dsn, cluster=True)
            )
        finally:
            await conn.execute(change.undo)
    finally:
        await conn.close()
    _assert_reported(report, change, user)


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


#: Role attributes and their default when CREATE ROLE does not name them.
_ROLE_DEFAULTS: dict[str, bool | int] = {
    "SUPERUSER": False,
    "CREATEDB": False,
    "CREATEROLE": False,
    "INHERIT": True,
    "LOGIN": False,
    "REPLICATION": False,
    "BYPASSRLS": False,
    "CONNECTION LIMIT": -1,
}
_ROLE_NAME = r"(?:[\w%]+(?![\w%]))"  # a name, %I (format's) or CURRENT_USER
_ATTRIBUTE = (
    r"(?:NO)?(?:SUPERUSER|CREATEDB|CREATEROLE|INHERIT|LOGIN|REPLICATION|BYPASSRLS)\b"
    r"|CONNECTION\s+LIMIT\s+-?\d+"
)
#: The statements that shape a role, in the order they appear: CREATE/ALTER ROLE with
#: attributes, ALTER ROLE ... [IN DATABASE ...] SET/RESET, GRANT/REVOKE of keen_* roles.
_ROLE_STATEMENT = re.compile(
    rf"\b(?P<verb>CREATE|ALTER)\s+(?:ROLE|USER)\s+(?P<name>{_ROLE_NAME})"
    rf"(?P<attributes>(?:\s+(?:WITH\b|{_ATTRIBUTE}))*)"
    r"(?!\s+(?:IN\s+DATABASE|SET|RESET|RENAME)\b)"
    rf"|\bALTER\s+(?:ROLE|USER)\s+(?P<set_name>{_ROLE_NAME})"
    r"(?:\s+IN\s+DATABASE\s+(?P<database>\S+))?\s+(?P<set>SET|RESET)\s+(?P<param>\w+)"
    r"(?P<value>[^;\"\n]*)"
    r"|\b(?P<grant>GRANT|REVOKE)\s+(?P<roles>keen_\w+(?:\s*,\s*keen_\w+)*)\s+(?:TO|FROM)\s+"
    rf"(?P<members>{_ROLE_NAME}(?:\s*,\s*{_ROLE_NAME})*)",
    re.MULTILINE,
)


def _setting_value(text: str) -> str:
    """``= value`` / ``TO value`` as the value, without the end of a
    ``format('... %I SET x = y', current_database())`` it was written in."""
    value = re.sub(r"\s+", " ", text).strip()
    value = re.sub(r"'\s*,\s*current_database\(\)\s*\)$", "", value)
    return re.sub(r"^(?:=|TO\b)\s*", "", value)


@dataclass
class DeclaredRoles:
    """What a sequence of statements declares about roles, once all of them have run."""

    attributes: dict[str, dict[str, bool | int]]
    memberships: set[tuple[str, str]]  # (role, member); the login role is CURRENT_USER
    settings: dict[tuple[str, str, str], str]  # (role, database or "", parameter) -> value


def _declared_roles(statements: list[str]) -> DeclaredRoles:
    declared = DeclaredRoles({}, set(), {})

    def role(name: str) -> str:
        # format('... %I', current_user): the login role running the statement.
        return "CURRENT_USER" if name in ("%I", "CURRENT_USER", "current_user") else name

    for statement in statements:
        for m in _ROLE_STATEMENT.finditer(statement):
            if m["verb"]:
                name = role(m["name"])
                if m["verb"] == "CREATE":
                    # IF NOT EXISTS blocks: a second CREATE of a role is the no-op it is there.
                    if name in declared.attributes:
                        continue
                    declared.attributes[name] = dict(_ROLE_DEFAULTS)
                attributes = declared.attributes.setdefault(name, {})
                words = re.sub(r"\s+", " ", m["attributes"]).split(" WITH ")[-1]
                for limit in re.findall(r"CONNECTION LIMIT (-?\d+)", words):
                    attributes["CONNECTION LIMIT"] = int(limit)
                for word in re.sub(r"CONNECTION LIMIT -?\d+|WITH", "", words).split():
                    on = not (word.startswith("NO") and word[2:] in _ROLE_DEFAULTS)
                    attributes[word if on else word[2:]] = on
            elif m["set"]:
                name, database = role(m["set_name"]), m["database"] or ""
                key = (name, "current_database()" if database == "%I" else database, m["param"])
                if m["set"] == "SET":
                    declared.settings[key] = _setting_value(m["value"])
                elif m["param"] == "ALL":
                    for other in [k for k in declared.settings if k[:2] == key[:2]]:
                        del declared.settings[other]
                else:
                    declared.settings.pop(key, None)
            else:
                pairs = {
                    (granted.strip(), role(member.strip()))
                    for granted in m["roles"].split(",")
                    for member in m["members"].split(",")
                }
                if m["grant"] == "GRANT":
                    declared.memberships |= pairs
                else:
                    declared.memberships -= pairs
    return declared


def _migrations_upgrade_statements() -> list[str]:
    """Every migration's upgrade statements (its ``UPGRADE`` list), in revision order; not the
    downgrades', which undo what the upgrades declare."""
    versions = Path(__file__).parents[2] / "keen_stream" / "migrations" / "versions"
    statements: list[str] = []
    for path in sorted(versions.glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"keen_roles_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        upgrade = getattr(module, "UPGRADE", None)
        if upgrade is None:
            text = path.read_text(encoding="utf-8")
            assert not _ROLE_STATEMENT.search(text), (
                f"{path.name} shapes roles outside an UPGRADE list: this test cannot tell its "
                "upgrade's statements from its downgrade's"
            )
            continue
        statements += [str(s) for s in upgrade]
    return statements


def test_declared_roles_follow_alter_role() -> None:
    """The reader of role statements itself: ALTER ROLE overrides CREATE ROLE, later wins."""
    declared = _declared_roles(
        [
            "CREATE ROLE keen_x NOLOGIN NOBYPASSRLS NOINHERIT;",
            "CREATE ROLE keen_z LOGIN PASSWORD 'secret' CONNECTION LIMIT 2;",
            "DO $$ BEGIN CREATE ROLE keen_x LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END",
            "ALTER ROLE keen_x WITH BYPASSRLS CONNECTION LIMIT 4;",
            "ALTER ROLE keen_x SET search_path = pg_temp, public;",
            "ALTER ROLE keen_x SET statement_timeout = 5;",
            "ALTER ROLE keen_x RESET statement_timeout;",
            "EXECUTE format('ALTER ROLE keen_x IN DATABASE %I SET work_mem = 1',"
            " current_database())",
            "EXECUTE format('GRANT keen_x, keen_y TO %I', current_user); GRANT keen_y TO keen_x;",
            "REVOKE keen_y FROM keen_x",
            "GRANT SELECT ON keen_table TO keen_x",
        ]
    )
    assert declared.attributes == {
        "keen_x": {**_ROLE_DEFAULTS, "INHERIT": False, "BYPASSRLS": True, "CONNECTION LIMIT": 4},
        "keen_z": {**_ROLE_DEFAULTS, "LOGIN": True},
    }
    assert declared.settings == {
        ("keen_x", "", "search_path"): "pg_temp, public",
        ("keen_x", "current_database()", "work_mem"): "1",
    }
    assert declared.memberships == {("keen_x", "CURRENT_USER"), ("keen_y", "CURRENT_USER")}


def test_foundation_declares_each_role_as_the_migrations_do() -> None:
    """The shared test cluster's roles were created by the migrations before the files ran, so
    the files' role statements are no-ops there: compare what they declare (attributes after
    every CREATE ROLE and ALTER ROLE, BYPASSRLS above all; memberships; role settings) with
    what the migrations' upgrade statements declare. (The private-cluster test above compares
    the roles each actually creates; this one needs no server.)"""
    migrated = _declared_roles(_migrations_upgrade_statements())
    files = [sql_text(name) for name in SQL_FILES]
    from_files = _declared_roles(files)
    assert migrated.attributes["keen_ledger"]["BYPASSRLS"] is True
    # An ALTER ROLE appended to the files changes what they declare.
    altered = _declared_roles([*files, "ALTER ROLE keen_billing BYPASSRLS;"])
    assert altered.attributes["keen_billing"]["BYPASSRLS"] is True
    assert ("keen_ledger", "CURRENT_USER") in migrated.memberships
    assert from_files.attributes == migrated.attributes
    assert from_files.memberships == migrated.memberships
    assert from_files.settings == migrated.settings


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
