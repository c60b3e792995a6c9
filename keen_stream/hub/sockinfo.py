"""What the kernel says about a TCP socket, for diagnostics (debug logs, test evidence).

When a stream stops moving, the question is which side stopped: the application not writing,
the peer not reading, or TCP itself waiting (a closed receive window, retransmission or
zero-window-probe backoff). ``tcp_state`` answers from Linux's ``TCP_INFO`` and the socket's
queues; elsewhere it returns what it can (possibly nothing). Never on a hot path.
"""

from __future__ import annotations

import socket
import struct
import sys
from typing import Any

# struct tcp_info (include/uapi/linux/tcp.h): (name, offset, format)
_FIELDS = (
    ("state", 0, "B"),
    ("ca_state", 1, "B"),
    ("retransmits", 2, "B"),
    ("probes", 3, "B"),
    ("backoff", 4, "B"),
    ("rto_us", 8, "I"),
    ("snd_mss", 16, "I"),
    ("rcv_mss", 20, "I"),
    ("unacked", 24, "I"),
    ("lost", 32, "I"),
    ("last_data_sent_ms", 44, "I"),
    ("last_data_recv_ms", 52, "I"),
    ("last_ack_recv_ms", 56, "I"),
    ("rcv_ssthresh", 64, "I"),
    ("snd_cwnd", 80, "I"),
    ("rcv_space", 96, "I"),
    ("total_retrans", 100, "I"),
    ("bytes_acked", 120, "Q"),
    ("bytes_received", 128, "Q"),
    ("notsent_bytes", 144, "I"),
    ("rwnd_limited_us", 176, "Q"),
    ("snd_wnd", 228, "I"),
    ("rcv_wnd", 232, "I"),
)
_SIOCINQ = 0x541B  # FIONREAD: received, not read by the application
_SIOCOUTQ = 0x5411  # TIOCOUTQ: written by the application, not acknowledged by the peer


def tcp_state(sock: Any) -> dict[str, Any]:
    """Kernel-side state of ``sock`` (a socket or an object with ``fileno()``)."""
    info: dict[str, Any] = {}
    if not sys.platform.startswith("linux"):
        return info
    try:
        import fcntl

        fd = sock.fileno()
        for name, request in (("kernel_unread", _SIOCINQ), ("kernel_send_queue", _SIOCOUTQ)):
            raw = fcntl.ioctl(fd, request, b"\0" * 4)
            info[name] = struct.unpack("i", raw)[0]
        # asyncio's and uvloop's socket wrappers both have getsockopt.
        data = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 240)
    except (OSError, ValueError, AttributeError):
        return info
    for name, offset, fmt in _FIELDS:
        size = struct.calcsize(fmt)
        if offset + size <= len(data):
            info[name] = struct.unpack_from(fmt, data, offset)[0]
    return info
