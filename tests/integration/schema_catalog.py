"""A database's schema as plain text, per object, for comparing two databases.

:func:`catalog` reads everything keen_stream defines (in schema ``public``, on the database
itself) and describes each object as a few readable lines, keyed by kind and name;
:func:`compare` turns two catalogs into a report a maintainer can act on: per kind, the names
missing on each side, then a unified diff of every definition that differs.

The server does most of the normalising: constraints, indexes, triggers, policies and views are
read back through ``pg_get_*def``/``pg_get_expr``, which print the stored parse tree the same
way whatever the original spelling. What is normalised here, and why:

- ACLs are sorted and a NULL ACL is replaced by its default (``acldefault``): a GRANT order or
  an explicit ``GRANT`` of a default privilege is not a difference in what anyone may do.
- Function bodies (``prosrc``, stored verbatim) are compared after removing the indentation
  common to all their lines, trailing whitespace and leading/trailing blank lines: a body
  copied from a Python string (indented four spaces) and the same body written at column 0 in
  a ``.sql`` file are the same function. Everything else in a body counts, comments included:
  a body is what ``\\sf`` shows on a production database, so the ``.sql`` file must show it too.
- Columns are listed in column order without dropped columns (``SELECT *``, ``RETURNING *`` and
  ``%ROWTYPE`` depend on the order, not on attribute numbers).
- Rows: a fresh schema holds seed rows (the stream watermark, the price); they are compared
  without the columns whose default is volatile (generated ids, ``now()``).

What is read, beyond relations, columns, constraints, indexes, functions and the like: rewrite
rules (``CREATE RULE``; not a view's own ``_RETURN`` rule), a table's replica identity, a
column's ``SET STATISTICS`` / ``SET STORAGE`` / ``SET COMPRESSION`` (when not the default), an
index's ``CLUSTER ON`` / replica-identity / invalid flags, ``ALTER DEFAULT PRIVILEGES``
(pg_default_acl is per database) and the settings pg_db_role_setting holds for this database
(``ALTER DATABASE ... SET``, ``ALTER ROLE ... IN DATABASE ... SET``): those rows live in a shared
catalog but each names its database, so two databases of one cluster can differ in them.

Roles are cluster-wide: their attributes (pg_roles), their memberships (pg_auth_members) and
their settings for every database (pg_db_role_setting with setdatabase 0) are one state shared
by every database of a cluster. Two databases of the shared test cluster, one migrated and one
built from the files, therefore always agree on them, and whatever the files declare about a
role is a no-op there (the migrations created it first). So :data:`CLUSTER_KINDS` (the keen_*
roles' attributes, the memberships involving a keen_* role, their all-database settings) are
read only on request, and compared where they mean something: ``test_schema_files`` builds
each side in its own private cluster (tests/pgcluster.py, ``initdb``), one with nothing but the
migrations and one with nothing but the files, and compares everything, cluster kinds
included. Checking the shared cluster's roles against the declarations instead would measure
whatever else has run on that server (other test sessions, fault tests), not the two sources.
The connected role is named ``CURRENT_USER`` in memberships: the login role that builds the
schema is the deployer's, not the schema's.
"""

from __future__ import annotations

import difflib
import json
import textwrap
from collections.abc import Iterable
from typing import Any

import asyncpg

Catalog = dict[str, dict[str, str]]

#: Alembic's bookkeeping: present only in the migrated database, not part of the schema.
EXCLUDED_RELATIONS = ("alembic_version",)

#: Columns whose values differ between two identical installs (they hold generated ids
#: inside other values), by table.
VOLATILE_ROW_COLUMNS = {"audit_log": ("row_id", "changes")}

_PUBLIC_RELATION = """
    c.relnamespace = 'public'::regnamespace AND c.relname <> ALL ($1::text[])
"""


def normalize_body(body: str) -> str:
    """A function body without indentation common to all lines and without trailing blanks."""
    lines = [line.rstrip() for line in body.expandtabs(8).splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    # A one-line body written after "$$" on the same line starts with a space: the dedent
    # below treats the first line like the others.
    return textwrap.dedent("\n".join(lines))


def _lines(fields: Iterable[tuple[str, Any]]) -> str:
    out = []
    for key, value in fields:
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value) if value else "(none)"
        text = str(value)
        out.append(f"{key}:{text}" if text.startswith("\n") else f"{key}: {text}")
    return "\n".join(out)


