"""The agent's side of the control channel: accept mutual-TLS connections, refuse strangers in one log line.

``handshake`` runs the server half of one connection's TLS handshake, bounded by a deadline; ``accept``
does accept + handshake in the caller's thread (simple, but a silent peer holds it up to the deadline);
``TlsListener`` runs each handshake in its own thread and hands out the connections that passed, so a
peer that connects and says nothing never delays anyone else, and rebuilds its TLS context when the
enrolled orchestrators change (``confplan trust add/remove`` act without restarting the agent).
"""

from __future__ import annotations

import contextlib
import queue
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from confplan.errors import ConfplanError
from confplan.transport import tcp
from confplan.transport.identity import Identity, Role, fingerprint
from confplan.transport.tls import (
    ACCEPTED,
    ChannelError,
    ServerContext,
    describe,
    home_option,
    server_context,
    start_duplex,
)
from confplan.transport.trust import TrustStore

HANDSHAKE_TIMEOUT: Final = 10.0  # seconds a peer has for the whole TLS handshake
MAX_HANDSHAKES: Final = 64  # handshakes in progress at once; more connections are closed at once
_POLL: Final = 0.2  # how often the accept thread looks whether it was closed

LogLine = Callable[[str], None]
# OpenSSL reasons that mean "this peer does not speak TLS 1.3" (a plain-TCP client, TLS 1.2, HTTP).
_NOT_TLS13: Final = frozenset(
    {"WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST",
     "VERSION_TOO_LOW", "UNKNOWN_PROTOCOL", "NO_PROTOCOLS_AVAILABLE", "RECORD_LAYER_FAILURE",
     "PACKET_LENGTH_TOO_LONG"}
)  # fmt: skip


def log_line(line: str) -> None:
    """One line on stderr with the time: the agent's log."""
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


class PeerRefused(ChannelError):
    """The agent refused a connection. The message is the log line; ``fingerprint`` the peer's, if known."""

    def __init__(self, message: str, *, address: str, fingerprint: str | None) -> None:
        super().__init__(message)
        self.address = address
        self.fingerprint = fingerprint


def handshake(
    conn: socket.socket, address: Any, context: ServerContext, *, handshake_timeout: float = HANDSHAKE_TIMEOUT
) -> tuple[ssl.SSLSocket, str]:
    """The server half of the TLS handshake on an accepted TCP connection, then ``ACCEPTED``.

    Returns the TLS socket (blocking) and the orchestrator's fingerprint; raises ``PeerRefused`` (the
    connection closed) when OpenSSL refused the peer, it spoke no TLS 1.3, or it took longer than
    ``handshake_timeout`` seconds in all.
    """
    peer = format_address(address)
    try:
        tcp.tune(conn)
        conn.settimeout(handshake_timeout)  # CPython's handshake keeps one deadline for all its waits
        tls = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
    except OSError as err:
        conn.close()
        raise PeerRefused(f"refused {peer}: {describe(err)}", address=peer, fingerprint=None) from None
    context.watch(tls)
    try:
        tls.do_handshake()
    except OSError as err:
        seen = context.seen(tls)
        tls.close()
        raise refusal(context, peer, seen, err, handshake_timeout) from None
    context.seen(tls)
    der = tls.getpeercert(binary_form=True)
    assert der is not None  # CERT_REQUIRED: OpenSSL refused any peer without a certificate
    try:
        tls.sendall(ACCEPTED)
    except OSError as err:  # it checked this agent's fingerprint against its pin, and left?
        tls.close()
        who, own = fingerprint(der), context.identity.fingerprint
        raise PeerRefused(
            f"{peer} ({who}) hung up right after the TLS handshake ({describe(err)}); if it is an "
            f"orchestrator, it may pin another fingerprint than this agent's {own}",
            address=peer,
            fingerprint=who,
        ) from None
    start_duplex(tls)
    return tls, fingerprint(der)


def refusal(
    context: ServerContext, peer: str, der: bytes | None, err: OSError, handshake_timeout: float
) -> PeerRefused:
    """The one log line for a refused connection: who, why, this agent's identity, and what to run."""
    own = context.identity.fingerprint
    who = fingerprint(der) if der else "fingerprint unknown"
    reason = str(getattr(err, "reason", "") or "")
    enrol = (
        f"; to let it in, run here `confplan trust add --orchestrator FILE{home_option(context.identity)}` "
        "with FILE the output of `confplan identity show --role orchestrator --pem` on that host"
    )
    if isinstance(err, ssl.SSLCertVerificationError):
        why = (
            "no orchestrator is enrolled on this agent"
            if context.enrolled == 0
            else f"it is not an enrolled orchestrator (OpenSSL: {describe(err)})"
        )
        line = f"refused {peer} ({who}): {why}; this agent is {own}{enrol}"
    elif reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        line = f"refused {peer}: it sent no certificate (not a confplan orchestrator?); this agent is {own}"
    elif reason in _NOT_TLS13:
        line = (
            f"refused {peer} ({who}): it does not speak TLS 1.3 ({describe(err)}): a plain-TCP client or an "
            f"older confplan?; this agent is {own}"
        )
    elif isinstance(err, TimeoutError):
        line = f"refused {peer} ({who}): no TLS handshake within {handshake_timeout:g}s; this agent is {own}"
    else:
        line = f"refused {peer} ({who}): TLS handshake failed: {describe(err)}; this agent is {own}"
    return PeerRefused(line, address=peer, fingerprint=fingerprint(der) if der else None)


