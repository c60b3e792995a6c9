"""Users and auth tokens."""

from __future__ import annotations

import uuid
from datetime import datetime
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Literal, TypedDict
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, EmailStr, Field, SecretStr, field_validator

Role = Literal["user", "admin", "super_admin"]
AccountStatus = Literal["active", "suspended", "deactivated", "pending_verification"]
TokenType = Literal["api_key", "jwt_refresh", "session"]
IPAddress = IPv4Address | IPv6Address

USERNAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{2,63}$"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_timezone(value: str) -> str:
    if len(value) > 50:
        raise ValueError("time zone name too long")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r}") from None
    return value


class UserCreate(_Model):
    """A new account. The password is hashed (argon2id) before it goes anywhere."""

    email: EmailStr = Field(max_length=255)
    username: str = Field(pattern=USERNAME_PATTERN)
    password: SecretStr = Field(min_length=8, max_length=1024)
    display_name: str | None = Field(default=None, max_length=255)
    avatar_url: str | None = Field(default=None, max_length=2048)
    timezone: str = "UTC"
    preferences: dict[str, Any] = Field(default_factory=dict)

    _tz = field_validator("timezone")(_check_timezone)

    @field_validator("password")
    @classmethod
    def _encodable(cls, value: SecretStr) -> SecretStr:
        # JSON can carry a lone surrogate ("\\ud800") that no encoding, argon2's included, takes.
        try:
            value.get_secret_value().encode()
        except UnicodeEncodeError:
            raise ValueError("the password is not valid Unicode") from None
        return value

    @field_validator("email")
    @classmethod
    def _lower_email(cls, value: str) -> str:
        return value.lower()


class UserProfileUpdate(_Model):
    """Fields a user may change on their own row; None leaves a field as it is."""

    display_name: str | None = Field(default=None, max_length=255)
    avatar_url: str | None = Field(default=None, max_length=2048)
    timezone: str | None = None
    preferences: dict[str, Any] | None = None

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str | None) -> str | None:
        return None if value is None else _check_timezone(value)


# The keyword arguments the DAO methods accept in place of a model (``db.users.create(
# email=..., ...)``), typed for the caller's checker. tests/unit/test_models.py keeps each
# the same as its model.
class UserCreateFields(TypedDict, total=False):
    email: str
    username: str
    password: str | SecretStr
    display_name: str | None
    avatar_url: str | None
    timezone: str
    preferences: dict[str, Any]


class UserProfileFields(TypedDict, total=False):
    display_name: str | None
    avatar_url: str | None
    timezone: str | None
    preferences: dict[str, Any] | None


class User(_Model):
    """A user as the DAL returns it: never the password hash or MFA secrets."""

    id: uuid.UUID
    email: str
    username: str
    display_name: str | None
    avatar_url: str | None
    role: Role
    is_admin: bool
    admin_privileges: dict[str, Any]
    email_verified: bool
    account_status: AccountStatus
    mfa_enabled: bool
    timezone: str
    preferences: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    last_login_at: datetime | None
    last_login_ip: IPAddress | None


class AuthToken(_Model):
    """A stored token's metadata (the token itself is never stored)."""

    id: uuid.UUID
    user_id: uuid.UUID
    token_type: TokenType
    token_name: str | None
    scopes: list[str]
    expires_at: datetime | None
    last_used_at: datetime | None
    usage_count: int
    created_ip: IPAddress | None
    last_used_ip: IPAddress | None
    user_agent: str | None
    is_active: bool
    revoked_at: datetime | None
    rate_limit_per_hour: int | None
    bypass_limits: bool
    created_at: datetime


class IssuedToken(_Model):
    """Returned once by ``tokens.issue``: the plaintext token and its stored record."""

    token: SecretStr
    record: AuthToken


class TokenInfo(_Model):
    """What a valid token proves: who, with which scopes, until when."""

    token_id: uuid.UUID
    user_id: uuid.UUID
    token_type: TokenType
    scopes: list[str]
    expires_at: datetime | None
    is_admin: bool
    bypass_limits: bool