async def _relations(conn: asyncpg.Connection) -> dict[str, str]:
    rows = await conn.fetch(
        f"""
        SELECT c.relname, c.relkind::text AS relkind, pg_get_userbyid(c.relowner) AS owner,
               c.relpersistence::text AS relpersistence, c.relrowsecurity,
               c.relreplident::text AS relreplident,
               c.relforcerowsecurity, c.relispopulated,
               c.reloptions, am.amname,
               ARRAY(SELECT a::text FROM unnest(coalesce(
                         c.relacl,
                         acldefault(CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END::"char",
                                    c.relowner))) a ORDER BY 1) AS acl
          FROM pg_class c LEFT JOIN pg_am am ON am.oid = c.relam
         WHERE {_PUBLIC_RELATION} AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
        """,
        list(EXCLUDED_RELATIONS),
    )
    kinds = {
        "r": "table",
        "p": "partitioned table",
        "v": "view",
        "m": "materialized view",
        "S": "sequence",
        "f": "foreign table",
    }
    out = {}
    for r in rows:
        fields: list[tuple[str, Any]] = [
            ("kind", kinds[r["relkind"]]),
            ("owner", r["owner"]),
            ("acl", r["acl"]),
        ]
        if r["relkind"] in ("r", "p", "m"):
            fields += [
                (
                    "persistence",
                    {"p": "permanent", "u": "unlogged", "t": "temp"}[r["relpersistence"]],
                ),
                ("row level security", "enabled" if r["relrowsecurity"] else "disabled"),
                ("forced row level security", "yes" if r["relforcerowsecurity"] else "no"),
                ("options", r["reloptions"] or []),
                ("access method", r["amname"]),
                (
                    "replica identity",
                    {"d": "DEFAULT", "n": "NOTHING", "f": "FULL", "i": "USING INDEX"}[
                        r["relreplident"]
                    ],
                ),
            ]
        if r["relkind"] == "m":
            fields.append(("populated", r["relispopulated"]))
        out[r["relname"]] = _lines(fields)
    return out


_STORAGE = {"p": "PLAIN", "e": "EXTERNAL", "m": "MAIN", "x": "EXTENDED"}


async def _columns(conn: asyncpg.Connection) -> dict[str, str]:
    rows = await conn.fetch(
        f"""
        SELECT c.relname,
               row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum) AS position,
               a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid) AS default_expr,
               a.attidentity::text AS attidentity, a.attgenerated::text AS attgenerated,
               CASE WHEN a.attcollation <> t.typcollation THEN co.collname END AS collation,
               ARRAY(SELECT x::text FROM unnest(a.attacl) x ORDER BY 1) AS acl,
               a.attstattarget, a.attstorage::text AS attstorage,
               t.typstorage::text AS typstorage, a.attcompression::text AS attcompression
          FROM pg_class c
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
          JOIN pg_type t ON t.oid = a.atttypid
          LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
          LEFT JOIN pg_collation co ON co.oid = a.attcollation
         WHERE {_PUBLIC_RELATION} AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
        """,
        list(EXCLUDED_RELATIONS),
    )
    out = {}
    for r in rows:
        fields: list[tuple[str, Any]] = [
            ("position", r["position"]),
            ("type", r["type"]),
            ("not null", r["attnotnull"]),
            ("default", r["default_expr"]),
        ]
        if r["attidentity"]:
            fields.append(("identity", {"a": "ALWAYS", "d": "BY DEFAULT"}[r["attidentity"]]))
        if r["attgenerated"]:
            fields.append(("generated", "STORED"))
        if r["collation"]:
            fields.append(("collation", r["collation"]))
        if r["acl"]:
            fields.append(("column acl", r["acl"]))
        # SET STATISTICS / SET STORAGE / SET COMPRESSION, shown when not the default.
        if r["attstattarget"] != -1:
            fields.append(("statistics", r["attstattarget"]))
        if r["attstorage"] != r["typstorage"]:
            fields.append(("storage", _STORAGE[r["attstorage"]]))
        if r["attcompression"]:
            fields.append(("compression", {"p": "pglz", "l": "lz4"}[r["attcompression"]]))
        out[f"{r['relname']}.{r['attname']}"] = _lines(fields)
    return out


