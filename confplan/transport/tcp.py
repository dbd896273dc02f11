"""TCP settings for control connections: a dead peer surfaces in seconds, not after the kernel's 2 hours.

Keepalive probes an idle connection (the RPC is often silent while a stage runs); TCP_USER_TIMEOUT bounds
how long sent data may stay unacknowledged, and on Linux also ends the keepalive probing (tcp(7)).
"""

from __future__ import annotations

import socket

KEEPALIVE_IDLE = 5  # seconds of silence before the first probe
KEEPALIVE_INTERVAL = 2  # seconds between probes
KEEPALIVE_COUNT = 4  # unanswered probes before the connection is dropped
USER_TIMEOUT_MS = 15_000  # sent data unacknowledged this long: the peer is gone


def tune(sock: socket.socket) -> None:
    """Turn on keepalive and TCP_USER_TIMEOUT on a TCP socket (a no-op for other families)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # RPC lines are small and awaited


def connect(host: str, port: int, timeout: float) -> socket.socket:
    """A tuned TCP connection to ``host:port``; OSError as ``socket.create_connection`` raises it."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        tune(sock)
    except BaseException:
        sock.close()
        raise
    return sock
