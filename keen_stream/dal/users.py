"""Users: registration, lookup, authentication, profile and status changes."""

from __future__ import annotations

import asyncio
import uuid
from functools import cached_property
from typing import TYPE_CHECKING, Any, Final, Unpack

import asyncpg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from keen_stream.dal.models.users import (
    AccountStatus,
    IPAddress,
    User,
    UserCreate,
    UserCreateFields,
    UserProfileFields,
    UserProfileUpdate,
)
from keen_stream.dal.validation import build, parse_count, parse_ip, parse_uuid
from keen_stream.errors import (
    AccountInactive,
    InsufficientPrivileges,
    InvalidCredentials,
    InvalidInput,
    NotFound,
)

if TYPE_CHECKING:
    from keen_stream.dal.database import KeenDatabase

# The columns keen_app may read: never the hash, MFA secret, recovery codes or verification token.
USER_COLUMNS: Final = (
    "id, email, username, display_name, avatar_url, role, is_admin, admin_privileges, "
    "email_verified, account_status, mfa_enabled, timezone, preferences, created_at, "
    "updated_at, last_login_at, last_login_ip"
)

SQL: Final = {
    "insert": f"""
        INSERT INTO users (email, username, password_hash, display_name, avatar_url, timezone,
                           preferences, role, is_admin, admin_privileges, email_verified)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
        RETURNING {USER_COLUMNS}""",
    # keen_system may not write credit_accounts (keen_ledger's, migration 0007): it opens one.
    "insert_account": "SELECT keen_credit_open_account($1, false)",
    "get": f"SELECT {USER_COLUMNS} FROM users WHERE id = $1",
    "get_by_email": f"SELECT {USER_COLUMNS} FROM users WHERE email = lower($1)",
    "login_lookup": "SELECT user_id, password_hash, account_status FROM keen_login_lookup($1)",
    "record_login": f"""
        UPDATE users SET last_login_at = now(), last_login_ip = $2
        WHERE id = $1 RETURNING {USER_COLUMNS}""",
    # None leaves a column unchanged; preferences are merged (a key set to null is kept as null).
    "update_profile": f"""
        UPDATE users SET display_name = coalesce($2, display_name),
                         avatar_url = coalesce($3, avatar_url),
                         timezone = coalesce($4, timezone),
                         preferences = preferences || coalesce($5::jsonb, '{{}}'::jsonb)
        WHERE id = $1 RETURNING {USER_COLUMNS}""",
    "set_status": f"""
        UPDATE users SET account_status = $2 WHERE id = $1 RETURNING {USER_COLUMNS}""",
    # Oldest first, so a page boundary stays put while users are added.
    "list": f"""
        SELECT {USER_COLUMNS} FROM users
        WHERE ($1::text IS NULL OR account_status = $1)
        ORDER BY created_at, id LIMIT $2""",
}

#: The most users one ``list`` call returns.
MAX_LIST: Final = 10_000

_STATUSES: Final = frozenset(AccountStatus.__args__)  # type: ignore[attr-defined]


def user_from_row(row: asyncpg.Record) -> User:
    return User.model_validate(dict(row))