async def _constraints(conn: asyncpg.Connection) -> dict[str, str]:
    rows = await conn.fetch(
        f"""
        SELECT c.relname, k.conname, pg_get_constraintdef(k.oid) AS def,
               k.condeferrable, k.condeferred, k.convalidated
          FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
         WHERE {_PUBLIC_RELATION}
        """,
        list(EXCLUDED_RELATIONS),
    )
    out = {}
    for r in rows:
        flags = []
        if r["condeferrable"]:
            flags.append(
                "DEFERRABLE INITIALLY " + ("DEFERRED" if r["condeferred"] else "IMMEDIATE")
            )
        if not r["convalidated"]:
            flags.append("NOT VALID")
        out[f"{r['relname']}.{r['conname']}"] = " ".join([r["def"], *flags])
    return out


async def _indexes(conn: asyncpg.Connection) -> dict[str, str]:
    rows = await conn.fetch(
        f"""
        SELECT i.relname, pg_get_indexdef(i.oid) AS def, x.indisclustered, x.indisreplident,
               x.indisvalid
          FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
          JOIN pg_class c ON c.oid = x.indrelid
         WHERE {_PUBLIC_RELATION}
        """,
        list(EXCLUDED_RELATIONS),
    )
    out = {}
    for r in rows:
        flags = [
            flag
            for flag, on in (
                (" -- CLUSTER ON (the table's clustering index)", r["indisclustered"]),
                (" -- REPLICA IDENTITY USING INDEX", r["indisreplident"]),
                (" -- INVALID", not r["indisvalid"]),
            )
            if on
        ]
        out[r["relname"]] = r["def"] + "".join(flags)
    return out


async def _functions(conn: asyncpg.Connection) -> dict[str, str]:
    rows = await conn.fetch(
        """
        SELECT p.oid::regprocedure::text AS signature, p.prokind::text AS prokind,
               pg_get_function_arguments(p.oid) AS arguments,
               pg_get_function_result(p.oid) AS result, l.lanname,
               p.provolatile::text AS provolatile, p.prosecdef, p.proleakproof, p.proisstrict,
               p.proparallel::text AS proparallel,
               p.procost, p.prorows, p.proconfig, pg_get_userbyid(p.proowner) AS owner,
               ARRAY(SELECT a::text FROM unnest(coalesce(p.proacl, acldefault('f', p.proowner)))
                     a ORDER BY 1) AS acl,
               p.prosrc
          FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
         WHERE p.pronamespace = 'public'::regnamespace
        """
    )
    out = {}
    for r in rows:
        fields: list[tuple[str, Any]] = [
            (
                "kind",
                {"f": "function", "p": "procedure", "a": "aggregate", "w": "window"}[r["prokind"]],
            ),
            ("arguments", r["arguments"]),
            ("returns", r["result"]),
            ("language", r["lanname"]),
            ("volatility", {"i": "IMMUTABLE", "s": "STABLE", "v": "VOLATILE"}[r["provolatile"]]),
            ("security", "DEFINER" if r["prosecdef"] else "INVOKER"),
            ("leakproof", r["proleakproof"]),
            ("strict", r["proisstrict"]),
            ("parallel", {"s": "SAFE", "r": "RESTRICTED", "u": "UNSAFE"}[r["proparallel"]]),
            ("cost", r["procost"]),
            ("rows", r["prorows"]),
            ("config", r["proconfig"] or []),
            ("owner", r["owner"]),
            ("acl", r["acl"]),
            ("body", "\n" + normalize_body(r["prosrc"])),
        ]
        out[r["signature"]] = _lines(fields)
    return out


