"""``keen-stream backup`` / ``restore`` / ``export-user`` on real PostgreSQL (docs/operations.md).

The drill runs on two private clusters: the source's transaction ids are pushed 3 * 2^32 ahead
(``pg_resetwal -e``, the xid epoch) so that, as after years of production, the restored events'
positions are far above anything the new cluster would issue on its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from decimal import Decimal
from itertools import count
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from keen_stream import cli
from keen_stream.backup import sha256_of
from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.dal.tokens import hash_token
from keen_stream.errors import CursorUnknown
from keen_stream.migrate import upgrade_async
from keen_stream.settings import Settings, with_database
from tests.conftest import PASSWORD, make_settings
from tests.integration.hubkit import open_client, running_hub, stream_token
from tests.integration.test_hub_stream import new_session, step
from tests.integration.test_stream_after_restore import _restore as plain_restore
from tests.pgcluster import OwnedPostgres, owned_postgres_available

_names = count()


async def keen(settings: Settings, *argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv), settings=settings)


def _target_name() -> str:
    return f"keen_restore_{os.getpid()}_{next(_names)}"


@pytest.fixture
async def target(pg_admin_dsn: str) -> AsyncIterator[str]:
    """The URL of a database that does not exist yet (restore creates it); dropped after."""
    name = _target_name()
    yield with_database(pg_admin_dsn, name)
    conn = await asyncpg.connect(pg_admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _exists(admin_dsn: str, url: str) -> bool:
    conn = await asyncpg.connect(admin_dsn)
    try:
        name = url.rsplit("/", 1)[1]
        return bool(await conn.fetchval("SELECT true FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


async def _business(db: KeenDatabase, user: User, handle: str = "s") -> None:
    """Users' sessions, ledger rows and events."""
    await db.billing.purchase(user.id, Decimal("100.000001"), description="buy")
    await new_session(db, user, handle)
    await step(db, user, handle, 1)
    await db.credits.deduct_credits(user.id, Decimal("0.123456"), handle, "model call")


@pytest.fixture
async def backed_up(
    db: KeenDatabase, settings: Settings, alice: User, bob: User, tmp_path: Path
) -> Path:
    await _business(db, alice, "a")
    await _business(db, bob, "b")
    path = tmp_path / "keen.dump"
    assert await keen(settings, "backup", str(path)) == 0
    return path


async def test_backup_writes_an_archive_roles_and_a_manifest_that_describe_the_database(
    backed_up: Path, owner_conn: asyncpg.Connection, alice: User
) -> None:
    manifest = json.loads(backed_up.with_name("keen.dump.manifest.json").read_text())
    roles = backed_up.with_name("keen.dump.roles.sql").read_text()
    assert "CREATE ROLE keen_system" in roles and "PASSWORD" not in roles.upper()
    assert manifest["schema_revision"] == await owner_conn.fetchval(
        "SELECT version_num FROM alembic_version"
    )
    assert manifest["row_counts"]["users"] == 2
    assert manifest["row_counts"]["credit_transactions"] == await owner_conn.fetchval(
        "SELECT count(*) FROM credit_transactions"
    )
    account = next(a for a in manifest["ledger"] if a["user_id"] == str(alice.id))
    # Exact: 100.000001 bought, 0.123456 * markup spent; balance is the ledger's sum.
    assert Decimal(account["balance"]) == Decimal(account["ledger_sum"])
    assert account["purchased"] == "100.000001"
    assert account["transactions"] == 2
    assert len(manifest["archive"]["sha256"]) == 64
    assert manifest["server_version"] and manifest["pg_dump_version"].startswith("pg_dump")


