"""Configuration: one frozen object, read once from ``KEEN_*`` environment variables."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Final, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator
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
    # asyncpg replaces a connection after this many queries (its default): under load a pooled
    # connection, and its statement cache, is renewed every few tens of seconds.
    pool_max_queries: int = Field(default=50_000, ge=1)
    connect_timeout: float = Field(default=10.0, gt=0)  # the seed's 10 s
    # The seed's 5 minutes would let one runaway query hold a pooled connection for that long.
    statement_timeout_ms: int = Field(default=30_000, ge=0)
    auto_migrate: bool | None = Field(
        default=None,
        description="Run migrations at startup. Default: only for the embedded database.",
    )

    # --- money -----------------------------------------------------------------------------
    # The markup is not a setting: it lives in the database (credit_pricing), changed by an admin
    # through db.billing.set_markup or `keen-stream ledger set-markup`, audited (docs/ledger.md).
    # KEEN_CREDIT_MARKUP used to set it; a deployment that still sets it is told so at startup
    # instead of silently charging another price than it configured.
    credit_markup: None = None

    @field_validator("credit_markup", mode="before")
    @classmethod
    def _markup_moved(cls, value: object) -> None:
        if value is not None:
            raise ValueError(
                "KEEN_CREDIT_MARKUP is no longer read: the markup lives in the database"
                " (keen-stream ledger markup / set-markup); when upgrading past migration 0007,"
                " unset it and pass its value once as `keen-stream migrate --markup`"
            )
        return None

    # Deductions from concurrent callers share a transaction when they have to wait anyway
    # (dal/batching.py): at most this many deduction statements run at once per process, and
    # callers arriving meanwhile leave together, up to ledger_batch_max per statement.
    # ledger_batch_max = 1 turns batching off (every deduction its own statement, unlimited).
    ledger_batch_max: int = Field(default=32, ge=1, le=50)
    ledger_max_in_flight: int = Field(default=2, ge=1)

    # --- agent sessions --------------------------------------------------------------------
    max_session_depth: int = Field(default=10, ge=0, le=1000)  # 0 = no sub-agents
    # Seconds without progress after which the sweep marks a running session timed_out.
    session_idle_timeout: float = Field(default=1800.0, gt=0)

    # --- passwords (argon2id; OWASP's minimum is 19 MiB, 2 passes) --------------------------
    argon2_time_cost: int = Field(default=3, ge=1)
    argon2_memory_kib: int = Field(default=65536, ge=1024)
    argon2_parallelism: int = Field(default=2, ge=1)

    # --- event stream and hub (docs/architecture.md explains each) --------------------------
    event_retention: float = Field(default=86_400.0, gt=0)  # seconds events stay resumable
    event_prune_interval: float = Field(default=60.0, gt=0)
    # Maintenance the hub runs on every node (each job is idempotent, so several nodes may).
    session_sweep_interval: float = Field(default=60.0, gt=0)
    hold_sweep_interval: float = Field(default=15.0, gt=0)
    dashboard_refresh_interval: float = Field(default=300.0, gt=0)  # the seed's 5 minutes
    # Rolls newly ended hours and hours written to after their roll (docs/performance.md).
    # Analytics stay exact in between; a longer interval only leaves more to read live.
    analytics_rollup_interval: float = Field(default=60.0, gt=0)
    # The DAL's after-commit wake-up: at most one NOTIFY per this many seconds per process.
    event_notify_interval: float = Field(default=0.002, ge=0)
    listener_fallback_poll: float = Field(default=1.0, gt=0)  # covers writes made outside the DAL
    listener_retry_poll: float = Field(default=0.002, gt=0)  # first re-read while rows wait
    listener_probe_interval: float = Field(default=5.0, gt=0)
    listener_probe_timeout: float = Field(default=3.0, gt=0)
    listener_backoff_max: float = Field(default=10.0, gt=0)
    hub_host: str = "127.0.0.1"
    hub_port: int = Field(default=8765, ge=0, le=65535)
    # `serve`'s log lines: "text" for people, "json" (one object a line) for log collectors.
    log_format: Literal["text", "json"] = "text"
    hub_required_scopes: tuple[str, ...] = ("stream",)
    hub_auth_timeout: float = Field(default=10.0, gt=0)
    hub_token_recheck_interval: float = Field(default=30.0, gt=0)
    hub_flush_interval: float = Field(default=5.0, gt=0)  # connection rows, pings: one batch
    hub_heartbeat_interval: float = Field(default=5.0, gt=0)
    hub_node_stale_after: float = Field(default=30.0, gt=0)
    hub_max_frame_bytes: int = Field(default=65_536, ge=1024)
    hub_send_buffer_limit: int = Field(default=1_048_576, ge=1024)  # bytes queued per client
    hub_pending_limit: int = Field(default=10_000, ge=10)  # live events held during a replay
    hub_rate_limit: float = Field(default=20.0, gt=0)  # client frames per second
    hub_rate_burst: int = Field(default=40, ge=1)
    hub_flood_close_after: int = Field(default=100, ge=1)  # refused frames before closing
    hub_max_session_filters: int = Field(default=1000, ge=1)
    hub_ws_ping_interval: float = Field(default=20.0, gt=0)
    hub_close_timeout: float = Field(default=5.0, gt=0)  # then a stuck client's socket is cut
    # Sockets (docs/architecture.md, "Hostile clients"). Every socket is a file descriptor and
    # ~26 KB of memory; a stranger must not be able to hold them. 0 turns a cap off.
    hub_handshake_timeout: float = Field(default=10.0, gt=0)  # to send a complete HTTP request
    hub_max_connections: int = Field(default=10_000, ge=0)
    # Behind a load balancer every client has the balancer's address: raise it or turn it off.
    hub_max_connections_per_address: int = Field(default=256, ge=0)
    # Sockets not (yet) authenticated, so strangers cannot take the whole budget.
    hub_max_unauthenticated: int = Field(default=1_000, ge=0)
    # Server-sent events (GET /events; docs/protocol.md, section 11).
    hub_sse_heartbeat_interval: float = Field(default=15.0, gt=0)  # a `: ping` comment
    hub_sse_retry: float = Field(default=2.0, gt=0)  # seconds; EventSource's reconnect delay
    hub_ticket_ttl: float = Field(default=30.0, gt=0, le=300)  # a ticket is redeemed at once
    # The cookie a redeemed ticket leaves for the browser's reconnects (never past the token).
    hub_stream_credential_ttl: float = Field(default=43_200.0, gt=0)

    # --- admin -----------------------------------------------------------------------------
    admin_email: str = "ahiya.butman@gmail.com"
    admin_password: SecretStr | None = None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()


def with_database(dsn: str, database: str) -> str:
    """``dsn`` pointing at ``database`` instead (host, socket, user and options kept)."""
    parts = urlsplit(dsn)
    # Built by hand: urlunsplit drops the "//" of an empty host (postgresql:///db, a socket).
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc}/{database}{query}"


#: ``user:password@`` at the start of a URL's authority. Greedy up to the last "@": a password
#: with "/", "?", "#" or "@" left unencoded is hidden whole (at worst more than the password is).
_USERINFO: Final = re.compile(r"^(?P<user>[^:/?#@]*):.*@", re.DOTALL)
#: ``key=value`` in a URL's query.
_QUERY_ITEM: Final = re.compile(r"(?P<lead>[?&])(?P<key>[^=&#]*)=[^&#]*")
#: ``password=value`` in a keyword/value DSN: quoted (backslash escapes), unterminated, or bare.
_KEYWORD_SECRET: Final = re.compile(
    r"(?i)\b(?P<key>(?:ssl)?password)\s*=\s*(?:'(?:[^'\\]|\\.)*'|'.*|\S*)", re.DOTALL
)
#: Query options that carry a secret (the driver decodes keys, so they are compared decoded).
_SECRET_OPTIONS: Final = frozenset({"password", "sslpassword"})


def redact_dsn(dsn: str) -> str:
    """``dsn`` fit for a log line or an error message: every password hidden (in the URL's
    user info, a ``password=`` or ``sslpassword=`` option, or a keyword/value DSN's)."""
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        return _KEYWORD_SECRET.sub(lambda m: f"{m['key']}=***", dsn)
    rest = _USERINFO.sub(lambda m: f"{m['user']}:***@", rest, count=1)

    def query_item(m: re.Match[str]) -> str:
        secret = unquote(m["key"]).strip().lower() in _SECRET_OPTIONS
        return f"{m['lead']}{m['key']}=***" if secret else m[0]

    return f"{scheme}://{_QUERY_ITEM.sub(query_item, rest)}"