async def _types(conn: asyncpg.Connection) -> dict[str, str]:
    """Types defined on their own (composites, enums, domains), not tables' row types."""
    rows = await conn.fetch(
        """
        SELECT t.typname, t.typtype::text AS typtype, pg_get_userbyid(t.typowner) AS owner,
               ARRAY(SELECT format('%s %s', a.attname, format_type(a.atttypid, a.atttypmod))
                       FROM pg_attribute a
                      WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
                      ORDER BY a.attnum) AS attributes,
               ARRAY(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = t.oid
                      ORDER BY e.enumsortorder) AS labels,
               format_type(t.typbasetype, t.typtypmod) AS base, t.typnotnull,
               ARRAY(SELECT a::text FROM unnest(coalesce(t.typacl, acldefault('T', t.typowner)))
                     a ORDER BY 1) AS acl
          FROM pg_type t LEFT JOIN pg_class c ON c.oid = t.typrelid
         WHERE t.typnamespace = 'public'::regnamespace
           AND (t.typtype IN ('e', 'd', 'r', 'm') OR c.relkind = 'c')
        """
    )
    out = {}
    for r in rows:
        fields: list[tuple[str, Any]] = [("owner", r["owner"]), ("acl", r["acl"])]
        if r["typtype"] == "c":
            fields.append(("attributes", r["attributes"]))
        elif r["typtype"] == "e":
            fields.append(("labels", r["labels"]))
        elif r["typtype"] == "d":
            fields += [("base", r["base"]), ("not null", r["typnotnull"])]
        else:
            fields.append(("typtype", r["typtype"]))
        out[r["typname"]] = _lines(fields)
    return out


async def _triggers(conn: asyncpg.Connection) -> dict[str, str]:
    rows = await conn.fetch(
        f"""
        SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid) AS def, t.tgenabled::text AS tgenabled
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         WHERE {_PUBLIC_RELATION} AND NOT t.tgisinternal
        """,
        list(EXCLUDED_RELATIONS),
    )
    out = {}
    for r in rows:
        enabled = {
            "O": "",
            "D": " -- DISABLED",
            "R": " -- ENABLE REPLICA",
            "A": " -- ENABLE ALWAYS",
        }[r["tgenabled"]]
        out[f"{r['relname']}.{r['tgname']}"] = r["def"] + enabled
    return out


async def _policies(conn: asyncpg.Connection) -> dict[str, str]:
    rows = await conn.fetch(
        f"""
        SELECT c.relname, p.polname, p.polcmd::text AS polcmd, p.polpermissive,
               ARRAY(SELECT CASE WHEN r = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(r)::text END
                       FROM unnest(p.polroles) r ORDER BY 1) AS roles,
               pg_get_expr(p.polqual, p.polrelid) AS using_expr,
               pg_get_expr(p.polwithcheck, p.polrelid) AS check_expr
          FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
         WHERE {_PUBLIC_RELATION}
        """,
        list(EXCLUDED_RELATIONS),
    )
    commands = {"r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE", "*": "ALL"}
    out = {}
    for r in rows:
        out[f"{r['relname']}.{r['polname']}"] = _lines(
            [
                ("command", commands[r["polcmd"]]),
                ("permissive", r["polpermissive"]),
                ("roles", r["roles"]),
                ("using", r["using_expr"]),
                ("with check", r["check_expr"]),
            ]
        )
    return out


async def _views(conn: asyncpg.Connection) -> dict[str, str]:
    rows = await conn.fetch(
        f"""
        SELECT c.relname, pg_get_viewdef(c.oid) AS def
          FROM pg_class c WHERE {_PUBLIC_RELATION} AND c.relkind IN ('v', 'm')
        """,
        list(EXCLUDED_RELATIONS),
    )
    return {r["relname"]: r["def"] for r in rows}


async def _rules(conn: asyncpg.Connection) -> dict[str, str]:
    """Rewrite rules (``CREATE RULE``), not the ``_RETURN`` rule every view is made of (the
    view's definition is compared under views)."""
    rows = await conn.fetch(
        f"""
        SELECT c.relname, r.rulename, pg_get_ruledef(r.oid) AS def,
               r.ev_enabled::text AS ev_enabled
          FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
         WHERE {_PUBLIC_RELATION}
           AND NOT (r.rulename = '_RETURN' AND c.relkind IN ('v', 'm'))
        """,
        list(EXCLUDED_RELATIONS),
    )
    enabled = {"O": "", "D": " -- DISABLED", "R": " -- ENABLE REPLICA", "A": " -- ENABLE ALWAYS"}
    return {f"{r['relname']}.{r['rulename']}": r["def"] + enabled[r["ev_enabled"]] for r in rows}