class UserDAO:
    """``db.users``. Methods taking ``actor_id`` run as that user under RLS (default: the user)."""

    def __init__(self, db: KeenDatabase) -> None:
        self._db = db

    @cached_property
    def hasher(self) -> PasswordHasher:
        s = self._db.settings
        return PasswordHasher(
            time_cost=s.argon2_time_cost,
            memory_cost=s.argon2_memory_kib,
            parallelism=s.argon2_parallelism,
        )

    @cached_property
    def _dummy_hash(self) -> str:
        # Verified against when the email is unknown, so both paths cost the same time.
        return self.hasher.hash(uuid.uuid4().hex)

    async def hash_password(self, password: str) -> str:
        # argon2 is deliberately slow (tens of ms): keep it off the event loop.
        return await asyncio.to_thread(self.hasher.hash, password)

    async def _verify(self, password_hash: str, password: str) -> bool:
        def verify() -> bool:
            try:
                return self.hasher.verify(password_hash, password)
            # UnicodeEncodeError: a lone surrogate (JSON allows one) is nobody's password.
            except (VerificationError, InvalidHashError, UnicodeEncodeError):
                return False

        return await asyncio.to_thread(verify)

    # --- commands ---------------------------------------------------------------------------
    async def create(
        self, data: UserCreate | None = None, **fields: Unpack[UserCreateFields]
    ) -> User:
        """Register a user (and their empty credit account). Raises DuplicateEmail/Username."""
        new = build(UserCreate, data, **fields)
        return await self._insert(new, role="user", admin_privileges={}, email_verified=False)

    async def _insert(
        self,
        new: UserCreate,
        *,
        role: str,
        admin_privileges: dict[str, Any],
        email_verified: bool,
        conn: asyncpg.Connection | None = None,
    ) -> User:
        password_hash = await self.hash_password(new.password.get_secret_value())
        args = (
            new.email,
            new.username,
            password_hash,
            new.display_name,
            new.avatar_url,
            new.timezone,
            new.preferences,
            role,
            role in ("admin", "super_admin"),
            admin_privileges,
            email_verified,
        )
        if conn is not None:
            row = await conn.fetchrow(SQL["insert"], *args)
            await conn.execute(SQL["insert_account"], row["id"])
            return user_from_row(row)
        # Registration happens before any user context exists: a system transaction.
        async with self._db.system_transaction() as tx:
            return await self._insert(
                new,
                role=role,
                admin_privileges=admin_privileges,
                email_verified=email_verified,
                conn=tx,
            )

    async def authenticate(
        self, email: str, password: str, *, ip: IPAddress | str | None = None
    ) -> User:
        """Check a password; on success record ``last_login_at``/``last_login_ip``.

        Unknown email and wrong password both raise :class:`InvalidCredentials` after the same
        amount of hashing work; a correct password on a non-active account raises
        :class:`AccountInactive`.
        """
        if not isinstance(email, str) or not isinstance(password, str) or len(email) > 255:
            raise InvalidCredentials()
        # The lookup returns the password hash, so it is a system call, not a tenant one.
        async with self._db.system_transaction() as conn:
            row = await conn.fetchrow(SQL["login_lookup"], email)
        if row is None:
            await self._verify(self._dummy_hash, password)
            raise InvalidCredentials()
        if not await self._verify(row["password_hash"], password):
            raise InvalidCredentials()
        if row["account_status"] != "active":
            raise AccountInactive(status=row["account_status"])
        async with self._db.user_transaction(row["user_id"]) as conn:
            updated = await conn.fetchrow(SQL["record_login"], row["user_id"], parse_ip(ip))
        return user_from_row(updated)

    async def update_profile(
        self,
        user_id: uuid.UUID | str,
        update: UserProfileUpdate | None = None,
        *,
        actor_id: uuid.UUID | str | None = None,
        **fields: Unpack[UserProfileFields],
    ) -> User:
        """Change profile fields; ``preferences`` is merged into the stored object."""
        change = build(UserProfileUpdate, update, **fields)
        uid = parse_uuid(user_id, "user_id")
        async with self._db.user_transaction(actor_id or uid) as conn:
            row = await conn.fetchrow(
                SQL["update_profile"],
                uid,
                change.display_name,
                change.avatar_url,
                change.timezone,
                change.preferences,
            )
        if row is None:
            raise NotFound("no such user")
        return user_from_row(row)

    async def set_account_status(
        self, user_id: uuid.UUID | str, status: str, *, actor_id: uuid.UUID | str
    ) -> User:
        """Admins only (enforced by the database): suspend, reactivate, deactivate a user."""
        if status not in _STATUSES:
            raise InvalidInput(f"unknown account status {status!r}", field="status")
        uid = parse_uuid(user_id, "user_id")
        async with self._db.user_transaction(actor_id) as conn:
            row = await conn.fetchrow(SQL["set_status"], uid, status)
        if row is None:
            raise NotFound("no such user")
        return user_from_row(row)

    # --- queries ----------------------------------------------------------------------------
    async def get(
        self, user_id: uuid.UUID | str, *, actor_id: uuid.UUID | str | None = None
    ) -> User:
        """The user, as seen by ``actor_id`` (default: themselves). NotFound if not visible."""
        uid = parse_uuid(user_id, "user_id")
        async with self._db.user_transaction(actor_id or uid) as conn:
            row = await conn.fetchrow(SQL["get"], uid)
        if row is None:
            raise NotFound("no such user")
        return user_from_row(row)

    async def list(
        self, *, actor_id: uuid.UUID | str, status: str | None = None, limit: int = 1000
    ) -> list[User]:
        """Users as ``actor_id`` sees the table (admins: everyone; others: themselves), oldest
        first; ``status`` keeps only accounts in that state."""
        if status is not None and status not in _STATUSES:
            raise InvalidInput(f"unknown account status {status!r}", field="status")
        limit = parse_count(limit, "limit", MAX_LIST, minimum=1)
        async with self._db.user_transaction(actor_id) as conn:
            rows = await conn.fetch(SQL["list"], status, limit)
        return [user_from_row(r) for r in rows]

    async def admin_by_email(self, email: str) -> User:
        """The active admin with this email, for tools that act as one (the operator's CLI).

        Raises :class:`InsufficientPrivileges` when there is none: the caller then has nobody to
        act as, which is not a lookup the caller asked for (so not NotFound).
        """
        if not isinstance(email, str) or len(email) > 255:
            raise InvalidInput("invalid email", field="email")
        # The login lookup is the one way to find a user before anyone's context exists.
        async with self._db.system_transaction() as conn:
            row = await conn.fetchrow(SQL["login_lookup"], email)
        if row is not None:
            user = await self.get(row["user_id"])
            if user.is_admin and user.account_status == "active":
                return user
        raise InsufficientPrivileges(
            f"{email} is not an active admin: run `keen-stream create-admin` or name another"
            " admin (KEEN_ADMIN_EMAIL, --admin-email)"
        )

    async def get_by_email(self, email: str, *, actor_id: uuid.UUID | str) -> User:
        """Look a user up by email, as ``actor_id`` sees the table (admins see everyone)."""
        if not isinstance(email, str) or len(email) > 255:
            raise InvalidInput("invalid email", field="email")
        async with self._db.user_transaction(actor_id) as conn:
            row = await conn.fetchrow(SQL["get_by_email"], email)
        if row is None:
            raise NotFound("no such user")
        return user_from_row(row)


# The seed's super-admin. The password is never here: it comes from KEEN_ADMIN_PASSWORD or a
# prompt, at run time.
SUPER_ADMIN: Final = {
    "username": "ahiya_admin",
    "display_name": "Ahiya Butman (Admin)",
    "role": "super_admin",
    "admin_privileges": {
        "unlimited_credits": True,
        "bypass_rate_limits": True,
        "view_all_analytics": True,
        "manage_users": True,
        "system_monitoring": True,
        "priority_execution": True,
        "user_impersonation": True,
        "system_diagnostics": True,
    },
}

SQL["upsert_super_admin"] = f"""
    INSERT INTO users (email, username, password_hash, display_name, role, is_admin,
                       admin_privileges, email_verified, account_status)
    VALUES ($1, $2, $3, $4, $5, true, $6, true, 'active')
    ON CONFLICT (email) DO UPDATE SET
        username = EXCLUDED.username, password_hash = EXCLUDED.password_hash,
        display_name = EXCLUDED.display_name, role = EXCLUDED.role, is_admin = true,
        admin_privileges = EXCLUDED.admin_privileges, email_verified = true,
        account_status = 'active'
    RETURNING {USER_COLUMNS}"""
# Unlimited and billing-bypassed, no limits: no fake display balance (the seed's
# 999999.999999). Created or updated by the ledger's function (an active admin's only).
SQL["upsert_admin_account"] = "SELECT keen_credit_open_account($1, true)"


async def upsert_super_admin(db: KeenDatabase, email: str, password: str) -> User:
    """Create or update the seed's super-admin and their unlimited credit account. Idempotent."""
    new = build(
        UserCreate,
        email=email,
        username=SUPER_ADMIN["username"],
        password=password,
        display_name=SUPER_ADMIN["display_name"],
    )
    password_hash = await db.users.hash_password(new.password.get_secret_value())
    async with db.system_transaction() as conn:
        row = await conn.fetchrow(
            SQL["upsert_super_admin"],
            new.email,
            new.username,
            password_hash,
            new.display_name,
            SUPER_ADMIN["role"],
            SUPER_ADMIN["admin_privileges"],
        )
        await conn.execute(SQL["upsert_admin_account"], row["id"])
    return user_from_row(row)
