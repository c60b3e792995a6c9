"""Users: registration, lookup, authentication, profile, status, audit trail."""

from __future__ import annotations

import uuid
from typing import Any, TypeAlias

import asyncpg
import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User, UserProfileUpdate
from keen_stream.errors import (
    AccountInactive,
    DuplicateEmail,
    DuplicateUsername,
    ImmutableRecord,
    InsufficientPrivileges,
    InvalidCredentials,
    InvalidIdentifier,
    InvalidInput,
    NotFound,
)
from tests.conftest import PASSWORD

Owner: TypeAlias = asyncpg.Connection


async def _user_count(owner: Owner) -> int:
    count: int = await owner.fetchval("SELECT count(*) FROM users")
    return count


async def test_create_hashes_password_with_argon2id_and_opens_a_credit_account(
    db: KeenDatabase, owner_conn: Owner
) -> None:
    user = await db.users.create(email="Carol@Example.com", username="carol", password=PASSWORD)
    assert user.email == "carol@example.com"
    assert (user.role, user.is_admin, user.account_status) == ("user", False, "active")
    row = await owner_conn.fetchrow("SELECT password_hash FROM users WHERE id = $1", user.id)
    assert row["password_hash"].startswith("$argon2id$")
    assert PASSWORD not in row["password_hash"]
    balance = await owner_conn.fetchval(
        "SELECT current_balance FROM credit_accounts WHERE user_id = $1", user.id
    )
    assert balance == 0


async def test_duplicate_email_and_username_are_clear_errors_and_write_nothing(
    db: KeenDatabase, owner_conn: Owner, alice: User
) -> None:
    before = await _user_count(owner_conn)
    with pytest.raises(DuplicateEmail):
        await db.users.create(email="ALICE@example.com", username="alice2", password=PASSWORD)
    with pytest.raises(DuplicateUsername):
        await db.users.create(email="alice2@example.com", username="alice", password=PASSWORD)
    assert await _user_count(owner_conn) == before
    assert await owner_conn.fetchval("SELECT count(*) FROM credit_accounts") == before


@pytest.mark.parametrize(
    "fields",
    [
        {"email": "not-an-email"},
        {"email": "a@b@c.com"},
        {"email": "x" * 250 + "@example.com"},
        {"username": "ab"},
        {"username": "has space"},
        {"username": "x" * 65},
        {"username": "-leadingdash"},
        {"password": "short"},
        {"password": "p" * 1025},
        {"display_name": "d" * 256},
        {"avatar_url": "http://" + "a" * 2048},
        {"timezone": "Mars/Olympus_Mons"},
        {"preferences": "not a dict"},
        {"unexpected": "field"},
    ],
)
async def test_invalid_registration_is_refused_and_writes_nothing(
    db: KeenDatabase, owner_conn: Owner, fields: dict[str, Any]
) -> None:
    values = {"email": "dave@example.com", "username": "dave", "password": PASSWORD, **fields}
    before = await _user_count(owner_conn)
    with pytest.raises(InvalidInput):
        await db.users.create(**values)
    assert await _user_count(owner_conn) == before


async def test_authenticate_records_login_and_rejects_bad_passwords(
    db: KeenDatabase, alice: User
) -> None:
    user = await db.users.authenticate("alice@example.com", PASSWORD, ip="203.0.113.7")
    assert user.id == alice.id
    assert user.last_login_at is not None
    assert str(user.last_login_ip) == "203.0.113.7"
    with pytest.raises(InvalidCredentials):
        await db.users.authenticate("alice@example.com", "wrong password")
    with pytest.raises(InvalidCredentials):
        await db.users.authenticate("nobody@example.com", PASSWORD)
    with pytest.raises(InvalidCredentials):
        await db.users.authenticate("alice@example.com", None)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        await db.users.authenticate("alice@example.com", PASSWORD, ip="999.1.1.1")


async def test_suspended_user_cannot_log_in_even_with_the_right_password(
    db: KeenDatabase, alice: User, admin: User
) -> None:
    suspended = await db.users.set_account_status(alice.id, "suspended", actor_id=admin.id)
    assert suspended.account_status == "suspended"
    with pytest.raises(AccountInactive):
        await db.users.authenticate("alice@example.com", PASSWORD)
    await db.users.set_account_status(alice.id, "active", actor_id=admin.id)
    assert (await db.users.authenticate("alice@example.com", PASSWORD)).id == alice.id


async def test_only_admins_change_account_status(
    db: KeenDatabase, owner_conn: Owner, alice: User, bob: User
) -> None:
    with pytest.raises(InsufficientPrivileges):
        await db.users.set_account_status(alice.id, "pending_verification", actor_id=alice.id)
    with pytest.raises(NotFound):  # bob's row is invisible to alice
        await db.users.set_account_status(bob.id, "suspended", actor_id=alice.id)
    assert (
        await owner_conn.fetchval("SELECT account_status FROM users WHERE id = $1", bob.id)
        == "active"
    )
    with pytest.raises(InvalidInput):
        await db.users.set_account_status(bob.id, "banished", actor_id=alice.id)


async def test_get_is_scoped_by_rls(db: KeenDatabase, alice: User, bob: User, admin: User) -> None:
    assert (await db.users.get(alice.id)).username == "alice"
    with pytest.raises(NotFound):
        await db.users.get(bob.id, actor_id=alice.id)
    assert (await db.users.get(bob.id, actor_id=admin.id)).username == "bob"
    assert (await db.users.get_by_email("BOB@example.com", actor_id=admin.id)).id == bob.id
    with pytest.raises(NotFound):
        await db.users.get_by_email("bob@example.com", actor_id=alice.id)
    with pytest.raises(NotFound):
        await db.users.get(uuid.uuid4())


@pytest.mark.parametrize("bad", ["not-a-uuid", "", "1234", 42, None, "x" * 100])
async def test_malformed_ids_are_typed_errors(db: KeenDatabase, bad: object) -> None:
    with pytest.raises(InvalidIdentifier):
        await db.users.get(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidIdentifier):
        async with db.user_transaction(bad):  # type: ignore[arg-type]
            pass


async def test_update_profile_merges_preferences(db: KeenDatabase, alice: User) -> None:
    await db.users.update_profile(alice.id, preferences={"theme": "dark", "lang": "he"})
    user = await db.users.update_profile(
        alice.id, UserProfileUpdate(display_name="Alice A.", preferences={"lang": "en"})
    )
    assert user.display_name == "Alice A."
    assert user.preferences == {"theme": "dark", "lang": "en"}
    user = await db.users.update_profile(alice.id, timezone="Asia/Jerusalem")
    assert user.timezone == "Asia/Jerusalem"
    assert user.display_name == "Alice A."


async def test_update_profile_refuses_bad_input_and_other_users(
    db: KeenDatabase, owner_conn: Owner, alice: User, bob: User
) -> None:
    before = await owner_conn.fetchrow("SELECT * FROM users WHERE id = $1", alice.id)
    with pytest.raises(InvalidInput):
        await db.users.update_profile(alice.id, timezone="Nowhere/Land")
    with pytest.raises(InvalidInput):
        await db.users.update_profile(alice.id, display_name="x" * 300)
    with pytest.raises(NotFound):
        await db.users.update_profile(alice.id, display_name="hijacked", actor_id=bob.id)
    after = await owner_conn.fetchrow("SELECT * FROM users WHERE id = $1", alice.id)
    assert dict(after) == dict(before)


async def test_database_rejects_unknown_timezone_even_without_the_dal(
    owner_conn: Owner, alice: User
) -> None:
    with pytest.raises(asyncpg.PostgresError, match="unknown time zone"):
        await owner_conn.execute(
            "UPDATE users SET timezone = 'Nowhere/Land' WHERE id = $1", alice.id
        )


