"""Auth tokens: issued once in plaintext, stored only as a SHA-256 hash.

Tokens are 256 random bits, so a fast hash is enough: there is nothing to brute-force, and a
slow password hash would only slow down every WebSocket handshake. The prefix (``ks_api_``,
``ks_ref_``, ``ks_ses_``) lets people and secret scanners recognise a leaked keen token.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

import asyncpg
from pydantic import SecretStr

from keen_stream.dal.models.users import AuthToken, IPAddress, IssuedToken, TokenInfo, TokenType
from keen_stream.dal.validation import parse_ip, parse_text, parse_uuid
from keen_stream.errors import (
    AccountInactive,
    InvalidInput,
    InvalidToken,
    NotFound,
    TokenExpired,
    TokenRevoked,
    TokenScopeError,
)

if TYPE_CHECKING:
    from keen_stream.dal.database import KeenDatabase

PREFIXES: Final[dict[str, str]] = {
    "api_key": "ks_api_",
    "jwt_refresh": "ks_ref_",
    "session": "ks_ses_",
}
DEFAULT_TTL: Final[dict[str, timedelta | None]] = {
    "session": timedelta(hours=24),
    "jwt_refresh": timedelta(days=30),
    "api_key": None,
}
_TOKEN_BYTES: Final = 32  # 256 bits
_MAX_TOKEN_LENGTH: Final = 128
_MAX_SCOPES: Final = 64
_MAX_TTL: Final = timedelta(days=3650)

COLUMNS: Final = (
    "id, user_id, token_type, token_name, scopes, expires_at, last_used_at, usage_count, "
    "created_ip, last_used_ip, user_agent, is_active, revoked_at, rate_limit_per_hour, "
    "bypass_limits, created_at"
)

SQL: Final = {
    # bypass_limits follows the owner's admin status: the auth_tokens_guard trigger sets it.
    "insert": f"""
        INSERT INTO auth_tokens (user_id, token_type, token_hash, token_name, scopes, expires_at,
                                 created_ip, user_agent)
        VALUES ($1, $2, $3, $4, $5, now() + $6::interval, $7, $8)
        RETURNING {COLUMNS}""",
    "authenticate": "SELECT * FROM keen_token_authenticate($1, $2, $3)",
    "revoke": f"""
        UPDATE auth_tokens SET is_active = false, revoked_at = coalesce(revoked_at, now())
        WHERE id = $1 AND user_id = $2 RETURNING {COLUMNS}""",
    "list": f"""
        SELECT {COLUMNS} FROM auth_tokens
        WHERE user_id = $1 AND ($2 OR (is_active AND (expires_at IS NULL OR expires_at > now())))
        ORDER BY created_at DESC, id""",
}

_STATUS_ERRORS: Final = {
    "unknown": InvalidToken,
    "revoked": TokenRevoked,
    "expired": TokenExpired,
    "inactive": AccountInactive,
}

_UNSET: Any = object()


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(token_type: str) -> str:
    return PREFIXES[token_type] + secrets.token_urlsafe(_TOKEN_BYTES)


def looks_like_token(token: object) -> bool:
    """Cheap shape check, so garbage never reaches the database."""
    return (
        isinstance(token, str)
        and len(token) <= _MAX_TOKEN_LENGTH
        and any(token.startswith(p) for p in PREFIXES.values())
        and token.isascii()
    )


def token_from_row(row: asyncpg.Record) -> AuthToken:
    return AuthToken.model_validate(dict(row))


class TokenDAO:
    """``db.tokens``: issue, validate, revoke, list."""

    def __init__(self, db: KeenDatabase) -> None:
        self._db = db

    async def issue(
        self,
        user_id: uuid.UUID | str,
        token_type: TokenType,
        *,
        name: str | None = None,
        scopes: Iterable[str] = (),
        expires_in: timedelta | None = _UNSET,
        ip: IPAddress | str | None = None,
        user_agent: str | None = None,
        actor_id: uuid.UUID | str | None = None,
    ) -> IssuedToken:
        """Create a token; the plaintext is in the result and nowhere else, ever.

        ``expires_in`` defaults per type (session 24 h, refresh 30 days, API key never);
        pass None for a token that never expires.
        """
        if token_type not in PREFIXES:
            raise InvalidInput(f"unknown token type {token_type!r}", field="token_type")
        scope_list = _check_scopes(scopes)
        name = parse_text(name, "name", max_length=255, required=False)
        if user_agent is not None:
            # A header value: keep what fits, drop what PostgreSQL text cannot hold.
            user_agent = str(user_agent).replace("\x00", "")[:1024]
        ttl = DEFAULT_TTL[token_type] if expires_in is _UNSET else expires_in
        if ttl is not None and (
            not isinstance(ttl, timedelta) or not timedelta(0) < ttl <= _MAX_TTL
        ):
            raise InvalidInput(
                "expires_in must be a positive timedelta of at most ten years", field="expires_in"
            )
        uid = parse_uuid(user_id, "user_id")
        token = new_token(token_type)
        async with self._db.user_transaction(actor_id or uid) as conn:
            row = await conn.fetchrow(
                SQL["insert"],
                uid,
                token_type,
                hash_token(token),
                name,
                scope_list,
                ttl,
                parse_ip(ip),
                user_agent,
            )
        return IssuedToken(token=SecretStr(token), record=token_from_row(row))

    async def validate(
        self,
        token: str,
        *,
        scopes: Iterable[str] = (),
        ip: IPAddress | str | None = None,
        touch: bool = True,
    ) -> TokenInfo:
        """Who ``token`` belongs to, if it is active, unexpired, of an active user and carries
        every scope in ``scopes`` (a token scoped ``*`` carries all). ``touch`` records the use
        (``usage_count``, ``last_used_at``, ``last_used_ip``) in the same round trip.
        """
        required = _check_scopes(scopes)
        if not looks_like_token(token):
            raise InvalidToken()
        async with self._db.anonymous_transaction() as conn:
            row = await conn.fetchrow(SQL["authenticate"], hash_token(token), parse_ip(ip), touch)
        info = token_info(row)
        require_scopes(info.scopes, required)
        return info

    async def revoke(
        self,
        user_id: uuid.UUID | str,
        token_id: uuid.UUID | str,
        *,
        actor_id: uuid.UUID | str | None = None,
    ) -> AuthToken:
        """Deactivate a token (idempotent). NotFound if it is not this user's (or not visible)."""
        uid = parse_uuid(user_id, "user_id")
        tid = parse_uuid(token_id, "token_id")
        async with self._db.user_transaction(actor_id or uid) as conn:
            row = await conn.fetchrow(SQL["revoke"], tid, uid)
        if row is None:
            raise NotFound("no such token")
        return token_from_row(row)

    async def list(
        self,
        user_id: uuid.UUID | str,
        *,
        include_inactive: bool = False,
        actor_id: uuid.UUID | str | None = None,
    ) -> list[AuthToken]:
        """The user's tokens, newest first; by default only usable ones."""
        uid = parse_uuid(user_id, "user_id")
        async with self._db.user_transaction(actor_id or uid) as conn:
            rows = await conn.fetch(SQL["list"], uid, include_inactive)
        return [token_from_row(r) for r in rows]


