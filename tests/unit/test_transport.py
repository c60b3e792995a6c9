"""The socket guard's bookkeeping without sockets, and the open-file limit at ``serve``."""

from __future__ import annotations

import logging
import resource

import pytest

from keen_stream.hub.cli import raise_open_file_limit
from keen_stream.hub.transport import ConnectionGuard, address_key
from tests.conftest import make_settings


def guard(**caps: int) -> ConnectionGuard:
    values = {"max_connections": 0, "max_per_address": 0, "max_unauthenticated": 0, **caps}
    return ConnectionGuard(**values, handshake_timeout=1.0, close_grace=1.0)


def test_per_address_cap_counts_each_address_and_frees_slots_on_release() -> None:
    g = guard(max_per_address=2)
    a1, a2, a3, b1 = object(), object(), object(), object()
    assert g.admit(a1, ("10.0.0.1", 1)) and g.admit(a2, ("10.0.0.1", 2))
    assert not g.admit(a3, ("10.0.0.1", 3))
    assert g.admit(b1, ("10.0.0.2", 1))
    assert g.stats.refused == {"address": 1, "total": 0, "unauthenticated": 0}
    g.release(a1)
    g.release(a1)  # idempotent: both protocols of an upgraded socket release it
    assert g.admit(a3, ("10.0.0.1", 3))
    assert g.open == 3


def test_authenticated_sockets_leave_the_stranger_cap_but_not_the_overall_one() -> None:
    g = guard(max_connections=3, max_unauthenticated=1)
    first, second, third, fourth = object(), object(), object(), object()
    assert g.admit(first, ("10.0.0.1", 1))
    assert not g.admit(second, ("10.0.0.2", 1))  # one stranger at a time
    g.authenticated(first)
    g.authenticated(first)
    assert g.unauthenticated == 0
    assert g.admit(second, ("10.0.0.2", 1))
    g.authenticated(second)
    assert g.admit(third, ("10.0.0.3", 1))
    assert not g.admit(fourth, ("10.0.0.4", 1))  # 3 open: the overall cap
    assert g.stats.refused == {"address": 0, "total": 1, "unauthenticated": 1}
    g.release(third)  # a stranger leaving frees both counts
    g.release(second)
    assert (g.open, g.unauthenticated) == (1, 0)


def test_a_peer_without_an_address_meets_only_the_overall_caps() -> None:
    g = guard(max_per_address=1, max_connections=2)
    assert g.admit(object(), None) and g.admit(object(), None)
    assert not g.admit(object(), None)
    assert g.stats.refused["total"] == 1


def test_caps_of_zero_are_off() -> None:
    g = guard()
    assert all(g.admit(object(), ("10.0.0.1", i)) for i in range(1000))


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),  # same /64: same budget
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not-an-ip", "not-an-ip"),
    ],
)
def test_addresses_are_counted_per_ipv4_address_and_per_ipv6_64(host: str, key: str) -> None:
    assert address_key(host) == key


def test_serve_raises_the_soft_open_file_limit_to_the_hard_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 2048:
        pytest.skip("needs a finite hard limit with room below it")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        settings = make_settings("postgresql:///unused", hub_max_connections=hard)
        with caplog.at_level(logging.INFO, logger="keen_stream.hub.cli"):
            assert raise_open_file_limit(settings) == (1024, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        assert f"from 1024 to {hard}" in caplog.text
        # A cap the limit cannot hold is worth a warning.
        assert "does not fit" in caplog.text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
