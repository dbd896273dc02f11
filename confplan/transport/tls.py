"""Mutual TLS 1.3 for the control channel, with pinned self-signed identities (docs/channel.md).

A connection goes: TCP -> TLS 1.3 handshake, both sides presenting their identity -> the agent's OpenSSL
checks the orchestrator's certificate against the enrolled orchestrators -> the orchestrator checks the
agent's certificate against its pin (the plan's fingerprint, or the enrolled agents) before it sends a
byte -> the agent says ``ACCEPTED`` -> the RPC ``hello``.

Why the ``ACCEPTED`` line: in TLS 1.3 the client's handshake ends before the server has judged the
client's certificate, so a refusal would otherwise surface on the orchestrator's first RPC read as a bare
"unknown ca". Waiting for it lets ``dial`` name the cause and the command that fixes it.

The server side (``accept``, ``TlsListener``) is in ``confplan.transport.listener``.
"""

from __future__ import annotations

import ssl
import threading
from typing import Any, Final

from confplan.errors import ConfplanError
from confplan.transport import tcp
from confplan.transport.duplex import DuplexSSLSocket
from confplan.transport.identity import Identity, Role, default_home, fingerprint, parse_fingerprint
from confplan.transport.trust import TrustStore

CHANNEL_VERSION: Final = 1
# The agent's first bytes on a connection it accepted; the orchestrator checks them before the RPC hello.
ACCEPTED: Final = b"confplan-channel 1 accepted\n"
DIAL_TIMEOUT: Final = 10.0

_HANDSHAKE: Final = 22  # TLS ContentType handshake
_CERTIFICATE: Final = 11  # TLS HandshakeType certificate


class ChannelError(ConfplanError):
    """The control channel could not be set up (TCP or TLS)."""


class UntrustedPeer(ChannelError):
    """The peer is not who we trust, or the peer does not trust us."""


# -- contexts ----------------------------------------------------------------------------------------


