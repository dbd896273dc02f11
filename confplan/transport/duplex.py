"""A TLS socket one thread may read while others write: what the control RPC does with every connection.

OpenSSL forbids calling SSL_read and SSL_write on one SSL object from two threads at once (openssl#20446),
and CPython 3.11 releases the GIL around both, so a plain ``ssl.SSLSocket`` shared by the RPC client's
reader thread and its callers can corrupt the TLS state or crash (cpython#151508). This socket makes each
OpenSSL call under a lock, on a non-blocking file descriptor, and waits for the network outside the lock
(the pattern asyncio uses with ``SSLObject``): a reader parked in ``recv`` never holds up a writer.

The contexts in ``confplan.transport.tls`` make every socket this class (``SSLContext.sslsocket_class``);
``start_duplex`` switches it on once the handshake is done. Before that it is a plain ``SSLSocket``.
"""

from __future__ import annotations

import errno
import select
import ssl
import threading
import time
from typing import Any

# Longest single wait for the network. A TLS 1.3 write never reads from the socket, so a wake-up cannot
# be missed; the bound is insurance that costs one poll a second on an idle connection.
_MAX_WAIT = 1.0


class DuplexSSLSocket(ssl.SSLSocket):
    """An ``SSLSocket`` whose reads and writes may come from different threads."""

    _duplex = False
    _user_timeout: float | None = None
    _io_lock: threading.Lock
    _sslobj: Any  # SSLSocket's own, None once shut down (not in typeshed)

    def start_duplex(self, timeout: float | None = None) -> None:
        """From now on: OpenSSL calls under a lock, waits outside it; ``timeout`` as for ``settimeout``."""
        self._io_lock = threading.Lock()
        self._user_timeout = timeout
        super().settimeout(0.0)  # OpenSSL must never block while the lock is held
        self._duplex = True

    # -- timeouts: what the caller asked for, kept apart from the descriptor's non-blocking mode ---------

    def settimeout(self, value: float | None) -> None:
        if not self._duplex:
            super().settimeout(value)
            return
        if value is not None and value < 0:
            raise ValueError("Timeout value out of range")
        self._user_timeout = value

    def gettimeout(self) -> float | None:
        return self._user_timeout if self._duplex else super().gettimeout()

    def setblocking(self, flag: bool) -> None:
        self.settimeout(None if flag else 0.0)

    # -- the OpenSSL calls -------------------------------------------------------------------------------

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        if not self._duplex:
            return super().read(len, buffer)

        def call() -> Any:
            if self._sslobj is None:  # shut down by another thread while this one waited: end of stream
                return b"" if buffer is None else 0
            return super(DuplexSSLSocket, self).read(len, buffer)

        return self._retry(call)

    def send(self, data: Any, flags: int = 0) -> int:
        # SSLSocket.sendall loops over send; Python lets OpenSSL take the rest of a moved buffer.
        if not self._duplex:
            return super().send(data, flags)

        def call() -> Any:
            if self._sslobj is None:
                raise BrokenPipeError(errno.EPIPE, "the TLS socket was shut down")
            return super(DuplexSSLSocket, self).send(data, flags)

        sent: int = self._retry(call)
        return sent

    def write(self, data: Any) -> int:
        return self.send(data)

    def shutdown(self, how: int) -> None:
        if not self._duplex:
            super().shutdown(how)
            return
        with self._io_lock:
            super().shutdown(how)

    def _real_close(self) -> None:
        if not self._duplex:
            super()._real_close()  # type: ignore[misc]
            return
        with self._io_lock:
            super()._real_close()  # type: ignore[misc]

    def _retry(self, call: Any) -> Any:
        """``call`` under the lock until OpenSSL stops asking to wait; the waits outside the lock."""
        timeout = self._user_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._io_lock:
                try:
                    return call()
                except ssl.SSLWantReadError:
                    if timeout == 0.0:
                        raise
                    events = select.POLLIN
                except ssl.SSLWantWriteError:
                    if timeout == 0.0:
                        raise
                    events = select.POLLOUT
            self._wait(events, deadline)

    def _wait(self, events: int, deadline: float | None) -> None:
        wait = _MAX_WAIT if deadline is None else min(_MAX_WAIT, deadline - time.monotonic())
        if wait <= 0:
            raise TimeoutError("timed out")
        fd = self.fileno()
        if fd < 0:
            raise OSError(errno.EBADF, "the TLS socket was closed")
        poller = select.poll()
        poller.register(fd, events | select.POLLERR | select.POLLHUP)
        poller.poll(wait * 1000)