async def test_user_changes_are_audited_without_secrets(
    db: KeenDatabase, owner_conn: Owner, alice: User, admin: User
) -> None:
    await db.users.update_profile(alice.id, display_name="Alice")
    await db.users.set_account_status(alice.id, "suspended", actor_id=admin.id)
    rows = await owner_conn.fetch(
        "SELECT * FROM audit_log WHERE table_name = 'users' AND row_id = $1 ORDER BY id", alice.id
    )
    assert [r["action"] for r in rows] == ["INSERT", "UPDATE", "UPDATE"]
    insert, profile, status = rows
    assert insert["changes"]["password_hash"] == "[redacted]"
    assert "$argon2" not in str(insert["changes"])
    assert profile["actor_user_id"] == alice.id
    assert profile["changes"]["display_name"] == {"old": None, "new": "Alice"}
    assert status["actor_user_id"] == admin.id
    assert status["changes"]["account_status"] == {"old": "active", "new": "suspended"}
    # alice can read her own audit trail, not the admin's
    async with db.user_transaction(alice.id) as conn:
        visible = {r["user_id"] for r in await conn.fetch("SELECT user_id FROM audit_log")}
    assert visible == {alice.id}


async def test_audit_log_is_append_only_even_for_the_owner(owner_conn: Owner, alice: User) -> None:
    with pytest.raises(asyncpg.PostgresError, match="append-only"):
        await owner_conn.execute("DELETE FROM audit_log")
    with pytest.raises(asyncpg.PostgresError, match="append-only"):
        await owner_conn.execute("UPDATE audit_log SET action = 'INSERT'")
    assert await owner_conn.fetchval("SELECT count(*) FROM audit_log") >= 1


async def test_audit_log_append_only_maps_to_domain_error(db: KeenDatabase, alice: User) -> None:
    with pytest.raises(ImmutableRecord):
        async with db.system_transaction() as conn:
            await conn.execute("DELETE FROM audit_log WHERE user_id = $1", alice.id)


async def test_a_plain_admin_cannot_suspend_or_demote_the_super_admin(
    db: KeenDatabase, owner_conn: Owner, make_user, admin: User, alice: User
) -> None:
    plain = await make_user()
    await owner_conn.execute(
        "UPDATE users SET role = 'admin', is_admin = true WHERE id = $1", plain.id
    )
    with pytest.raises(InsufficientPrivileges):
        await db.users.set_account_status(admin.id, "suspended", actor_id=plain.id)
    with pytest.raises(InsufficientPrivileges):
        async with db.user_transaction(plain.id) as conn:
            await conn.execute("UPDATE users SET role = 'super_admin' WHERE id = $1", plain.id)
    row = await owner_conn.fetchrow(
        "SELECT role, account_status FROM users WHERE id = $1", admin.id
    )
    assert (row["role"], row["account_status"]) == ("super_admin", "active")
    # ...while a plain admin still manages ordinary users, and the super-admin manages admins
    changed = await db.users.set_account_status(alice.id, "suspended", actor_id=plain.id)
    assert changed.account_status == "suspended"
    changed = await db.users.set_account_status(plain.id, "suspended", actor_id=admin.id)
    assert changed.account_status == "suspended"


async def test_tenants_cannot_call_the_login_lookup(db: KeenDatabase, alice: User) -> None:
    with pytest.raises(InsufficientPrivileges):
        async with db.user_transaction(alice.id) as conn:
            await conn.fetch("SELECT * FROM keen_login_lookup('alice@example.com')")


async def test_list_shows_an_admin_everyone_and_a_user_only_themselves(
    db: KeenDatabase, alice: User, bob: User, admin: User
) -> None:
    everyone = await db.users.list(actor_id=admin.id)
    assert [u.id for u in everyone] == [alice.id, bob.id, admin.id]  # oldest first
    assert [u.id for u in await db.users.list(actor_id=alice.id)] == [alice.id]  # RLS
    assert [u.id for u in await db.users.list(actor_id=admin.id, limit=1)] == [alice.id]
    await db.users.set_account_status(bob.id, "suspended", actor_id=admin.id)
    assert [u.id for u in await db.users.list(actor_id=admin.id, status="suspended")] == [bob.id]
    for bad in ({"status": "gone"}, {"limit": 0}, {"limit": 10_001}, {"limit": True}):
        with pytest.raises(InvalidInput):
            await db.users.list(actor_id=admin.id, **bad)


async def test_admin_by_email_finds_only_an_active_admin(
    db: KeenDatabase, alice: User, admin: User
) -> None:
    assert (await db.users.admin_by_email(admin.email.upper())).id == admin.id
    for email in (alice.email, "nobody@example.com"):
        with pytest.raises(InsufficientPrivileges, match="not an active admin"):
            await db.users.admin_by_email(email)
