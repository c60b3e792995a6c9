"""Pydantic models returned by (and accepted by) the DAL, one module per area."""

from keen_stream.dal.models.users import (
    AccountStatus,
    AuthToken,
    IssuedToken,
    Role,
    TokenInfo,
    TokenType,
    User,
    UserCreate,
    UserProfileUpdate,
)

__all__ = [
    "AccountStatus",
    "AuthToken",
    "IssuedToken",
    "Role",
    "TokenInfo",
    "TokenType",
    "User",
    "UserCreate",
    "UserProfileUpdate",
]