def _tls13_only(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3


def client_context(identity: Identity) -> ssl.SSLContext:
    """The orchestrator's context: TLS 1.3, presents ``identity``; no CA and no hostname check, because
    ``dial`` pins the agent's certificate by fingerprint right after the handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _tls13_only(context)
    context.sslsocket_class = DuplexSSLSocket
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # TLS still checks the agent holds the certificate's key
    context.load_cert_chain(identity.cert_path, identity.key_path)
    return context


class ServerContext(ssl.SSLContext):
    """The agent's context: an ``SSLContext`` that also knows the agent's identity, how many orchestrators
    it trusts, and the certificate each client sent (for the refusal log line).

    Python's ssl has no verify callback: a certificate OpenSSL refuses never reaches Python. CPython's
    private ``_msg_callback`` sees the client's Certificate message go by, so the log can still name the
    stranger; best effort (no callback, no fingerprint), the decision stays OpenSSL's.
    """

    identity: Identity
    enrolled: int
    _seen: dict[int, bytes | None]
    _seen_lock: threading.Lock

    def watch(self, conn: ssl.SSLSocket) -> None:
        with self._seen_lock:
            self._seen[id(conn)] = None

    def seen(self, conn: ssl.SSLSocket) -> bytes | None:
        """The DER certificate ``conn``'s peer sent during its handshake, if it sent one (and stop
        watching ``conn``)."""
        with self._seen_lock:
            return self._seen.pop(id(conn), None)

    def _on_message(self, conn: Any, direction: str, version: Any, content_type: Any, msg_type: Any,
                    data: bytes) -> None:  # fmt: skip
        if direction != "read" or int(content_type) != _HANDSHAKE or int(msg_type) != _CERTIFICATE:
            return
        with self._seen_lock:
            if id(conn) in self._seen:
                self._seen[id(conn)] = first_certificate(data)


def server_context(identity: Identity, trust: TrustStore) -> ServerContext:
    """The agent's context: TLS 1.3 only, a client certificate required, and the enrolled orchestrators
    as the only trust anchors (self-signed, each one its own anchor). No hostname checks, no tickets."""
    context = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    _tls13_only(context)
    context.sslsocket_class = DuplexSSLSocket
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(identity.cert_path, identity.key_path)
    bundle = trust.pem_bundle(Role.ORCHESTRATOR)
    if bundle:
        context.load_verify_locations(cadata=bundle)
    # No session tickets: every connection proves its key again and meets the trust store as it is now.
    setattr(context, "num_tickets", 0)  # noqa: B010 - not in typeshed
    context.identity = identity
    context.enrolled = bundle.count("-----BEGIN CERTIFICATE-----")
    context._seen = {}
    context._seen_lock = threading.Lock()
    if hasattr(context, "_msg_callback"):
        setattr(context, "_msg_callback", context._on_message)  # noqa: B010 - private in CPython
    return context


def first_certificate(message: bytes) -> bytes | None:
    """The first certificate's DER in a TLS 1.3 Certificate handshake message (RFC 8446 4.4.2: type,
    u24 length, request context<0..255>, certificate_list<u24> of (cert_data<u24>, extensions<u16>));
    None when there is none or the message is malformed."""
    if message[:1] == bytes([_CERTIFICATE]):
        message = message[4:]  # the handshake header, when the callback passes it
    if not message:
        return None
    pos = 1 + message[0]  # skip certificate_request_context
    if len(message) < pos + 6:
        return None
    size = int.from_bytes(message[pos + 3 : pos + 6], "big")
    der = message[pos + 6 : pos + 6 + size]
    return der if size and len(der) == size else None


# -- the orchestrator's side -------------------------------------------------------------------------


def dial(
    host: str,
    port: int,
    *,
    identity: Identity,
    pin: str | None,
    trust: TrustStore,
    timeout: float = DIAL_TIMEOUT,
) -> ssl.SSLSocket:
    """A mutual-TLS 1.3 connection to the agent at ``host:port``, checked both ways, ready for the RPC.

    ``pin`` is the agent's fingerprint from the plan (``sha256:...``); None accepts any agent enrolled in
    ``trust``. Raises ``UntrustedPeer`` when the agent is not the pinned one (nothing was sent to it) or
    when it refuses ``identity``, ``ChannelError`` for anything else; the socket returned blocks.
    """
    where = f"the agent at {_host_port(host, port)}"
    if pin is not None:
        try:
            pin = parse_fingerprint(pin)
        except ValueError as err:
            raise ChannelError(f"the pin for {where}: {err}", hint="copy the fingerprint again") from None
    try:
        raw = tcp.connect(host, port, timeout)
    except OSError as err:
        raise ChannelError(
            f"cannot connect to {where}: {err.strerror or err}",
            hint="check that `confplan agent` runs there and that the port is reachable",
        ) from None
    try:
        conn = client_context(identity).wrap_socket(raw, do_handshake_on_connect=False)
    except BaseException:
        raw.close()
        raise
    try:
        _handshake(conn, where, timeout)
        der = conn.getpeercert(binary_form=True)
        got = fingerprint(der) if der else "no certificate"
        _check_pin(where, got, pin, trust)
        _await_acceptance(conn, where, got, identity)
    except BaseException:
        conn.close()
        raise
    start_duplex(conn)
    return conn


def _handshake(conn: ssl.SSLSocket, where: str, timeout: float) -> None:
    try:
        conn.do_handshake()
    except TimeoutError:
        raise ChannelError(
            f"{where} did not complete the TLS handshake within {timeout:g}s",
            hint="check that the port belongs to `confplan agent` and the network passes it",
        ) from None
    except OSError as err:
        raise ChannelError(
            f"TLS 1.3 handshake with {where} failed: {describe(err)}",
            hint="it must be a `confplan agent` of this confplan release (older agents speak no TLS); "
            "its log says more",
        ) from None


def _check_pin(where: str, got: str, pin: str | None, trust: TrustStore) -> None:
    """The agent's certificate must be the pinned one: checked before a byte of ours goes to it."""
    if pin is not None:
        if got == pin:
            return
        raise UntrustedPeer(
            f"{where} presents identity {got}, but the plan pins {pin}: someone may be intercepting the "
            "connection, or the agent's identity was made anew",
            hint="on the agent host run `confplan identity show --role agent`; if it prints "
            f"{got}, put `fingerprint: {got}` in the plan; if it does not, do not go on: the network "
            "between the hosts is not safe",
        )
    trusted = trust.fingerprints(Role.AGENT)
    if got in trusted:
        return
    folder = trust.role_folder(Role.AGENT)
    raise UntrustedPeer(
        f"{where} presents identity {got}, which is not an enrolled agent "
        f"(expected one of the {len(trusted)} in {folder}, or a fingerprint pinned in the plan)",
        hint=f"on the agent host check that `confplan identity show --role agent` prints {got}; then run "
        "here `confplan trust add --agent FILE` with FILE the output of `confplan identity show "
        f"--role agent --pem` there, or put `fingerprint: {got}` in the plan",
    )