async def _database_settings(conn: asyncpg.Connection) -> dict[str, str]:
    """``ALTER DATABASE ... SET`` and ``ALTER ROLE ... IN DATABASE ... SET`` for this database
    (rows of the shared pg_db_role_setting, but each names its database: per database)."""
    rows = await conn.fetch(
        """
        SELECT s.setrole = 0 AS whole_database, pg_get_userbyid(s.setrole) AS role,
               ARRAY(SELECT c FROM unnest(s.setconfig) c ORDER BY 1) AS config
          FROM pg_db_role_setting s
         WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
        """
    )
    return {
        (
            "ALTER DATABASE current_database()"
            if r["whole_database"]
            else f"ALTER ROLE {r['role']} IN DATABASE current_database()"
        ): "\n".join(r["config"])
        for r in rows
    }


async def _default_privileges(conn: asyncpg.Connection) -> dict[str, str]:
    """``ALTER DEFAULT PRIVILEGES`` (pg_default_acl is per database)."""
    rows = await conn.fetch(
        """
        SELECT pg_get_userbyid(d.defaclrole) AS role, n.nspname, d.defaclobjtype::text AS objtype,
               ARRAY(SELECT a::text FROM unnest(d.defaclacl) a ORDER BY 1) AS acl
          FROM pg_default_acl d LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace
        """
    )
    objects = {"r": "TABLES", "S": "SEQUENCES", "f": "FUNCTIONS", "T": "TYPES", "n": "SCHEMAS"}
    return {
        f"FOR ROLE {r['role']}"
        + (f" IN SCHEMA {r['nspname']}" if r["nspname"] else "")
        + f" ON {objects[r['objtype']]}": _lines([("acl", r["acl"])])
        for r in rows
    }


# --- cluster-wide: the keen_* roles ----------------------------------------------------------
_KEEN_ROLE = "rolname LIKE 'keen\\_%'"


async def _roles(conn: asyncpg.Connection) -> dict[str, str]:
    """The attributes of each keen_* role (CREATE ROLE / ALTER ROLE)."""
    rows = await conn.fetch(
        f"""
        SELECT rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin,
               rolreplication, rolbypassrls, rolconnlimit, rolvaliduntil
          FROM pg_roles WHERE {_KEEN_ROLE}
        """
    )
    return {
        r["rolname"]: _lines(
            [
                ("superuser", r["rolsuper"]),
                ("inherit", r["rolinherit"]),
                ("createrole", r["rolcreaterole"]),
                ("createdb", r["rolcreatedb"]),
                ("login", r["rolcanlogin"]),
                ("replication", r["rolreplication"]),
                ("bypassrls", r["rolbypassrls"]),
                ("connection limit", r["rolconnlimit"]),
                ("valid until", r["rolvaliduntil"]),
            ]
        )
        for r in rows
    }


async def _role_memberships(conn: asyncpg.Connection) -> dict[str, str]:
    """``GRANT role TO member`` where either is a keen_* role; the connected (login) role is
    named ``CURRENT_USER``, so two clusters built by differently named roles compare equal."""
    rows = await conn.fetch(
        """
        SELECT CASE WHEN r.rolname = current_user THEN 'CURRENT_USER' ELSE r.rolname END AS role,
               CASE WHEN m.rolname = current_user THEN 'CURRENT_USER' ELSE m.rolname END
                 AS member,
               CASE WHEN g.rolname = current_user THEN 'CURRENT_USER' ELSE g.rolname END
                 AS grantor,
               a.admin_option
          FROM pg_auth_members a
          JOIN pg_roles r ON r.oid = a.roleid
          JOIN pg_roles m ON m.oid = a.member
          LEFT JOIN pg_roles g ON g.oid = a.grantor
         WHERE r.rolname LIKE 'keen\\_%' OR m.rolname LIKE 'keen\\_%'
        """
    )
    return {
        f"GRANT {r['role']} TO {r['member']}": _lines(
            [("admin option", r["admin_option"]), ("grantor", r["grantor"])]
        )
        for r in rows
    }


async def _role_settings(conn: asyncpg.Connection) -> dict[str, str]:
    """``ALTER ROLE keen_* SET``, in every database (setdatabase 0)."""
    rows = await conn.fetch(
        f"""
        SELECT r.rolname, ARRAY(SELECT c FROM unnest(s.setconfig) c ORDER BY 1) AS config
          FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
         WHERE s.setdatabase = 0 AND r.{_KEEN_ROLE}
        """
    )
    return {f"ALTER ROLE {r['rolname']}": "\n".join(r["config"]) for r in rows}


async def _sequences(conn: asyncpg.Connection) -> dict[str, str]:
    rows = await conn.fetch(
        f"""
        SELECT c.relname, format_type(s.seqtypid, NULL) AS type, s.seqstart, s.seqincrement,
               s.seqmin, s.seqmax, s.seqcache, s.seqcycle,
               (SELECT format('%s.%s %s', oc.relname, a.attname,
                              CASE d.deptype WHEN 'i' THEN '(identity)' ELSE '(owned by)' END)
                  FROM pg_depend d
                  JOIN pg_class oc ON oc.oid = d.refobjid
                  JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                 WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                   AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i'))
                   AS owned_by
          FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid
         WHERE {_PUBLIC_RELATION}
        """,
        list(EXCLUDED_RELATIONS),
    )
    return {
        r["relname"]: _lines(
            [
                ("type", r["type"]),
                ("start", r["seqstart"]),
                ("increment", r["seqincrement"]),
                ("min", r["seqmin"]),
                ("max", r["seqmax"]),
                ("cache", r["seqcache"]),
                ("cycle", r["seqcycle"]),
                ("column", r["owned_by"]),
            ]
        )
        for r in rows
    }


async def _extensions(conn: asyncpg.Connection) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT e.extname, e.extversion, n.nspname FROM pg_extension e"
        " JOIN pg_namespace n ON n.oid = e.extnamespace"
    )
    return {r["extname"]: f"version {r['extversion']} in schema {r['nspname']}" for r in rows}


async def _schemas(conn: asyncpg.Connection) -> dict[str, str]:
    rows = await conn.fetch(
        """
        SELECT n.nspname, pg_get_userbyid(n.nspowner) AS owner,
               ARRAY(SELECT a::text FROM unnest(coalesce(n.nspacl, acldefault('n', n.nspowner)))
                     a ORDER BY 1) AS acl
          FROM pg_namespace n
         WHERE n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
        """
    )
    return {r["nspname"]: _lines([("owner", r["owner"]), ("acl", r["acl"])]) for r in rows}


async def _database(conn: asyncpg.Connection) -> dict[str, str]:
    """The database's own ACL (TEMP above all), its owner named generically."""
    row = await conn.fetchrow(
        """
        SELECT pg_get_userbyid(d.datdba) AS owner,
               ARRAY(SELECT a::text FROM unnest(coalesce(d.datacl, acldefault('d', d.datdba)))
                     a ORDER BY 1) AS acl
          FROM pg_database d WHERE d.datname = current_database()
        """
    )
    return {"current_database()": _lines([("owner", row["owner"]), ("acl", row["acl"])])}


async def _comments(conn: asyncpg.Connection) -> dict[str, str]:
    rows = await conn.fetch(
        """
        SELECT pg_describe_object(d.classoid, d.objoid, d.objsubid) AS object, d.description
          FROM pg_description d
         WHERE d.classoid <> 'pg_namespace'::regclass OR d.objoid = 'public'::regnamespace
        """
    )
    # Built-in objects carry comments too: keep the ones on what this schema defines.
    ours = await _objects(conn)
    return {
        r["object"]: r["description"]
        for r in rows
        if r["object"] in ours or r["object"] == "schema public"
    }


async def _objects(conn: asyncpg.Connection) -> dict[str, str]:
    """Every object in schema public, whatever its kind: a kind this module does not describe
    (an operator, an aggregate, a cast's function) still shows up as present on one side."""
    rows = await conn.fetch(
        """
        SELECT pg_describe_object(d.classid, d.objid, d.objsubid) AS object
          FROM pg_depend d
         WHERE d.refclassid = 'pg_namespace'::regclass AND d.refobjid = 'public'::regnamespace
        """
    )
    excluded = {
        f"{kind} {name}" for name in EXCLUDED_RELATIONS for kind in ("table", "type", "type _")
    }
    excluded |= {f"type {name}[]" for name in EXCLUDED_RELATIONS}
    return {r["object"]: "exists" for r in rows if r["object"] not in excluded}


