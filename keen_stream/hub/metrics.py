"""Prometheus metrics for one hub node, read from plain counters at scrape time.

Counters on the fan-out hot path are plain integers (a prometheus_client Counter takes a lock
per increment); this collector turns them into metric families when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from keen_stream.hub.service import HubService
    from keen_stream.hub.transport import ConnectionGuard


class HubCollector:
    def __init__(self, service: HubService, guard: ConnectionGuard | None = None) -> None:
        self._service = service
        self._guard = guard

    def collect(self) -> Iterator[Metric]:
        service = self._service
        stats = service.stats
        listener = service.listener
        yield GaugeMetricFamily(
            "keen_hub_connections", "Open WebSocket connections", value=len(service.fanout.clients)
        )
        yield GaugeMetricFamily(
            "keen_hub_subscriptions",
            "Connections with an active subscription",
            value=service.fanout.subscription_count,
        )
        counters = {
            "keen_hub_connections_opened": (
                "Connections that authenticated",
                stats.connections_total,
            ),
            "keen_hub_events_received": ("Events read from the outbox", stats.events_received),
            "keen_hub_events_delivered": (
                "Event frames written to clients",
                stats.events_delivered,
            ),
            "keen_hub_events_dropped": (
                "Event frames not delivered (client closing or too slow)",
                stats.events_dropped,
            ),
            "keen_hub_events_replayed": ("Event frames sent by since-replays", stats.replayed),
            "keen_hub_slow_consumers_closed": (
                "Clients closed for falling behind (4008)",
                stats.slow_consumers_closed,
            ),
            "keen_hub_frames_refused": (
                "Client frames refused (invalid or over the rate limit)",
                stats.frames_refused,
            ),
            "keen_hub_auth_failures": (
                "Connections closed before authenticating",
                stats.auth_failures,
            ),
            "keen_hub_listener_reconnects": ("Listener reconnections", listener.reconnects),
            "keen_hub_listener_notifications": ("Wake-up NOTIFYs received", listener.notifications),
            "keen_hub_listener_reads": ("Outbox tail reads (one round trip each)", listener.reads),
            "keen_hub_maintenance_errors": ("Failed maintenance jobs", service.maintenance_errors),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily(
            "keen_hub_listener_connected",
            "1 if the listener has its connection",
            value=int(listener.connected),
        )
        yield GaugeMetricFamily(
            "keen_hub_listener_lag_seconds",
            "From the last delivered event's transaction start to its release",
            value=listener.lag,
        )
        if self._guard is not None:
            yield from _socket_metrics(self._guard)


def _socket_metrics(guard: ConnectionGuard) -> Iterator[Metric]:
    stats = guard.stats
    yield GaugeMetricFamily(
        "keen_hub_sockets", "Open sockets (HTTP and WebSocket, any state)", value=guard.open
    )
    yield GaugeMetricFamily(
        "keen_hub_sockets_unauthenticated",
        "Open sockets not authenticated (yet)",
        value=guard.unauthenticated,
    )
    refused = CounterMetricFamily(
        "keen_hub_sockets_refused",
        "Sockets closed at accept for being over a cap (address, total, unauthenticated)",
        labels=["cap"],
    )
    for cap, count in stats.refused.items():
        refused.add_metric([cap], count)
    yield refused
    counters = {
        "keen_hub_handshake_timeouts": (
            "Connections cut for not sending a complete HTTP request in time",
            stats.handshake_timeouts,
        ),
        "keen_hub_keepalive_timeouts": (
            "Authenticated clients that stopped answering pings (closed 4008)",
            stats.keepalive_timeouts,
        ),
        "keen_hub_sockets_cut": (
            "Closing sockets aborted because the peer did not take the rest in time",
            stats.cut,
        ),
    }
    for name, (doc, value) in counters.items():
        yield CounterMetricFamily(name, doc, value=value)


def registry_for(service: HubService, guard: ConnectionGuard | None = None) -> CollectorRegistry:
    """A registry of this node's metrics only (not the process-global one: tests run many)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(service, guard))
    return registry
