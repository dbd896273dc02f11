"""A TCP relay for stream tests: forwards the migration stream to the target, flipping one byte of it."""

from __future__ import annotations

import contextlib
import socket
import threading


class CorruptingRelay:
    """Listens on ``port`` (any free one), forwards to ``target_port`` and flips ``mask`` in the byte at
    ``offset`` of the stream (a byte inside a page frame); the target's answers go back unchanged."""

    def __init__(self, target_port: int, *, offset: int, mask: int = 0x01) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target_port, self.offset, self.mask = target_port, offset, mask
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        up = socket.create_connection(("127.0.0.1", self.target_port))
        threading.Thread(target=self._back, args=(up, conn), daemon=True).start()
        seen = 0
        try:
            while data := conn.recv(65536):
                buf = bytearray(data)
                if seen <= self.offset < seen + len(buf):
                    buf[self.offset - seen] ^= self.mask
                seen += len(buf)
                up.sendall(buf)
        except OSError:
            pass
        up.close()
        conn.close()

    @staticmethod
    def _back(up: socket.socket, conn: socket.socket) -> None:
        try:
            while data := up.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class _ForwardThenRelay:
    """Listens on any free port and forwards the first connection to ``target_port`` until ``after``
    bytes have passed, then ``_then(conn, up)`` decides what the network does next."""

    def __init__(self, target_port: int, *, after: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target_port, self.after = target_port, after
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        up = socket.create_connection(("127.0.0.1", self.target_port))
        threading.Thread(target=CorruptingRelay._back, args=(up, conn), daemon=True).start()
        seen = 0
        try:
            while seen < self.after and (data := conn.recv(65536)):
                up.sendall(data)
                seen += len(data)
        except OSError:
            if not self._cut_on_error:
                return
        self._then(conn, up)

    _cut_on_error = False

    def _then(self, conn: socket.socket, up: socket.socket) -> None:
        raise NotImplementedError


class StallingRelay(_ForwardThenRelay):
    """Forwards ``after`` bytes, then stops forwarding without closing anything: a network that silently
    drops everything from there."""

    def __init__(self, target_port: int, *, after: int) -> None:
        self.stalled = threading.Event()
        super().__init__(target_port, after=after)

    def _then(self, conn: socket.socket, up: socket.socket) -> None:
        self.stalled.set()  # from here nothing is read: the sender's window fills and its sends stall
        self._keep = (conn, up)


class CuttingRelay(_ForwardThenRelay):
    """Forwards ``after`` bytes, then closes both connections: a channel cut in the middle of a round."""

    _cut_on_error = True

    def __init__(self, target_port: int, *, after: int) -> None:
        self.cut = threading.Event()
        super().__init__(target_port, after=after)

    def _then(self, conn: socket.socket, up: socket.socket) -> None:
        self.cut.set()
        for sock in (conn, up):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
