"""The one home of plain sockets: every listening or dialling socket of confplan is made here, tuned the
same way (keepalive and TCP_USER_TIMEOUT on TCP, so a dead peer surfaces in seconds), and fails with a
message that says what, where and what to do. TLS (``transport.tls``) and the page stream build on these.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from confplan.errors import ConfplanError, EnvironmentProblem
from confplan.transport import tcp


def listen_tcp(host: str, port: int, *, what: str) -> socket.socket:
    """A TCP listener on ``host:port`` (port 0: any free one) for ``what`` ("the agent's control port")."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host, port), family=family, backlog=16)
    except socket.gaierror as err:
        raise ConfplanError(
            f"{what}: {host!r} is not an address of this host ({err.strerror})",
            hint="give an IP address of this host, or 0.0.0.0 for all",
        ) from None
    except OSError as err:
        raise _listen_error(err, host, port, what) from None
    return listener


def _listen_error(err: OSError, host: str, port: int, what: str) -> ConfplanError:
    where = f"{host}:{port}"
    if err.errno == errno.EADDRINUSE:
        return EnvironmentProblem(
            f"{what}: port {port} on {host} is already taken by another process",
            hint=f"stop that process (`ss -ltnp 'sport = :{port}'` shows it) or pick another port",
        )
    if err.errno == errno.EADDRNOTAVAIL:
        return EnvironmentProblem(
            f"{what}: {host} is not an address of this host",
            hint="give an IP address this host has (`ip -brief address`), or 0.0.0.0 for all",
        )
    if err.errno is not None and err.errno < 0:  # getaddrinfo's EAI_* codes (create_server re-raises them)
        return EnvironmentProblem(
            f"{what}: {host!r} is not a name or address this host can resolve "
            f"({str(err.strerror).split(' (while')[0]})",
            hint="give an IP address of this host (`ip -brief address`), or 0.0.0.0 for all",
        )
    if err.errno == errno.EACCES:
        return EnvironmentProblem(f"{what}: no permission to listen on {where}", hint="use a port above 1023")
    return EnvironmentProblem(f"{what}: cannot listen on {where}: {err.strerror or err}")


def dial_tcp(host: str, port: int, *, timeout: float, what: str) -> socket.socket:
    """A tuned TCP connection to ``host:port`` (``what`` names the peer in the error), blocking after."""
    try:
        sock = tcp.connect(host, port, timeout)
    except OSError as err:
        raise ConfplanError(
            f"cannot reach {what} at {host}:{port}: {err.strerror or err}",
            hint="check that it listens there and that the port is reachable from this host",
        ) from None
    sock.settimeout(None)
    return sock


def tune_accepted(sock: socket.socket) -> socket.socket:
    """An accepted TCP connection, tuned like the dialled ones and blocking."""
    tcp.tune(sock)
    sock.settimeout(None)
    return sock


def listen_unix(path: Path, *, what: str) -> socket.socket:
    """Listen on the unix socket ``path`` (mode 0600 from the start, in a 0700 folder); a stale socket
    file (no one serving it) is replaced, a live one is refused."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists():
        try:
            dial_unix(path).close()
        except OSError:
            path.unlink()
        else:
            raise EnvironmentProblem(
                f"{what}: {path} is already served by another process",
                hint="stop it first (`confplan stop PLAN`), or use another checkpoint folder",
            )
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # no window in which another user could connect before the chmod
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    listener.listen(8)
    return listener


def dial_unix(path: Path, timeout: float | None = None) -> socket.socket:
    """Connect to the unix socket ``path`` (OSError when nothing serves it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock
