"""The serving side of the control channel (a VMM process, later a remote agent).

Handlers take ``(params, call)`` and return a JSON value; ``call.notify`` sends progress events while
they run. Calls on one connection are handled one at a time, in order; each connection has its own thread.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

from confplan.errors import ConfplanError
from confplan.rpc.protocol import (
    BAD_REQUEST,
    FAILED,
    HELLO,
    INTERNAL,
    MAX_MESSAGE,
    NOT_READY,
    PROTOCOL_VERSION,
    TOO_LARGE,
    UNKNOWN_METHOD,
    VERSION_MISMATCH,
    LineReader,
    MessageTooLarge,
    ProtocolError,
    encode,
)

Handler = Callable[[dict[str, Any], "Call"], Any]


class _Sender:
    """Writes whole lines; handlers' events and answers come from different threads."""

    def __init__(self, sock: socket.socket, version: int, limit: int) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self.version = version
        self.limit = limit

    def send(self, message: dict[str, Any]) -> None:
        data = encode({"v": self.version, **message}, self.limit)
        with self._lock:
            self._sock.sendall(data)


class Call:
    """One call being handled: its method name, who calls (as the transport authenticated it, e.g. a TLS
    fingerprint; "" when the transport says nothing) and a way to send events to the caller."""

    def __init__(self, method: str, sender: _Sender, peer: str = "") -> None:
        self.method = method
        self.peer = peer
        self._sender = sender

    def notify(self, event: str, params: dict[str, Any] | None = None) -> None:
        self._sender.send({"event": event, "params": params or {}})


class RpcServer:
    """Dispatches calls to registered handlers. ``name`` is how it introduces itself at hello."""

    def __init__(self, name: str, *, max_message: int = MAX_MESSAGE, version: int = PROTOCOL_VERSION) -> None:
        self.name = name
        self.max_message = max_message
        self.version = version  # only tests speak another version
        self.handlers: dict[str, Handler] = {}

    def register(self, method: str, handler: Handler) -> None:
        if method == HELLO or method in self.handlers:
            raise ValueError(f"RPC method {method!r} is reserved or already registered")
        self.handlers[method] = handler

    def method(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator form of ``register``."""

        def decorate(handler: Handler) -> Handler:
            self.register(name, handler)
            return handler

        return decorate

    def serve_connection(self, sock: socket.socket, peer: str = "") -> None:
        """Serve one connection until the peer hangs up or breaks the protocol; then close it. ``peer``
        names the caller to the handlers (``Call.peer``)."""
        sender = _Sender(sock, self.version, self.max_message)
        reader = LineReader(sock, self.max_message)
        try:
            self._loop(reader, sender, peer)
        except (ConnectionError, BrokenPipeError):
            pass  # the caller went away: nothing left to answer
        finally:
            reader.close()
            sock.close()

    def _loop(self, reader: LineReader, sender: _Sender, peer: str) -> None:
        greeted = False
        while True:
            try:
                message = reader.read()
            except MessageTooLarge as err:
                _send_error(sender, None, TOO_LARGE, err.message)
                return  # the rest of that line is still in the stream: no way to resynchronise
            except ProtocolError as err:
                _send_error(sender, None, BAD_REQUEST, err.message)
                continue
            if message is None:
                return
            if message.get("v") != self.version:
                text = f"{self.name} speaks confplan RPC v{self.version}, the caller v{message.get('v')}"
                _send_error(sender, message.get("id"), VERSION_MISMATCH, text)
                return
            greeted = self._handle(message, sender, greeted, peer)

    def _handle(self, message: dict[str, Any], sender: _Sender, greeted: bool, peer: str) -> bool:
        call_id, method, params = message.get("id"), message.get("method"), message.get("params", {})
        if not isinstance(call_id, int) or not isinstance(method, str) or not isinstance(params, dict):
            _send_error(sender, call_id, BAD_REQUEST, "a request needs an integer id, a method and params")
            return greeted
        if method == HELLO:
            methods = sorted(self.handlers)
            sender.send(
                {"id": call_id, "result": {"version": self.version, "peer": self.name, "methods": methods}}
            )
            return True
        if not greeted:
            _send_error(sender, call_id, NOT_READY, f"call {HELLO!r} before {method!r}")
            return greeted
        handler = self.handlers.get(method)
        if handler is None:
            _send_error(sender, call_id, UNKNOWN_METHOD, f"{self.name} has no method {method!r}")
            return greeted
        self._dispatch(call_id, method, params, handler, sender, peer)
        return greeted

    def _dispatch(
        self, call_id: int, method: str, params: dict[str, Any], handler: Handler, sender: _Sender, peer: str
    ) -> None:
        try:
            result = handler(params, Call(method, sender, peer))
        except ConfplanError as err:
            _send_error(sender, call_id, FAILED, err.message, err.hint)
            return
        except Exception as err:  # a bug in the handler: say so, keep serving
            _send_error(sender, call_id, INTERNAL, f"{method}: {type(err).__name__}: {err}")
            return
        try:
            sender.send({"id": call_id, "result": result})
        except MessageTooLarge as err:
            _send_error(sender, call_id, TOO_LARGE, err.message, err.hint)
        except (TypeError, ValueError) as err:
            _send_error(sender, call_id, INTERNAL, f"{method}: the result is not JSON: {err}")

    def serve_tcp(self, listener: socket.socket) -> None:
        """Accept connections on ``listener`` forever, one thread each."""
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=self.serve_connection, args=(conn,), daemon=True).start()


def _send_error(sender: _Sender, call_id: object, code: str, message: str, hint: str | None = None) -> None:
    sender.send({"id": call_id, "error": {"code": code, "message": message, "hint": hint}})


def serve_fd(server: RpcServer, fd: int) -> None:
    """Serve the one connection inherited as ``fd`` (a child started by ``spawn_child``)."""
    server.serve_connection(socket.socket(fileno=fd))