def accept(
    listener: socket.socket,
    context: ServerContext,
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    log: LogLine = log_line,
) -> tuple[ssl.SSLSocket, str]:
    """The next connection on ``listener`` that passes the handshake, and its peer's fingerprint.

    Refused peers are logged (one line each) and skipped. The handshakes run in this thread, so a peer
    that says nothing holds the call up to ``handshake_timeout``: a server that must not wait on one
    slow peer uses ``TlsListener``. A timeout set on ``listener`` raises ``TimeoutError`` as usual.
    """
    while True:
        conn, address = listener.accept()
        try:
            return handshake(conn, address, context, handshake_timeout=handshake_timeout)
        except PeerRefused as refused:
            log(refused.message)


class TlsListener:
    """Accepts on ``listener`` (which it owns and closes) in a thread of its own; each handshake in a
    thread of its own; ``accept`` hands out the connections that passed, with the peer's fingerprint."""

    def __init__(
        self,
        listener: socket.socket,
        identity: Identity,
        trust: TrustStore,
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        log: LogLine = log_line,
        max_handshakes: int = MAX_HANDSHAKES,
    ) -> None:
        self.identity = identity
        self.trust = trust
        self.handshake_timeout = handshake_timeout
        self.log = log
        self.max_handshakes = max_handshakes
        self.address: tuple[Any, ...] = listener.getsockname()
        self._listener = listener
        self._context_lock = threading.Lock()
        self._trust_state = trust.state(Role.ORCHESTRATOR)
        self._context = server_context(identity, trust)
        self._ready: queue.Queue[tuple[ssl.SSLSocket, str] | None] = queue.Queue()
        self._slots = threading.BoundedSemaphore(max_handshakes)
        self._closed = threading.Event()
        listener.settimeout(_POLL)
        self._thread = threading.Thread(target=self._accept_loop, name="tls-accept", daemon=True)
        self._thread.start()

    def accept(self, timeout: float | None = None) -> tuple[ssl.SSLSocket, str]:
        """The next accepted connection and its peer's fingerprint; ``TimeoutError`` when none came within
        ``timeout`` seconds (None: wait), ``ChannelError`` once closed."""
        try:
            item = self._ready.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no connection within {timeout:g}s") from None
        if item is None:
            self._ready.put(None)  # for the next caller
            raise ChannelError("the TLS listener is closed")
        return item

    def context(self) -> ServerContext:
        """The TLS context for the next handshake, rebuilt when the enrolled orchestrators changed."""
        state = self.trust.state(Role.ORCHESTRATOR)
        with self._context_lock:
            if state != self._trust_state:
                self._context = server_context(self.identity, self.trust)
                self._trust_state = state
            return self._context

    def close(self) -> None:
        """Stop accepting, close the listening socket and the connections nobody took."""
        self._closed.set()
        self._thread.join()
        self._listener.close()
        with contextlib.suppress(queue.Empty):
            while (item := self._ready.get_nowait()) is not None:
                item[0].close()
        self._ready.put(None)

    def __enter__(self) -> TlsListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as err:  # EMFILE and the like: say so, give the system a moment
                self.log(f"accepting a connection failed: {err.strerror or err}")
                self._closed.wait(_POLL)
                continue
            if not self._slots.acquire(blocking=False):
                conn.close()
                self.log(
                    f"refused {format_address(address)}: {self.max_handshakes} TLS handshakes already in "
                    f"progress; this agent is {self.identity.fingerprint}"
                )
                continue
            threading.Thread(target=self._handshake, args=(conn, address), daemon=True).start()

    def _handshake(self, conn: socket.socket, address: Any) -> None:
        try:
            result = handshake(conn, address, self.context(), handshake_timeout=self.handshake_timeout)
        except PeerRefused as refused:
            self.log(refused.message)
            return
        except ConfplanError as err:  # a damaged trust store: refuse everyone until it is fixed
            conn.close()
            self.log(f"refused {format_address(address)}: {err.render()}")
            return
        finally:
            self._slots.release()
        if self._closed.is_set():
            result[0].close()
            return
        self._ready.put(result)


def format_address(address: Any) -> str:
    """``host:port`` (``[v6]:port``) of a socket address."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)