def _await_acceptance(conn: ssl.SSLSocket, where: str, agent: str, identity: Identity) -> None:
    """Read the agent's ``ACCEPTED``; a TLS alert or a hang-up instead means it refused our identity."""
    data = b""
    try:
        while len(data) < len(ACCEPTED):
            chunk = conn.recv(len(ACCEPTED) - len(data))
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        raise ChannelError(
            f"{where} ({agent}) did not confirm the connection after the TLS handshake",
            hint="it may be overloaded or an older confplan; its log says more",
        ) from None
    except ssl.SSLEOFError:
        raise refused_by_agent(where, agent, identity, "it hung up without a TLS alert") from None
    except ssl.SSLError as err:
        if "ALERT" not in str(err.reason):
            raise ChannelError(f"TLS with {where} failed: {describe(err)}") from None
        raise refused_by_agent(where, agent, identity, f"TLS alert: {describe(err)}") from None
    except OSError as err:  # a reset: the agent closed with our data unread
        raise refused_by_agent(where, agent, identity, f"{err.strerror or err}, no TLS alert") from None
    if not data:
        raise refused_by_agent(where, agent, identity, "it hung up without a TLS alert")
    if data != ACCEPTED:
        raise ChannelError(
            f"{where} sent {data!r} where a confplan agent says {ACCEPTED!r}",
            hint=f"run the same confplan release on both sides (this one speaks channel v{CHANNEL_VERSION})",
        )


def start_duplex(conn: ssl.SSLSocket) -> None:
    """Make a connection ready for the RPC: blocking (calls have their own timeouts), and safe for a
    reader thread and writer threads at once (``DuplexSSLSocket``)."""
    if isinstance(conn, DuplexSSLSocket):
        conn.start_duplex(None)
    else:  # a context made elsewhere: still blocking, but one thread at a time
        conn.settimeout(None)


def refused_by_agent(where: str, agent: str, identity: Identity, detail: str) -> UntrustedPeer:
    """The agent did not accept this orchestrator: name both identities and the enrol command."""
    show = f"confplan identity show --role orchestrator --pem{home_option(identity)}"
    return UntrustedPeer(
        f"{where} ({agent}) refused this orchestrator's identity {identity.fingerprint} ({detail})",
        hint=f"enrol this orchestrator on the agent host: there, run `confplan trust add --orchestrator "
        f"FILE` with FILE the output of `{show}` here (or pipe it: `{show} | ssh AGENT-HOST confplan "
        "trust add --orchestrator -`)",
    )


def home_option(identity: Identity) -> str:
    """`` --home DIR`` when ``identity`` lives outside the default home, so a printed command works."""
    home = identity.folder.parent.parent.expanduser().absolute()
    return "" if home == default_home().expanduser().absolute() else f" --home {home}"


def describe(err: OSError) -> str:
    """An OpenSSL error without the ``[SSL: X] ... (_ssl.c:123)`` decoration."""
    if isinstance(err, ssl.SSLEOFError | ConnectionError):
        return "the peer closed the connection"
    if isinstance(err, ssl.SSLCertVerificationError) and err.verify_message:
        return str(err.verify_message)
    if isinstance(err, ssl.SSLError) and err.reason:
        reason = str(err.reason)
        for prefix in ("TLSV13_ALERT_", "TLSV1_ALERT_", "SSLV3_ALERT_"):
            reason = reason.removeprefix(prefix)
        return reason.lower().replace("_", " ")
    return err.strerror or str(err) or type(err).__name__


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
