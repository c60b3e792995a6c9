"""The system role and the money it must not move (docs/ledger.md, "Who may move money").

The docs' table gives ``keen_system`` maintenance only: "it owns the ledger's functions but may
**not** execute the minting ones", and the price is "changed only by
``keen_credit_set_markup``" with "an admin acting". Taking EXECUTE away is not enough while the
role keeps the table privileges those functions need: ``keen_system`` holds UPDATE on
``credit_pricing`` (for the definer function it owns) and INSERT / UPDATE on
``credit_accounts`` and ``credit_transactions`` (0001's maintenance grants), and as the owner it
can grant itself EXECUTE back. Code in ``db.system_transaction()`` (registration, the hub's
maintenance loops) can therefore reprice or mint without the billing context and without an
admin.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.errors import InsufficientPrivileges
from tests.integration.credits_support import fund

D = Decimal


@pytest.mark.xfail(
    strict=True,
    reason="review1: keen_system keeps UPDATE on credit_pricing: a system transaction "
    "reprices everyone without the billing context or an admin",
)
async def test_the_system_role_cannot_change_the_price(db: KeenDatabase, owner_conn) -> None:
    with pytest.raises(InsufficientPrivileges):
        async with db.system_transaction() as conn:
            await conn.execute("UPDATE credit_pricing SET markup = 0.01, reason = 'maintenance'")
    assert await owner_conn.fetchval("SELECT markup FROM credit_pricing") == D("5.00")


@pytest.mark.xfail(
    strict=True,
    reason="review1: keen_system owns the minting functions and may grant itself EXECUTE on "
    "them: 'may not execute the minting ones' holds only until it says otherwise",
)
async def test_the_system_role_cannot_mint(db: KeenDatabase, alice: User, owner_conn) -> None:
    await fund(db, alice, "1")
    with pytest.raises(InsufficientPrivileges):
        async with db.system_transaction() as conn:
            await conn.execute(
                "GRANT EXECUTE ON FUNCTION keen_credit_purchase(uuid, numeric, text, text, text)"
                " TO keen_system"
            )
            await conn.execute(
                "SELECT id FROM keen_credit_purchase($1, 1000000, 'minted', NULL, NULL)",
                alice.id,
            )
    assert await owner_conn.fetchval(
        "SELECT current_balance FROM credit_accounts WHERE user_id = $1", alice.id
    ) == D("1")
