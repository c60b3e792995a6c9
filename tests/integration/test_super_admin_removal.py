"""No one but the system role removes a super-admin (docs/schema.md, "Who may delete a user").

The ``users_delete`` policy looks at the row's role when the DELETE runs, so the role itself must
be out of tenant code's reach: before the fix a super-admin in tenant context could demote a
super-admin row (``keen_users_guard`` allowed it) and delete it in the next statement of the same
transaction (as an admin deleting an admin). Now ``keen_users_guard`` refuses, under
``keen_app``, any change of a row's role to or from ``super_admin`` (``InsufficientPrivileges``);
only the system role gives or takes it.
"""

from __future__ import annotations

import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.errors import InsufficientPrivileges


async def test_a_super_admin_row_cannot_be_removed_from_tenant_context_by_demoting_it_first(
    db: KeenDatabase, admin: User, owner_conn
) -> None:
    with pytest.raises(InsufficientPrivileges):
        async with db.user_transaction(admin.id) as conn:
            await conn.execute("UPDATE users SET role = 'admin' WHERE id = $1", admin.id)
            await conn.execute("DELETE FROM users WHERE id = $1", admin.id)
    assert (
        await owner_conn.fetchval("SELECT role FROM users WHERE id = $1", admin.id) == "super_admin"
    )


async def test_no_one_in_tenant_context_gives_or_takes_the_super_admin_role(
    db: KeenDatabase, admin: User, make_user, owner_conn
) -> None:
    other = await make_user()
    await owner_conn.execute(
        "UPDATE users SET role = 'super_admin', is_admin = true WHERE id = $1", other.id
    )
    plain = await make_user()
    for statement, target in (
        ("UPDATE users SET role = 'admin' WHERE id = $1", other.id),  # another super-admin
        ("UPDATE users SET role = 'user', is_admin = false WHERE id = $1", other.id),
        ("UPDATE users SET role = 'super_admin', is_admin = true WHERE id = $1", plain.id),
    ):
        with pytest.raises(InsufficientPrivileges):
            async with db.user_transaction(admin.id) as conn:
                await conn.execute(statement, target)
    roles = await owner_conn.fetch(
        "SELECT id, role FROM users WHERE id = ANY($1::uuid[])", [other.id, plain.id]
    )
    assert {r["id"]: r["role"] for r in roles} == {other.id: "super_admin", plain.id: "user"}
    # What a super-admin still does from tenant context: manage a super-admin's other columns,
    # and make or unmake plain admins.
    async with db.user_transaction(admin.id) as conn:
        for statement, target in (
            ("UPDATE users SET account_status = 'suspended' WHERE id = $1", other.id),
            ("UPDATE users SET role = 'admin', is_admin = true WHERE id = $1", plain.id),
            ("UPDATE users SET role = 'user', is_admin = false WHERE id = $1", plain.id),
        ):
            await conn.execute(statement, target)
    # The system role gives and takes the role.
    async with db.system_transaction() as conn:
        await conn.execute("UPDATE users SET role = 'admin' WHERE id = $1", other.id)
    assert await owner_conn.fetchval("SELECT role FROM users WHERE id = $1", other.id) == "admin"