def token_info(row: asyncpg.Record) -> TokenInfo:
    """What a row of keen_token_authenticate (or a function answering like it) proves, or the
    error its status means."""
    check_status(row["status"])
    return TokenInfo(
        token_id=row["token_id"],
        user_id=row["user_id"],
        token_type=row["token_type"],
        scopes=list(row["scopes"]),
        expires_at=row["expires_at"],
        is_admin=row["is_admin"],
        bypass_limits=row["bypass_limits"],
    )


def check_status(status: str) -> None:
    """The error a keen_token_authenticate-style ``status`` means; nothing for ``ok``."""
    if status != "ok":
        raise _STATUS_ERRORS.get(status, InvalidToken)()


def require_scopes(granted: Iterable[str], required: Iterable[str]) -> None:
    """TokenScopeError unless ``granted`` carries every scope in ``required`` (``*``: all)."""
    have = set(granted)
    missing = [s for s in required if s not in have and "*" not in have]
    if missing:
        raise TokenScopeError(missing=missing)


def _check_scopes(scopes: Iterable[str]) -> list[str]:
    if isinstance(scopes, str):
        raise InvalidInput("scopes must be a list of strings", field="scopes")
    out = list(scopes)
    if len(out) > _MAX_SCOPES or not all(
        isinstance(s, str) and 0 < len(s) <= 64 and s.isprintable() for s in out
    ):
        raise InvalidInput("invalid scopes", field="scopes")
    return out