async def test_restore_verifies_and_refuses_a_non_empty_target_unless_forced(
    backed_up: Path, settings: Settings, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await keen(settings, "restore", str(backed_up), "--target", target) == 0
    out = capsys.readouterr()
    assert "ledger verify: OK" in out.out and "verified" in out.out
    assert await keen(settings, "restore", str(backed_up), "--target", target) == 2
    assert "not empty" in capsys.readouterr().err
    assert await keen(settings, "restore", str(backed_up), "--target", target, "--force") == 0
    conn = await asyncpg.connect(target)
    try:
        assert await conn.fetchval("SELECT count(*) FROM users") == 2
    finally:
        await conn.close()


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "tampered":
        data[len(data) // 2] ^= 0x01  # one bit
    else:
        del data[len(data) // 2 :]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["tampered", "truncated"])
async def test_a_damaged_archive_is_refused_before_the_target_is_touched(
    backed_up: Path,
    settings: Settings,
    target: str,
    pg_admin_dsn: str,
    damage: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _damage(backed_up, damage)
    assert await keen(settings, "restore", str(backed_up), "--target", target) == 2
    err = capsys.readouterr().err
    assert "does not match its manifest" in err and err.count("\n") == 1
    assert not await _exists(pg_admin_dsn, target)


async def test_restore_runs_the_packaged_roles_not_an_edited_roles_file(
    backed_up: Path,
    settings: Settings,
    target: str,
    pg_admin_dsn: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The checksums sit in the manifest beside the files: whoever can edit the roles file can
    fix its checksum too. Restore runs as a superuser or BYPASSRLS role, so it must not execute
    SQL read from the backup's directory; the roles are the installed package's."""
    role = f"keen_edited_{os.getpid()}"
    roles_path = backed_up.with_name("keen.dump.roles.sql")
    roles_path.write_text(roles_path.read_text() + f"\nCREATE ROLE {role};\n")
    manifest_path = backed_up.with_name("keen.dump.manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["roles"]["sha256"] = sha256_of(roles_path)
    manifest_path.write_text(json.dumps(manifest))
    conn = await asyncpg.connect(pg_admin_dsn)
    try:
        assert await keen(settings, "restore", str(backed_up), "--target", target) == 0
        assert not await conn.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", role)
    finally:
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.close()


async def test_a_forced_restore_that_is_refused_leaves_the_target_as_it_was(
    backed_up: Path, settings: Settings, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--force replaces the target's contents only once nothing stands in the way: a refusal
    (here, the backup's schema owner missing on the target) must not leave it emptied."""
    assert await keen(settings, "restore", str(backed_up), "--target", target) == 0
    manifest_path = backed_up.with_name("keen.dump.manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["owner"] = "keen_no_such_owner"
    manifest_path.write_text(json.dumps(manifest))
    assert await keen(settings, "restore", str(backed_up), "--target", target, "--force") == 2
    assert "keen_no_such_owner" in capsys.readouterr().err
    conn = await asyncpg.connect(target)
    try:
        assert await conn.fetchval("SELECT count(*) FROM users") == 2
    finally:
        await conn.close()


async def test_a_restore_that_disagrees_with_the_manifest_fails(
    backed_up: Path, settings: Settings, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest_path = backed_up.with_name("keen.dump.manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["row_counts"]["agent_sessions"] += 1
    manifest["ledger"][0]["balance"] = str(Decimal(manifest["ledger"][0]["balance"]) + 1)
    manifest_path.write_text(json.dumps(manifest))
    assert await keen(settings, "restore", str(backed_up), "--target", target) == 1
    out = capsys.readouterr().out
    assert "MISMATCH table agent_sessions" in out
    assert f"MISMATCH account {manifest['ledger'][0]['account_id']}: balance" in out
    assert "FAILED verification" in out


async def test_a_role_that_cannot_bypass_rls_is_told_so(
    fresh_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    role = f"keen_plain_{os.getpid()}_{next(_names)}"
    admin = await asyncpg.connect(fresh_dsn)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS")
        parts = urlsplit(fresh_dsn)
        dsn = urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rpartition('@')[2]}"))
        rc = await keen(make_settings(dsn), "backup", str(tmp_path / "x.dump"))
        err = capsys.readouterr().err
    finally:
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()
    assert rc == 2
    assert err.count("\n") == 1 and "cannot read through row-level security" in err
    assert not (tmp_path / "x.dump").exists()


async def test_a_dedicated_bypassrls_backup_role_can_back_up(
    db: KeenDatabase,
    alice: User,
    fresh_dsn: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The documented alternative to a superuser: a LOGIN BYPASSRLS role that can read every
    table (pg_read_all_data). It is no member of keen_system, so the stream's functions are
    not its to call: the backup goes on without the claim and the horizon (the restore moves
    the positions anyway), and a failure would be one line, never a traceback."""
    await _business(db, alice, "a")
    role = f"keen_backup_{os.getpid()}_{next(_names)}"
    admin = await asyncpg.connect(fresh_dsn)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER BYPASSRLS")
        await admin.execute(f"GRANT pg_read_all_data TO {role}")
        parts = urlsplit(fresh_dsn)
        dsn = urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rpartition('@')[2]}"))
        path = tmp_path / "keen.dump"
        rc = await keen(make_settings(dsn), "backup", str(path))
        err = capsys.readouterr().err
        # Without the right to read the tables: one line, exit 2.
        await admin.execute(f"REVOKE pg_read_all_data FROM {role}")
        rc_denied = await keen(make_settings(dsn), "backup", str(tmp_path / "denied.dump"))
        err_denied = capsys.readouterr().err
    finally:
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()
    assert rc == 0, err
    manifest = json.loads(path.with_name("keen.dump.manifest.json").read_text())
    assert manifest["row_counts"]["users"] == 1 and manifest["stream_horizon"] is None
    assert rc_denied == 2 and err_denied.count("\n") == 1 and "permission denied" in err_denied


# --- the drill: another cluster --------------------------------------------------------------
@pytest.fixture
def ahead_pg() -> Iterator[OwnedPostgres]:
    """A private cluster whose transaction ids are 3 * 2^32 ahead of a new one's."""
    if not owned_postgres_available():
        pytest.skip("needs PostgreSQL server binaries to start a private server")
    cluster = OwnedPostgres.create()
    try:
        cluster._run("pg_resetwal", "-e", "3", str(cluster.data_dir))
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


async def _setup_source(cluster: OwnedPostgres) -> str:
    conn = await asyncpg.connect(cluster.dsn())
    try:
        await conn.execute("CREATE DATABASE keen")
    finally:
        await conn.close()
    dsn = cluster.dsn("keen")
    await upgrade_async(dsn)
    return dsn


async def test_drill_backup_restore_on_a_new_cluster_and_the_hub_serves_old_cursors(
    ahead_pg: OwnedPostgres, owned_pg: OwnedPostgres, tmp_path: Path
) -> None:
    source = await _setup_source(ahead_pg)
    settings = make_settings(source)
    db = await KeenDatabase.connect(settings=settings, migrate=False)
    try:
        alice = await db.users.create(email="a@example.com", username="alice", password=PASSWORD)
        bob = await db.users.create(email="b@example.com", username="bob", password=PASSWORD)
        await _business(db, bob, "b")
        await _business(db, alice)
        # Retention ran: the watermark is set (restored with the rest).
        assert await db.events.prune(timedelta(0)) > 0
        old_cursor = str(await db.events.head())  # a client of the old cluster is here
        await step(db, alice, "s", 1)
        await db.credits.deduct_credits(alice.id, Decimal("0.01"), "s", "model call")
        restored_head = await db.events.head()
    finally:
        await db.close()

    path = tmp_path / "keen.dump"
    assert await keen(settings, "backup", str(path)) == 0
    target = owned_pg.dsn("keen")
    assert await keen(settings, "restore", str(path), "--target", target) == 0

    new_db = await KeenDatabase.connect(settings=make_settings(target), migrate=False)
    try:
        assert (await new_db.events.head()) == restored_head
        token = await stream_token(new_db, alice.id)
        async with running_hub(target) as hub:
            c = await open_client(hub.url, token)
            reply = await c.subscribe(since=old_cursor)
            assert reply["recovered"] is True, reply
            # What the old cluster wrote after the client's cursor, then live events.
            replayed = await c.events(2)
            assert [e["event_type"] for e in replayed] == ["session.progress", "credit.usage"]
            await step(new_db, alice, "s", 1)
            (live,) = await c.events(1)
            assert live["data"]["iteration_count"] == 3
            position = int(live["cursor"].split("-")[0])
            assert position > restored_head.xid + 2**32 - 1
            # A cursor the old cluster issued after the backup (in the skipped range).
            lost = f"{restored_head.xid + 1000}-{restored_head.id + 5}"
            c2 = await open_client(hub.url, token)
            reply = await c2.subscribe(since=lost)
            assert reply["recovered"] is False and reply["reason"] == "since_unknown", reply
            await c.close()
            await c2.close()
    finally:
        await new_db.close()


async def test_a_plain_pg_restore_moves_positions_at_the_first_write(
    ahead_pg: OwnedPostgres, owned_pg: OwnedPostgres, tmp_path: Path
) -> None:
    """An operator's own pg_dump / pg_restore, no keen-stream command and no hub: the first
    business write on the new cluster claims it, and its event lands above the restored ones."""
    source = await _setup_source(ahead_pg)
    db = await KeenDatabase.connect(settings=make_settings(source), migrate=False)
    try:
        alice = await db.users.create(email="a@example.com", username="alice", password=PASSWORD)
        await _business(db, alice)
        old_head = await db.events.head()
    finally:
        await db.close()
    restored = await plain_restore(source, owned_pg, tmp_path / "plain.dump")
    new_db = await KeenDatabase.connect(settings=make_settings(restored), migrate=False)
    try:
        # Before any claim, the restored rows are all released (the reader's rule).
        assert await new_db.events.head() == old_head
        await step(new_db, alice, "s", 1)
        head = await new_db.events.head()
        assert head.xid >= old_head.xid + 2**32
        (event,) = await new_db.events.replay(alice.id, old_head, head)
        assert event.event_type == "session.progress"
        token = await stream_token(new_db, alice.id)
        async with running_hub(restored) as hub:
            c = await open_client(hub.url, token)
            reply = await c.subscribe(since=str(old_head))
            assert reply["recovered"] is True, reply
            (replayed,) = await c.events(1)
            assert replayed["cursor"] == str(head)
            await c.close()
    finally:
        await new_db.close()


async def test_a_restart_of_the_same_cluster_keeps_the_offset(
    owned_pg: OwnedPostgres,
) -> None:
    """After a restart the first writer claims again (a new server start) and finds its own
    cluster: positions go on as transaction ids, nothing is skipped."""
    source = await _setup_source(owned_pg)
    db = await KeenDatabase.connect(settings=make_settings(source), migrate=False)
    try:
        alice = await db.users.create(email="a@example.com", username="alice", password=PASSWORD)
        await _business(db, alice)
        before = await db.events.head()
    finally:
        await db.close()
    owned_pg.restart()
    db = await KeenDatabase.connect(settings=make_settings(source), migrate=False)
    try:
        await step(db, alice, "s", 1)
        (event,) = await db.events.replay(alice.id, before, await db.events.head())
        xid = await db.system_call("SELECT pg_current_xact_id()::text::bigint AS x")
        state = await db.system_call("SELECT * FROM stream_state")
    finally:
        await db.close()
    assert before.xid < event.cursor.xid < xid[0]["x"]  # still plain transaction ids
    assert state[0]["xid_offset"] == 0 and state[0]["gap_from"] is None
    assert state[0]["system_identifier"] is not None


# --- export-user -----------------------------------------------------------------------------
async def test_export_user_gives_everything_the_user_owns_and_nothing_of_others(
    db: KeenDatabase,
    settings: Settings,
    alice: User,
    bob: User,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await _business(db, alice, "a1")
    await _business(db, bob, "b1")
    await stream_token(db, alice.id)
    assert await keen(settings, "export-user", str(alice.id)) == 0
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert data["user"]["id"] == str(alice.id) and data["user"]["email"] == alice.email
    assert "password_hash" not in data["user"]
    tables = data["tables"]
    assert [s["session_id"] for s in tables["agent_sessions"]] == ["a1"]
    assert len(tables["auth_tokens"]) == 1 and "token_hash" not in tables["auth_tokens"][0]
    (account,) = tables["credit_accounts"]
    assert account["lifetime_purchased"] == "100.000001"  # exact, as a string
    assert {t["transaction_type"] for t in tables["credit_transactions"]} == {"purchase", "usage"}
    assert tables["stream_events"]
    for rows in tables.values():
        for row in rows:
            assert row["user_id"] == str(alice.id)
    assert str(bob.id) not in json.dumps(data)


async def test_export_user_of_an_unknown_user_is_a_clear_error(
    db: KeenDatabase, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await keen(settings, "export-user", str(uuid.uuid4())) == 3  # NotFound
    assert "no user" in capsys.readouterr().err
    assert await keen(settings, "export-user", "not-a-uuid") == 2


async def test_export_user_leaves_out_stream_ticket_and_credential_hashes(
    db: KeenDatabase, settings: Settings, alice: User, capsys: pytest.CaptureFixture[str]
) -> None:
    """A data-access export holds the user's rows, never a secret's hash: a ticket's or a
    stream credential's hash is as good as the secret for a lookup by hash."""
    token = await stream_token(db, alice.id)
    issued = await db.tickets.issue(token, timedelta(seconds=30))
    await db.tickets.redeem(issued.ticket.get_secret_value(), timedelta(hours=1))
    assert await keen(settings, "export-user", str(alice.id)) == 0
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    rows = data["tables"]["stream_tickets"]
    assert {r["kind"] for r in rows} == {"ticket", "credential"}
    for row in rows:
        assert "secret_hash" not in row
    assert hash_token(issued.ticket.get_secret_value()) not in json.dumps(data)


# --- the claim on a new cluster ------------------------------------------------------------
async def test_a_transaction_that_began_before_the_claim_writes_a_resumable_position(
    db: KeenDatabase, owner_conn: asyncpg.Connection, fresh_dsn: str, alice: User
) -> None:
    """On a new cluster the claim races writers: a transaction can hold its xid from before the
    claim and write its event after it. Its position is xid + the new offset; it must not fall
    inside the skipped range, or the cursor the hub hands out for it is refused on resume as
    "not issued by this database" (since_unknown) although this database issued it."""
    await _business(db, alice, "a")
    # As after a pg_restore on another cluster: the state names a cluster that is not this one.
    await owner_conn.execute(
        "UPDATE stream_state SET system_identifier = 42, postmaster_start = NULL"
    )
    early = await asyncpg.connect(fresh_dsn)
    try:
        async with early.transaction():
            await early.fetchval("SELECT pg_current_xact_id()")  # its xid, before the claim
            await owner_conn.execute("SELECT keen_stream_claim()")  # say, the hub's listener
            await early.execute(
                "INSERT INTO stream_events (user_id, event_type, payload)"
                " VALUES ($1, 'test.early', '{}')",
                alice.id,
            )
    finally:
        await early.close()
    head = await db.events.head()
    assert (
        await owner_conn.fetchval(
            "SELECT event_type FROM stream_events ORDER BY xid DESC, id DESC LIMIT 1"
        )
        == "test.early"
    )
    await db.events.bounds(since=head)  # no CursorUnknown
    assert await db.events.replay(alice.id, head, head) == []


async def test_a_restore_refuses_cursors_that_may_have_seen_what_the_backup_lacks(
    db: KeenDatabase,
    settings: Settings,
    alice: User,
    owner_conn: asyncpg.Connection,
    fresh_dsn: str,
    tmp_path: Path,
    target: str,
) -> None:
    """Two ways an old cursor at or below the restored head can hide a loss, even on the
    same cluster: a transaction running across the backup's snapshot commits afterwards with
    a position below later events that are in the backup, and the old database keeps issuing
    cursors after the backup. A client that saw either resumes as if nothing were missing,
    holding state the restored database never had. Only cursors below the backup's horizon
    (everything at or before them is in the archive) may resume."""
    await _business(db, alice, "a")
    safe = await db.events.head()  # issued before the backup: everything up to it is kept
    running = await asyncpg.connect(fresh_dsn)
    try:
        async with running.transaction():
            await running.execute(
                "INSERT INTO stream_events (user_id, event_type, payload)"
                " VALUES ($1, 'test.straddles', '{}')",
                alice.id,
            )
            await step(db, alice, "a", 2)  # committed, in the backup, after the running one
            path = tmp_path / "keen.dump"
            assert await keen(settings, "backup", str(path)) == 0
        # Committed after the snapshot: the old hub now hands out both, then later ones.
    finally:
        await running.close()
    seen = await db.events.head()  # a client of the old database saw the straddling event
    await step(db, alice, "a", 3)
    late = await db.events.head()

    assert await keen(settings, "restore", str(path), "--target", target) == 0
    restored = await KeenDatabase.connect(settings=make_settings(target), migrate=False)
    try:
        await step(restored, alice, "a", 4)  # the restored database moves on
        await restored.events.bounds(since=safe)
        for cursor in (seen, late):
            with pytest.raises(CursorUnknown):
                await restored.events.bounds(since=cursor)
    finally:
        await restored.close()


async def test_a_backup_reads_a_database_that_takes_no_writes(
    db: KeenDatabase,
    settings: Settings,
    alice: User,
    owner_conn: asyncpg.Connection,
    fresh_dsn: str,
    tmp_path: Path,
) -> None:
    """Backups are often taken from a hot standby, where nothing can be written (pg_dump and
    snapshot export work there). The claim that names the cluster is a write: it is skipped
    there, not the backup. A database set read-only stands in for the standby."""
    await _business(db, alice, "a")
    name = urlsplit(fresh_dsn).path.lstrip("/")
    await owner_conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    try:
        assert await keen(settings, "backup", str(tmp_path / "keen.dump")) == 0
    finally:
        await owner_conn.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
