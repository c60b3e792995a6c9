"""WebSocket connection records and hub nodes (the hub's bookkeeping in PostgreSQL)."""

from __future__ import annotations

import uuid
from datetime import datetime
from ipaddress import IPv4Address, IPv6Address
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SubscriptionScope = Literal["none", "mine", "sessions", "all"]
ConnectionStatus = Literal["active", "disconnected", "timed_out", "reaped"]
NodeStatus = Literal["running", "stopped", "dead"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ConnectionOpened(_Model):
    """A connection that authenticated (written in the next batch)."""

    connection_id: str = Field(min_length=1, max_length=255)
    user_id: uuid.UUID
    token_id: uuid.UUID | None
    client_ip: IPv4Address | IPv6Address
    user_agent: str | None = Field(default=None, max_length=1024)
    client_type: str = Field(min_length=1, max_length=50)
    admin_connection: bool
    can_view_all_sessions: bool
    hub_node_id: uuid.UUID
    connected_at: datetime


class SubscriptionChanged(_Model):
    """The connection's current subscription (replaces the stored one)."""

    connection_id: str
    subscription_scope: SubscriptionScope
    subscribed_events: tuple[str, ...]
    session_filters: tuple[uuid.UUID, ...] | None


class ConnectionClosed(_Model):
    connection_id: str
    disconnected_at: datetime
    connection_status: ConnectionStatus
    close_code: int | None
    close_reason: str | None = Field(default=None, max_length=123)


class ConnectionBatch(_Model):
    """Everything a hub node learned since its last flush, written in one transaction."""

    opened: tuple[ConnectionOpened, ...] = ()
    subscriptions: tuple[SubscriptionChanged, ...] = ()
    pings: tuple[tuple[str, datetime], ...] = ()
    closed: tuple[ConnectionClosed, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.opened or self.subscriptions or self.pings or self.closed)


class ConnectionRecord(_Model):
    id: uuid.UUID
    connection_id: str
    user_id: uuid.UUID
    session_id: uuid.UUID | None
    client_ip: IPv4Address | IPv6Address
    user_agent: str | None
    client_type: str
    connected_at: datetime
    last_ping_at: datetime
    disconnected_at: datetime | None
    subscribed_events: list[str]
    session_filters: list[uuid.UUID] | None
    admin_connection: bool
    can_view_all_sessions: bool
    connection_status: ConnectionStatus
    hub_node_id: uuid.UUID | None
    token_id: uuid.UUID | None
    subscription_scope: SubscriptionScope
    close_code: int | None
    close_reason: str | None


class HubNode(_Model):
    id: uuid.UUID
    hostname: str
    pid: int
    listen_address: str | None
    started_at: datetime
    last_heartbeat_at: datetime
    stopped_at: datetime | None
    status: NodeStatus