async def _rows(conn: asyncpg.Connection) -> dict[str, str]:
    """Rows the schema itself inserts, without columns whose default is volatile."""
    tables = await conn.fetch(
        f"""
        SELECT c.relname,
               ARRAY(SELECT a.attname::text
                       FROM pg_attribute a LEFT JOIN pg_attrdef d
                         ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                      WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                        AND (a.attidentity::text <> '' OR
                             pg_get_expr(d.adbin, d.adrelid) ~ '(now|gen_random_uuid|nextval)\\(')
                   ) AS volatile
          FROM pg_class c WHERE {_PUBLIC_RELATION} AND c.relkind = 'r'
        """,
        list(EXCLUDED_RELATIONS),
    )
    out = {}
    for t in tables:
        name = t["relname"]
        skip = [*t["volatile"], *VOLATILE_ROW_COLUMNS.get(name, ())]
        rows = await conn.fetch(
            f'SELECT (to_jsonb(t) - $1::text[])::text AS row FROM public."{name}" t', skip
        )
        if rows:
            values = sorted(json.dumps(json.loads(r["row"]), sort_keys=True) for r in rows)
            out[name] = "\n".join(values)
    return out


KINDS = {
    "schemas": _schemas,
    "extensions": _extensions,
    "database": _database,
    "settings in this database": _database_settings,
    "default privileges": _default_privileges,
    "relations (owner, ACL, RLS)": _relations,
    "columns": _columns,
    "constraints": _constraints,
    "indexes": _indexes,
    "sequences": _sequences,
    "views": _views,
    "rules": _rules,
    "types": _types,
    "functions": _functions,
    "triggers": _triggers,
    "policies": _policies,
    "comments": _comments,
    "objects in schema public": _objects,
    "seed rows": _rows,
}

#: Cluster-wide state of the keen_* roles: read only when :func:`catalog` is asked to (see the
#: module docstring for why two databases of one cluster cannot tell these apart).
CLUSTER_KINDS = {
    "roles": _roles,
    "role memberships": _role_memberships,
    "role settings (all databases)": _role_settings,
}


async def catalog(dsn: str, *, cluster: bool = False) -> Catalog:
    """Everything :data:`KINDS` describes, read from the database at ``dsn``; with ``cluster``
    also :data:`CLUSTER_KINDS` (meaningful only when ``dsn``'s cluster holds nothing but what
    built this database: a private cluster)."""
    conn = await asyncpg.connect(dsn)
    try:
        # Deparsed expressions name objects relative to the search_path: make it the same.
        await conn.execute("SET search_path = public")
        kinds = {**KINDS, **CLUSTER_KINDS} if cluster else KINDS
        return {kind: await read(conn) for kind, read in kinds.items()}
    finally:
        await conn.close()


def compare(migrated: Catalog, from_files: Catalog) -> str:
    """Every difference between two catalogs, as a report; empty when they agree."""
    a_name, b_name = "migrations (upgrade head)", "keen_stream/sql/*.sql"
    if migrated.keys() != from_files.keys():
        raise ValueError("compare two catalogs read alike (both with or both without cluster)")
    sections = []
    for kind in [*KINDS, *CLUSTER_KINDS]:
        a, b = migrated.get(kind, {}), from_files.get(kind, {})
        parts = []
        only_a = sorted(a.keys() - b.keys())
        only_b = sorted(b.keys() - a.keys())
        if only_a:
            parts.append(f"  only in {a_name}:\n" + "\n".join(f"    {n}" for n in only_a))
        if only_b:
            parts.append(f"  only in {b_name}:\n" + "\n".join(f"    {n}" for n in only_b))
        for name in sorted(a.keys() & b.keys()):
            if a[name] != b[name]:
                diff = difflib.unified_diff(
                    a[name].splitlines(),
                    b[name].splitlines(),
                    fromfile=f"{a_name}: {name}",
                    tofile=f"{b_name}: {name}",
                    lineterm="",
                )
                parts.append(textwrap.indent("\n".join(diff), "  "))
        if parts:
            sections.append(f"== {kind} ==\n" + "\n".join(parts))
    return "\n\n".join(sections)
