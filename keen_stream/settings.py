"""Configuration: one frozen object, read once from ``KEEN_*`` environment variables."""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_embedded_dir() -> Path:
    return Path.home() / ".keen_stream" / "pgdata"


class Settings(BaseSettings):
    """Every knob keen_stream reads. Defaults suit a 2-core box; see README's table."""

    model_config = SettingsConfigDict(env_prefix="KEEN_", frozen=True, extra="ignore")

    # --- database --------------------------------------------------------------------------
    database_url: str | None = Field(
        default=None,
        description="PostgreSQL DSN. Unset: start the embedded PostgreSQL in embedded_dir.",
    )
    embedded_dir: Path = Field(default_factory=_default_embedded_dir)
    embedded_database: str = "keen"
    # The seed sized its pool for a big box (min 10, max 100). PostgreSQL on 2 cores saturates
    # with a handful of active backends; more connections only add context switches.
    pool_min_size: int = Field(default=2, ge=0)
    pool_max_size: int = Field(default=10, ge=1)
    pool_acquire_timeout: float = Field(default=10.0, gt=0)
    pool_max_inactive_lifetime: float = Field(default=600.0, ge=0)  # the seed's idle 10 min
    connect_timeout: float = Field(default=10.0, gt=0)  # the seed's 10 s
    # The seed's 5 minutes would let one runaway query hold a pooled connection for that long.
    statement_timeout_ms: int = Field(default=30_000, ge=0)
    auto_migrate: bool | None = Field(
        default=None,
        description="Run migrations at startup. Default: only for the embedded database.",
    )

    # --- money -----------------------------------------------------------------------------
    credit_markup: Decimal = Field(default=Decimal("5.00"), gt=0, max_digits=4, decimal_places=2)

    # --- passwords (argon2id; OWASP's minimum is 19 MiB, 2 passes) --------------------------
    argon2_time_cost: int = Field(default=3, ge=1)
    argon2_memory_kib: int = Field(default=65536, ge=1024)
    argon2_parallelism: int = Field(default=2, ge=1)

    # --- admin -----------------------------------------------------------------------------
    admin_email: str = "ahiya.butman@gmail.com"
    admin_password: SecretStr | None = None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
