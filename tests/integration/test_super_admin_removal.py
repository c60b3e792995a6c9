"""No one but the system role removes a super-admin (docs/schema.md, "Who may delete a user").

The ``users_delete`` policy looks at the row's role when the DELETE runs. A super-admin in
tenant context may change a super-admin's role (``keen_users_guard``), so two statements of one
transaction remove a super-admin row without the system role: demote, then delete (as an
admin deleting an admin).
"""

from __future__ import annotations

import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User


@pytest.mark.xfail(
    strict=True,
    reason="review1: a super-admin demotes a super-admin row (its own or another's) and then "
    "deletes it, in one tenant transaction; the policy checks only the role at DELETE time",
)
async def test_a_super_admin_row_cannot_be_removed_from_tenant_context_by_demoting_it_first(
    db: KeenDatabase, admin: User, owner_conn
) -> None:
    async with db.user_transaction(admin.id) as conn:
        await conn.execute("UPDATE users SET role = 'admin' WHERE id = $1", admin.id)
        await conn.execute("DELETE FROM users WHERE id = $1", admin.id)
    assert await owner_conn.fetchval(
        "SELECT role FROM users WHERE id = $1", admin.id
    ) == "super_admin"
