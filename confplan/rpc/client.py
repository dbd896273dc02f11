"""The calling side of the control channel (the orchestrator).

A reader thread takes every line off the socket: answers wake the call waiting for them, events go to
``on_event``. When the peer goes away, every waiting call fails at once with ``PeerGone`` instead of
hanging until its timeout.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from confplan import __version__
from confplan.rpc.protocol import (
    HELLO,
    MAX_MESSAGE,
    PROTOCOL_VERSION,
    VERSION_MISMATCH,
    LineReader,
    PeerGone,
    ProtocolError,
    RemoteError,
    RpcError,
    RpcTimeout,
    VersionMismatch,
    encode,
    version_mismatch,
)

EventHandler = Callable[[str, dict[str, Any]], None]
DEFAULT_TIMEOUT = 30.0


@dataclass
class _Pending:
    method: str
    done: threading.Event = field(default_factory=threading.Event)
    answer: dict[str, Any] | None = None


class RpcClient:
    """Calls methods on a connected peer. ``peer`` names it in messages ("the source VMM process")."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        peer: str = "the VMM process",
        on_event: EventHandler | None = None,
        max_message: int = MAX_MESSAGE,
        version: int = PROTOCOL_VERSION,
        describe_gone: Callable[[], str] | None = None,
    ) -> None:
        self.peer = peer
        self.on_event = on_event
        self.max_message = max_message
        self.version = version  # only tests speak another version
        self.server_info: dict[str, Any] = {}
        self._sock = sock
        self._reader = LineReader(sock, max_message)
        self._describe_gone = describe_gone or (lambda: "closed the connection")
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._broken: RpcError | None = None
        self._closing = False  # this side hangs up: the end of stream needs no explaining
        self._went: str | None = None  # the peer went (and the detail it went with)
        self._thread = threading.Thread(target=self._read_loop, name=f"rpc-reader {peer}", daemon=True)
        self._thread.start()

    # -- calls ---------------------------------------------------------------------------------------

    def hello(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """The version handshake; both sides check the other's version."""
        params = {"version": self.version, "peer": f"confplan {__version__}"}
        info = self._call(HELLO, params, timeout)
        if not isinstance(info, dict) or info.get("version") != self.version:
            theirs = info.get("version") if isinstance(info, dict) else "?"
            raise version_mismatch(self.peer, theirs, self.version)
        self.server_info = info
        return info

    def call(
        self, method: str, params: dict[str, Any] | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> Any:
        """Call ``method`` and return its result; raises RemoteError, PeerGone, RpcTimeout, ProtocolError."""
        return self._call(method, params or {}, timeout)

    def _call(self, method: str, params: dict[str, Any], timeout: float) -> Any:
        call_id = next(self._ids)
        data = encode(
            {"v": self.version, "id": call_id, "method": method, "params": params}, self.max_message
        )
        pending = _Pending(method)
        with self._lock:
            broken = self._broken
            if broken is None:
                self._pending[call_id] = pending
        if broken is not None:  # (outside the lock: describing a gone peer may wait for its exit code)
            raise self._broken_for(method, broken)
        try:
            with self._send_lock:
                self._sock.sendall(data)
        except OSError:
            pass  # the reader sees the same end of stream and explains it
        if not pending.done.wait(timeout):
            with self._lock:
                self._pending.pop(call_id, None)
            raise RpcTimeout(
                f"{self.peer} did not answer {method!r} within {timeout:g}s",
                hint="it may be stuck or overloaded; check its log, or raise the timeout",
            )
        return self._unwrap(method, pending)

    def _unwrap(self, method: str, pending: _Pending) -> Any:
        answer = pending.answer
        if answer is None:
            assert self._broken is not None
            raise self._broken
        error = answer.get("error")
        if error is None:
            return answer.get("result")
        code = str(error.get("code"))
        if code == VERSION_MISMATCH:
            hint = "run the same confplan release on both sides"
            raise VersionMismatch(str(error.get("message")), hint=hint)
        remote_hint = error.get("hint")
        message = f"{self.peer}: {error.get('message')}"
        raise RemoteError(code, message, hint=remote_hint if isinstance(remote_hint, str) else None)

    # -- the reader thread ---------------------------------------------------------------------------

    def _read_loop(self) -> None:
        try:
            while (message := self._reader.read()) is not None:
                self._route(message)
        except VersionMismatch as err:
            self._break(err)
            return
        except ProtocolError as err:
            self._break(ProtocolError(f"{self.peer} broke the protocol: {err.message}", hint=err.hint))
            return
        except OSError as err:
            self._break(self._gone(f"connection error: {err}"))
            return
        self._break(self._gone())

    def _route(self, message: dict[str, Any]) -> None:
        if message.get("v") != self.version:
            raise version_mismatch(self.peer, message.get("v"), self.version)
        if "event" in message:
            if self.on_event is not None:
                params = message.get("params")
                self.on_event(str(message["event"]), params if isinstance(params, dict) else {})
            return
        call_id = message.get("id")
        with self._lock:
            pending = self._pending.pop(call_id, None) if isinstance(call_id, int) else None
        if pending is None:
            error = message.get("error")
            if call_id is None and isinstance(error, dict):  # the peer could not tell which call it refused
                text = f"{self.peer} refused a message: {error.get('message')}"
                self._break(RemoteError(str(error.get("code")), text))
            return  # an answer to a call that already timed out
        pending.answer = message
        pending.done.set()

    def _gone(self, detail: str | None = None) -> PeerGone:
        if self._closing:  # asking how the peer ended would wait for a process that is not ending
            return PeerGone(f"the connection to {self.peer} was closed by this side")
        with self._lock:
            methods = sorted({pending.method for pending in self._pending.values()})
        self._went = detail or ""
        return self._gone_message(methods, detail)

    def _gone_message(self, methods: list[str], detail: str | None) -> PeerGone:
        during = f" during call {', '.join(repr(m) for m in methods)}" if methods else ""
        extra = f" ({detail})" if detail else ""
        return PeerGone(
            f"{self.peer} {self._describe_gone()}{during}{extra}",
            hint="its log (stderr) says why; rerun the command to resume",
        )

    def _broken_for(self, method: str, broken: RpcError) -> RpcError:
        """What a call finds when the connection broke before it was sent: the same words whether the
        peer went before or after the call was made (a race the caller cannot see), naming the call."""
        if isinstance(broken, PeerGone) and self._went is not None and not self._closing:
            return self._gone_message([method], self._went)
        return broken

    def _break(self, error: RpcError) -> None:
        """Fail every waiting call with ``error``; later calls fail at once with it too."""
        with self._lock:
            if self._broken is None:
                self._broken = error
            pending, self._pending = list(self._pending.values()), {}
        for entry in pending:
            entry.done.set()

    # -- closing -------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._broken is None

    def close(self) -> None:
        """Hang up; the peer sees end of stream."""
        self._closing = True
        with contextlib.suppress(OSError):  # already closed by the peer
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5.0)
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_tcp(
    host: str,
    port: int,
    *,
    peer: str | None = None,
    timeout: float = 10.0,
    on_event: EventHandler | None = None,
) -> RpcClient:
    """Connect to a serving peer over TCP (a remote agent) and say hello."""
    name = peer or f"the agent at {host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        raise PeerGone(
            f"cannot connect to {name}: {err.strerror or err}",
            hint="check that `confplan agent` runs there and that the port is reachable",
        ) from None
    sock.settimeout(None)  # the reader blocks; call timeouts are per call
    return greeted(RpcClient(sock, peer=name, on_event=on_event), timeout)


ClientT = TypeVar("ClientT", bound=RpcClient)


def greeted(client: ClientT, timeout: float) -> ClientT:
    """``client`` after a successful version handshake; a failed handshake closes it."""
    try:
        client.hello(timeout)
    except BaseException:
        client.close()
        raise
    return client
