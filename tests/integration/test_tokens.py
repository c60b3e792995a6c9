"""Auth token lifecycle: issue, validate, expire, revoke, scopes, tampering."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any, TypeAlias

import asyncpg
import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.errors import (
    AccountInactive,
    InsufficientPrivileges,
    InvalidInput,
    InvalidToken,
    NotFound,
    TokenExpired,
    TokenRevoked,
    TokenScopeError,
)

Owner: TypeAlias = asyncpg.Connection


async def test_token_is_returned_once_and_stored_only_as_a_hash(
    db: KeenDatabase, owner_conn: Owner, alice: User
) -> None:
    issued = await db.tokens.issue(alice.id, "api_key", name="ci", scopes=["read", "stream"])
    token = issued.token.get_secret_value()
    assert token.startswith("ks_api_")
    assert len(token) >= 7 + 43  # 256 bits in base64url
    assert token not in repr(issued)
    row = await owner_conn.fetchrow("SELECT * FROM auth_tokens WHERE id = $1", issued.record.id)
    assert row["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in str(dict(row))
    assert issued.record.expires_at is None  # API keys do not expire by default


async def test_validate_bumps_usage_and_returns_identity(
    db: KeenDatabase, owner_conn: Owner, alice: User
) -> None:
    issued = await db.tokens.issue(alice.id, "session", scopes=["stream"])
    token = issued.token.get_secret_value()
    info = await db.tokens.validate(token, scopes=["stream"], ip="198.51.100.4")
    assert (info.user_id, info.token_type, info.is_admin) == (alice.id, "session", False)
    await db.tokens.validate(token)
    await db.tokens.validate(token, touch=False)
    row = await owner_conn.fetchrow("SELECT * FROM auth_tokens WHERE id = $1", issued.record.id)
    assert row["usage_count"] == 2
    assert str(row["last_used_ip"]) == "198.51.100.4"
    assert row["last_used_at"] is not None


async def test_expired_token_is_refused(db: KeenDatabase, owner_conn: Owner, alice: User) -> None:
    issued = await db.tokens.issue(alice.id, "session", expires_in=timedelta(hours=1))
    await owner_conn.execute(
        "UPDATE auth_tokens SET expires_at = now() - interval '1 second' WHERE id = $1",
        issued.record.id,
    )
    with pytest.raises(TokenExpired):
        await db.tokens.validate(issued.token.get_secret_value())
    assert (
        await owner_conn.fetchval(
            "SELECT usage_count FROM auth_tokens WHERE id = $1", issued.record.id
        )
        == 0
    )


async def test_revoked_token_is_refused_and_revoke_is_idempotent(
    db: KeenDatabase, alice: User
) -> None:
    issued = await db.tokens.issue(alice.id, "jwt_refresh")
    first = await db.tokens.revoke(alice.id, issued.record.id)
    again = await db.tokens.revoke(alice.id, issued.record.id)
    assert not first.is_active and first.revoked_at is not None
    assert again.revoked_at == first.revoked_at
    with pytest.raises(TokenRevoked):
        await db.tokens.validate(issued.token.get_secret_value())
    assert await db.tokens.list(alice.id) == []
    assert [t.id for t in await db.tokens.list(alice.id, include_inactive=True)] == [
        issued.record.id
    ]


async def test_wrong_scope_is_refused(db: KeenDatabase, alice: User) -> None:
    issued = await db.tokens.issue(alice.id, "api_key", scopes=["read"])
    with pytest.raises(TokenScopeError) as err:
        await db.tokens.validate(issued.token.get_secret_value(), scopes=["read", "admin"])
    assert err.value.details["missing"] == ["admin"]
    wildcard = await db.tokens.issue(alice.id, "api_key", scopes=["*"])
    await db.tokens.validate(wildcard.token.get_secret_value(), scopes=["anything"])


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # one character changed
        lambda t: t + "x",
        lambda t: t[:-5],
        lambda t: t.replace("ks_ses_", "ks_api_"),
        lambda t: "",
        lambda t: "x" * 10_000,
        lambda t: "ks_ses_" + "\u00e9" * 43,
        lambda t: None,
    ],
)
async def test_tampered_or_garbage_tokens_are_refused(
    db: KeenDatabase, alice: User, mangle
) -> None:
    issued = await db.tokens.issue(alice.id, "session")
    with pytest.raises(InvalidToken):
        await db.tokens.validate(mangle(issued.token.get_secret_value()))


async def test_token_of_suspended_user_is_refused(
    db: KeenDatabase, alice: User, admin: User
) -> None:
    issued = await db.tokens.issue(alice.id, "session")
    await db.users.set_account_status(alice.id, "suspended", actor_id=admin.id)
    with pytest.raises(AccountInactive):
        await db.tokens.validate(issued.token.get_secret_value())


async def test_users_cannot_touch_each_others_tokens(
    db: KeenDatabase, alice: User, bob: User, admin: User
) -> None:
    issued = await db.tokens.issue(bob.id, "api_key")
    with pytest.raises(NotFound):
        await db.tokens.revoke(bob.id, issued.record.id, actor_id=alice.id)
    with pytest.raises(NotFound):
        await db.tokens.revoke(alice.id, issued.record.id)
    assert await db.tokens.list(bob.id, actor_id=alice.id) == []
    await db.tokens.validate(issued.token.get_secret_value())  # still valid
    # an admin may revoke anyone's token
    await db.tokens.revoke(bob.id, issued.record.id, actor_id=admin.id)
    with pytest.raises(TokenRevoked):
        await db.tokens.validate(issued.token.get_secret_value())


async def test_admin_tokens_bypass_limits(db: KeenDatabase, admin: User, alice: User) -> None:
    admin_token = await db.tokens.issue(admin.id, "session")
    info = await db.tokens.validate(admin_token.token.get_secret_value())
    assert info.is_admin and info.bypass_limits
    user_token = await db.tokens.issue(alice.id, "session")
    assert not user_token.record.bypass_limits


@pytest.mark.parametrize(
    "kwargs",
    [
        {"token_type": "password"},
        {"scopes": "read"},
        {"scopes": ["x" * 65]},
        {"scopes": [""]},
        {"scopes": ["s"] * 65},
        {"name": "n" * 256},
        {"expires_in": timedelta(seconds=-1)},
        {"expires_in": 3600},
        {"ip": "not-an-ip"},
    ],
)
async def test_bad_issue_input_is_refused_and_writes_nothing(
    db: KeenDatabase, owner_conn: Owner, alice: User, kwargs: dict[str, Any]
) -> None:
    args = {"token_type": "session", **kwargs}
    token_type = args.pop("token_type")
    with pytest.raises(InvalidInput):
        await db.tokens.issue(alice.id, token_type, **args)
    assert await owner_conn.fetchval("SELECT count(*) FROM auth_tokens") == 0


async def test_a_revoked_token_stays_revoked_even_through_raw_sql(
    db: KeenDatabase, alice: User
) -> None:
    issued = await db.tokens.issue(alice.id, "api_key")
    await db.tokens.revoke(alice.id, issued.record.id)
    with pytest.raises(InsufficientPrivileges):
        async with db.user_transaction(alice.id) as conn:
            await conn.execute(
                "UPDATE auth_tokens SET is_active = true, revoked_at = NULL WHERE id = $1",
                issued.record.id,
            )
    with pytest.raises(TokenRevoked):
        await db.tokens.validate(issued.token.get_secret_value())


async def test_tenants_cannot_mint_privileged_tokens_or_fake_usage(
    db: KeenDatabase, owner_conn: Owner, alice: User
) -> None:
    with pytest.raises(InsufficientPrivileges):
        async with db.user_transaction(alice.id) as conn:
            await conn.execute(
                "INSERT INTO auth_tokens (user_id, token_type, token_hash, bypass_limits)"
                " VALUES ($1, 'api_key', 'h1', true)",
                alice.id,
            )
    async with db.user_transaction(alice.id) as conn:
        await conn.execute(
            "INSERT INTO auth_tokens (user_id, token_type, token_hash)"
            " VALUES ($1, 'api_key', 'h2')",
            alice.id,
        )
    assert (
        await owner_conn.fetchval("SELECT bypass_limits FROM auth_tokens WHERE token_hash = 'h2'")
        is False
    )
    with pytest.raises(InsufficientPrivileges):
        async with db.user_transaction(alice.id) as conn:
            await conn.execute(
                "UPDATE auth_tokens SET usage_count = 0 WHERE user_id = $1", alice.id
            )


async def test_a_demoted_admins_token_loses_its_bypass(
    db: KeenDatabase, owner_conn: Owner, make_user
) -> None:
    helper = await make_user()
    await owner_conn.execute(
        "UPDATE users SET role = 'admin', is_admin = true WHERE id = $1", helper.id
    )
    issued = await db.tokens.issue(helper.id, "session")
    assert (await db.tokens.validate(issued.token.get_secret_value())).bypass_limits
    await owner_conn.execute(
        "UPDATE users SET role = 'user', is_admin = false WHERE id = $1", helper.id
    )
    info = await db.tokens.validate(issued.token.get_secret_value())
    assert not info.is_admin
    assert not info.bypass_limits


@pytest.mark.parametrize(
    "kwargs",
    [{"name": "bad\x00name"}, {"expires_in": timedelta(days=365 * 1000)}],
)
async def test_issue_refuses_values_postgres_cannot_store(
    db: KeenDatabase, owner_conn: Owner, alice: User, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(InvalidInput):
        await db.tokens.issue(alice.id, "session", **kwargs)
    assert await owner_conn.fetchval("SELECT count(*) FROM auth_tokens") == 0


async def test_user_agent_is_cleaned_not_refused(db: KeenDatabase, alice: User) -> None:
    issued = await db.tokens.issue(alice.id, "session", user_agent="ua\x00" + "x" * 2000)
    assert issued.record.user_agent is not None
    assert "\x00" not in issued.record.user_agent
    assert len(issued.record.user_agent) == 1024
