"""Who may delete a user row (docs/schema.md): an active admin, anyone but a super-admin.

A super-admin row is deleted only by the system role. A denied DELETE under RLS silently
affects no row, so every test reads the rows back as the owner.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.errors import ImmutableRecord
from tests.conftest import UserFactory
from tests.integration.credits_support import fund

DELETE_USER = "DELETE FROM users WHERE id = $1"


@pytest.fixture
async def plain_admin(make_user: UserFactory, owner_conn) -> User:
    user = await make_user()
    await owner_conn.execute(
        "UPDATE users SET role = 'admin', is_admin = true WHERE id = $1", user.id
    )
    return user


async def _exists(owner_conn, user: User) -> bool:
    return bool(await owner_conn.fetchval("SELECT count(*) FROM users WHERE id = $1", user.id))


async def _delete_as(db: KeenDatabase, actor: User, target: User) -> str:
    async with db.user_transaction(actor.id) as conn:
        return str(await conn.execute(DELETE_USER, target.id))


async def test_a_plain_admin_cannot_delete_the_super_admin(
    db: KeenDatabase, plain_admin: User, admin: User, owner_conn
):
    assert await _delete_as(db, plain_admin, admin) == "DELETE 0"
    assert await _exists(owner_conn, admin)


async def test_the_super_admin_cannot_delete_their_own_row_as_a_tenant(
    db: KeenDatabase, admin: User, owner_conn
):
    assert await _delete_as(db, admin, admin) == "DELETE 0"
    assert await _exists(owner_conn, admin)


async def test_a_user_cannot_delete_their_own_row(db: KeenDatabase, alice: User, owner_conn):
    assert await _delete_as(db, alice, alice) == "DELETE 0"
    assert await _exists(owner_conn, alice)


async def test_an_admin_may_delete_a_user_and_the_deletion_is_audited(
    db: KeenDatabase, plain_admin: User, admin: User, alice: User, bob: User, owner_conn
):
    assert await _delete_as(db, plain_admin, alice) == "DELETE 1"
    assert await _delete_as(db, admin, bob) == "DELETE 1"
    assert not await _exists(owner_conn, alice) and not await _exists(owner_conn, bob)
    actors = await owner_conn.fetch(
        "SELECT row_id, actor_user_id FROM audit_log WHERE table_name = 'users'"
        " AND action = 'DELETE' ORDER BY id"
    )
    assert [(r["row_id"], r["actor_user_id"]) for r in actors] == [
        (alice.id, plain_admin.id),
        (bob.id, admin.id),
    ]


async def test_only_the_system_role_deletes_a_super_admin(
    db: KeenDatabase, admin: User, owner_conn
):
    async with db.system_transaction() as conn:
        assert await conn.execute(DELETE_USER, admin.id) == "DELETE 1"
    assert not await _exists(owner_conn, admin)


async def test_a_user_with_ledger_history_cannot_be_deleted_even_by_an_admin(
    db: KeenDatabase, plain_admin: User, alice: User, owner_conn
):
    await fund(db, alice, "5")
    with pytest.raises(ImmutableRecord):
        await _delete_as(db, plain_admin, alice)
    with pytest.raises(ImmutableRecord):
        async with db.system_transaction() as conn:
            await conn.execute(DELETE_USER, alice.id)
    assert await _exists(owner_conn, alice)
    assert await owner_conn.fetchval(
        "SELECT sum(amount) FROM credit_transactions WHERE user_id = $1", alice.id
    ) == Decimal("5")
