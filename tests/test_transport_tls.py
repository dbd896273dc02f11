"""Mutual TLS 1.3 with pinned identities over real loopback TCP (confplan.transport, docs/channel.md).

A test agent (``TlsListener`` + an echo loop) serves connections; orchestrators, strangers, plain-TCP and
TLS 1.2 clients connect to it. Nothing is mocked: real OpenSSL, real sockets, real files.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from confplan.rpc import RpcClient
from confplan.rpc.client import greeted
from confplan.rpc.selftest import build_server
from confplan.transport import (
    ACCEPTED,
    ChannelError,
    Identity,
    Role,
    TlsListener,
    TrustStore,
    UntrustedPeer,
    accept,
    dial,
    server_context,
    tcp,
)
from confplan.transport.duplex import DuplexSSLSocket
from confplan.transport.tls import first_certificate

WAIT = 30.0  # a guard against hanging forever, never a measurement


class Log:
    """The agent's log lines, with a way to wait for one."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()

    def __call__(self, line: str) -> None:
        with self._changed:
            self.lines.append(line)
            self._changed.notify_all()

    def wait_for(self, *words: str) -> str:
        def found() -> str | None:
            return next((line for line in self.lines if all(word in line for word in words)), None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None, WAIT)
            line = found()
        assert line is not None, f"no log line with {words}; log: {self.lines}"
        return line


@dataclass
class Agent:
    """A test agent: accepts on loopback, answers each line with the peer's fingerprint and the line."""

    home: Path
    identity: Identity
    trust: TrustStore
    listener: TlsListener
    log: Log
    accepted: list[ssl.SSLSocket] = field(default_factory=list)  # as handed out by the listener
    received: list[bytes] = field(default_factory=list)  # what each finished connection sent

    @property
    def port(self) -> int:
        return int(self.listener.address[1])


def serve(agent: Agent, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            conn, peer = agent.listener.accept(timeout=0.2)
        except TimeoutError:
            continue
        except ChannelError:
            return
        threading.Thread(target=echo, args=(agent, conn, peer), daemon=True).start()


def echo(agent: Agent, conn: ssl.SSLSocket, peer: str) -> None:
    agent.accepted.append(conn)
    with conn, conn.makefile("rb") as reader:
        received = b""
        for line in reader:
            received += line
            conn.sendall(peer.encode() + b" " + line)
        agent.received.append(received)


def make_agent(tmp_path: Path, *, handshake_timeout: float = WAIT) -> Iterator[Agent]:
    home = tmp_path / "agent-home"
    identity = Identity.load_or_create(home, Role.AGENT)
    trust = TrustStore.at_home(home)
    log = Log()
    listener = TlsListener(
        socket.create_server(("127.0.0.1", 0)), identity, trust, handshake_timeout=handshake_timeout, log=log
    )
    agent = Agent(home, identity, trust, listener, log)
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(agent, stop), daemon=True)
    thread.start()
    yield agent
    stop.set()
    thread.join()
    listener.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    yield from make_agent(tmp_path)


@dataclass
class Orchestrator:
    identity: Identity
    trust: TrustStore


def orchestrator(tmp_path: Path, name: str, agent: Agent | None = None) -> Orchestrator:
    """An orchestrator identity in its own home; enrolled on ``agent`` when one is given."""
    home = tmp_path / name
    identity = Identity.load_or_create(home, Role.ORCHESTRATOR)
    if agent is not None:
        agent.trust.add(Role.ORCHESTRATOR, identity.pem)
    return Orchestrator(identity, TrustStore.at_home(home))


def connect(
    orch: Orchestrator, agent: Agent, pin: str | None = "agent", timeout: float = WAIT
) -> ssl.SSLSocket:
    return dial(
        "127.0.0.1",
        agent.port,
        identity=orch.identity,
        pin=agent.identity.fingerprint if pin == "agent" else pin,
        trust=orch.trust,
        timeout=timeout,
    )


def ask(conn: ssl.SSLSocket, line: bytes) -> bytes:
    conn.sendall(line)
    with conn.makefile("rb") as reader:
        return reader.readline()


# -- OpenSSL and our certificates ------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True], ids=["default", "x509-strict"])
def test_openssl_takes_a_self_signed_identity_as_its_own_trust_anchor(tmp_path: Path, strict: bool) -> None:
    """The premise of server_context: an enrolled self-signed end-entity certificate verifies as a client
    certificate (also under VERIFY_X509_STRICT, the default of newer Pythons' create_default_context)."""
    server = Identity.load_or_create(tmp_path / "s", Role.AGENT)
    client = Identity.load_or_create(tmp_path / "c", Role.ORCHESTRATOR)
    trust = TrustStore(tmp_path / "trust")
    trust.add(Role.ORCHESTRATOR, client.pem)
    context = server_context(server, trust)
    if strict:
        context.verify_flags |= ssl.VERIFY_X509_STRICT
    client_side = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_side.load_verify_locations(cadata=server.pem)  # and the other way round, by CA, also strict
    client_side.verify_flags |= ssl.VERIFY_X509_STRICT if strict else 0
    client_side.check_hostname = False
    client_side.load_cert_chain(client.cert_path, client.key_path)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        result: list[str] = []
        thread = threading.Thread(
            target=lambda: result.append(accept(listener, context, handshake_timeout=WAIT)[1])
        )
        thread.start()
        with client_side.wrap_socket(socket.create_connection(listener.getsockname())) as conn:
            assert conn.version() == "TLSv1.3"
            assert conn.recv(len(ACCEPTED)) == ACCEPTED
        thread.join()
    assert result == [client.fingerprint]


# -- accepted connections --------------------------------------------------------------------------------


def test_a_trusted_orchestrator_exchanges_data_with_a_pinned_agent(tmp_path: Path, agent: Agent) -> None:
    orch = orchestrator(tmp_path, "orch", agent)
    with connect(orch, agent) as conn:
        assert conn.version() == "TLSv1.3"
        assert ask(conn, b"hello\n") == orch.identity.fingerprint.encode() + b" hello\n"
        assert ask(conn, b"again\n").endswith(b" again\n")


def test_an_agent_enrolled_in_the_trust_store_needs_no_pin(tmp_path: Path, agent: Agent) -> None:
    orch = orchestrator(tmp_path, "orch", agent)
    with pytest.raises(UntrustedPeer) as caught:
        connect(orch, agent, pin=None)
    message, hint = caught.value.message, caught.value.hint or ""
    assert agent.identity.fingerprint in message and "not an enrolled agent" in message
    assert "confplan trust add --agent FILE" in hint and f"fingerprint: {agent.identity.fingerprint}" in hint
    orch.trust.add(Role.AGENT, agent.identity.pem)
    with connect(orch, agent, pin=None) as conn:
        assert ask(conn, b"enrolled\n").endswith(b" enrolled\n")


def test_the_accepted_socket_and_the_dialled_one_set_keepalive(tmp_path: Path, agent: Agent) -> None:
    orch = orchestrator(tmp_path, "orch", agent)
    with connect(orch, agent) as conn:
        assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == tcp.USER_TIMEOUT_MS
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == tcp.KEEPALIVE_IDLE
        assert isinstance(conn, DuplexSSLSocket) and conn.gettimeout() is None
        ask(conn, b"x\n")  # answered: the agent holds its end
        served = agent.accepted[0]
        assert served.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert served.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == tcp.USER_TIMEOUT_MS
        assert isinstance(served, DuplexSSLSocket) and served.gettimeout() is None


# -- refusals --------------------------------------------------------------------------------------------


def test_a_stranger_is_refused_in_the_handshake_and_the_agent_keeps_serving(
    tmp_path: Path, agent: Agent
) -> None:
    trusted = orchestrator(tmp_path, "trusted", agent)
    stranger = orchestrator(tmp_path, "stranger")  # never enrolled on the agent
    with pytest.raises(UntrustedPeer) as caught:
        connect(stranger, agent)
    message, hint = caught.value.message, caught.value.hint or ""
    assert stranger.identity.fingerprint in message and agent.identity.fingerprint in message
    assert "refused this orchestrator's identity" in message
    assert (
        "confplan trust add --orchestrator" in hint
        and "confplan identity show --role orchestrator --pem" in hint
    )

    line = agent.log.wait_for("refused 127.0.0.1:")
    assert stranger.identity.fingerprint in line  # taken from the Certificate message OpenSSL refused
    assert agent.identity.fingerprint in line
    assert "not an enrolled orchestrator" in line and "confplan trust add --orchestrator FILE" in line

    with connect(trusted, agent) as conn:
        assert ask(conn, b"still here\n").endswith(b" still here\n")


def test_an_impostor_with_the_enrolled_name_but_another_key_is_refused(tmp_path: Path, agent: Agent) -> None:
    """OpenSSL finds the enrolled certificate by subject name; the signature check still fails."""
    trusted = orchestrator(tmp_path, "trusted", agent)
    impostor = orchestrator(tmp_path, "impostor")
    assert impostor.identity.subject == trusted.identity.subject  # same host, same CN
    with pytest.raises(UntrustedPeer, match="refused this orchestrator's identity"):
        connect(impostor, agent)
    agent.log.wait_for(impostor.identity.fingerprint, "not an enrolled orchestrator")


def test_enrolling_and_removing_take_effect_without_a_restart(tmp_path: Path, agent: Agent) -> None:
    late = orchestrator(tmp_path, "late")
    with pytest.raises(UntrustedPeer):
        connect(late, agent)
    agent.log.wait_for(late.identity.fingerprint, "no orchestrator is enrolled on this agent")
    agent.trust.add(Role.ORCHESTRATOR, late.identity.pem)
    with connect(late, agent) as conn:
        assert ask(conn, b"in\n").endswith(b" in\n")
    agent.trust.remove(late.identity.fingerprint)
    with pytest.raises(UntrustedPeer):
        connect(late, agent)


def test_a_wrong_pin_names_both_fingerprints_and_sends_nothing(tmp_path: Path, agent: Agent) -> None:
    orch = orchestrator(tmp_path, "orch", agent)
    wrong = "sha256:" + hashlib.sha256(b"another agent").hexdigest()
    with pytest.raises(UntrustedPeer) as caught:
        connect(orch, agent, pin=wrong)
    message, hint = caught.value.message, caught.value.hint or ""
    assert wrong in message and agent.identity.fingerprint in message
    assert f"fingerprint: {agent.identity.fingerprint}" in hint
    assert "confplan identity show --role agent" in hint
    # The agent accepted the orchestrator, then saw the connection end without one byte of data (or, when
    # the orchestrator was faster, could not even send its ACCEPTED line).
    deadline = time.monotonic() + WAIT
    while not agent.received and not agent.log.lines and time.monotonic() < deadline:
        time.sleep(0.01)
    assert agent.received == [b""] or "hung up right after the TLS handshake" in agent.log.lines[0]

    with pytest.raises(ChannelError, match="not a fingerprint"):
        connect(orch, agent, pin="sha256:1234")
    with connect(orch, agent, pin=agent.identity.fingerprint.upper().replace("SHA256", "sha256")) as conn:
        assert ask(conn, b"case does not matter\n").endswith(b" case does not matter\n")


def test_a_plain_tcp_client_and_a_silent_one_do_not_block_the_agent(tmp_path: Path, agent: Agent) -> None:
    orch = orchestrator(tmp_path, "orch", agent)
    with socket.create_connection(("127.0.0.1", agent.port)) as silent:
        with socket.create_connection(("127.0.0.1", agent.port)) as plain:
            plain.sendall(b'{"v":1,"id":1,"method":"hello","params":{}}\n')
            plain.settimeout(WAIT)
            assert b"{" not in _until_hangup(plain)  # at most a TLS alert, never an RPC answer
        # The silent peer holds its handshake for up to 30 s; a dial that gives up after 10 s still gets in.
        with connect(orch, agent, timeout=10) as conn:
            assert ask(conn, b"meanwhile\n").endswith(b" meanwhile\n")
        silent.setblocking(False)
        with pytest.raises(BlockingIOError):
            silent.recv(1)  # not refused yet: it was left waiting, not served in line
    line = agent.log.wait_for("does not speak TLS 1.3")
    assert "fingerprint unknown" in line and agent.identity.fingerprint in line


def _until_hangup(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(100):
            data += chunk
    except ConnectionResetError:  # the agent closed with our bytes unread
        pass
    return data


def test_a_silent_client_is_dropped_after_the_handshake_deadline(tmp_path: Path) -> None:
    for agent in make_agent(tmp_path, handshake_timeout=0.3):
        with socket.create_connection(("127.0.0.1", agent.port)) as silent:
            line = agent.log.wait_for("no TLS handshake within 0.3s")
            assert "fingerprint unknown" in line
            silent.settimeout(WAIT)
            assert _until_hangup(silent) == b""


def test_a_tls12_client_is_refused(tmp_path: Path, agent: Agent) -> None:
    orch = orchestrator(tmp_path, "orch", agent)  # enrolled: the version alone is refused
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.load_cert_chain(orch.identity.cert_path, orch.identity.key_path)
    with (
        socket.create_connection(("127.0.0.1", agent.port)) as raw,
        pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"),
    ):
        context.wrap_socket(raw)
    agent.log.wait_for("does not speak TLS 1.3", "unsupported protocol")


def test_a_client_without_certificate_is_refused(tmp_path: Path, agent: Agent) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with (
        context.wrap_socket(socket.create_connection(("127.0.0.1", agent.port))) as conn,
        pytest.raises((ssl.SSLError, ConnectionError)),
    ):
        conn.recv(len(ACCEPTED))
    agent.log.wait_for("sent no certificate")


def test_dialling_something_that_is_no_tls_agent(tmp_path: Path) -> None:
    orch = orchestrator(tmp_path, "orch")
    with socket.create_server(("127.0.0.1", 0)) as plain:
        port = plain.getsockname()[1]

        def answer_in_clear() -> None:
            conn, _ = plain.accept()
            with conn:
                conn.recv(1000)
                conn.sendall(b'{"v":1,"id":null,"error":{"code":"bad-request"}}\n')

        thread = threading.Thread(target=answer_in_clear)
        thread.start()
        with pytest.raises(
            ChannelError, match=r"TLS 1\.3 handshake with the agent at 127\.0\.0\.1:\d+ failed"
        ):
            dial("127.0.0.1", port, identity=orch.identity, pin=None, trust=orch.trust, timeout=WAIT)
        thread.join()
    with pytest.raises(ChannelError, match=r"cannot connect to the agent at 127\.0\.0\.1") as caught:
        dial("127.0.0.1", port, identity=orch.identity, pin=None, trust=orch.trust, timeout=WAIT)
    assert not isinstance(caught.value, UntrustedPeer)


# -- the blocking accept and the message parser ----------------------------------------------------------


def test_accept_skips_refused_peers_and_returns_the_trusted_one(tmp_path: Path) -> None:
    agent_id = Identity.load_or_create(tmp_path / "a", Role.AGENT)
    trust = TrustStore(tmp_path / "a" / "trust")
    orch = orchestrator(tmp_path, "orch")
    stranger = orchestrator(tmp_path, "stranger")
    trust.add(Role.ORCHESTRATOR, orch.identity.pem)
    log = Log()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        got: list[str] = []
        thread = threading.Thread(
            target=lambda: got.append(accept(listener, server_context(agent_id, trust), log=log)[1])
        )
        thread.start()
        with pytest.raises(UntrustedPeer):
            dial("127.0.0.1", port, identity=stranger.identity, pin=agent_id.fingerprint, trust=orch.trust)
        dial("127.0.0.1", port, identity=orch.identity, pin=agent_id.fingerprint, trust=orch.trust).close()
        thread.join()
    assert got == [orch.identity.fingerprint]
    assert stranger.identity.fingerprint in log.wait_for("refused")


def test_first_certificate_reads_a_tls13_certificate_message() -> None:
    der = os.urandom(300)
    entry = len(der).to_bytes(3, "big") + der + b"\x00\x00"
    body = b"\x00" + len(entry).to_bytes(3, "big") + entry
    message = b"\x0b" + len(body).to_bytes(3, "big") + body
    assert first_certificate(message) == der
    assert first_certificate(body) == der
    assert first_certificate(b"\x0b\x00\x00\x04\x00\x00\x00\x00") is None  # no certificate sent
    assert first_certificate(message[:-100]) is None  # truncated
    assert first_certificate(b"") is None


# -- the RPC over the channel, with its reader thread and concurrent callers ------------------------------


def test_rpc_over_mutual_tls_with_concurrent_calls_and_events(tmp_path: Path) -> None:
    """RpcClient reads in one thread while callers write from others; the TLS socket must take it."""
    agent_id = Identity.load_or_create(tmp_path / "a", Role.AGENT)
    trust = TrustStore(tmp_path / "a" / "trust")
    orch = orchestrator(tmp_path, "orch")
    trust.add(Role.ORCHESTRATOR, orch.identity.pem)
    server = build_server()
    with TlsListener(socket.create_server(("127.0.0.1", 0)), agent_id, trust, log=Log()) as listener:

        def serve_one() -> None:
            conn, _ = listener.accept(timeout=WAIT)
            server.serve_connection(conn)

        thread = threading.Thread(target=serve_one, daemon=True)
        thread.start()
        conn = dial("127.0.0.1", listener.address[1], identity=orch.identity, pin=agent_id.fingerprint,
                    trust=orch.trust)  # fmt: skip
        events: list[str] = []
        client = greeted(RpcClient(conn, peer="the TLS agent", on_event=lambda e, p: events.append(e)), WAIT)
        failures: list[BaseException] = []

        def caller(n: int) -> None:
            try:
                for i in range(20):
                    assert client.call("echo", {"n": n, "i": i}, timeout=WAIT)["params"] == {"n": n, "i": i}
                    assert len(client.call("big", {"size": 200_000}, timeout=WAIT)) == 200_000
                    assert client.call("count", {"n": 5}, timeout=WAIT) == 5
            except BaseException as err:
                failures.append(err)

        callers = [threading.Thread(target=caller, args=(n,)) for n in range(6)]
        for each in callers:
            each.start()
        for each in callers:
            each.join()
        client.close()
        thread.join(WAIT)
    assert failures == []
    assert events.count("progress") == 6 * 20 * 5


def test_full_duplex_streams_both_ways_at_once(tmp_path: Path) -> None:
    """A reader thread and a writer thread on each end, 8 MiB each way, checked byte for byte."""
    agent_id = Identity.load_or_create(tmp_path / "a", Role.AGENT)
    trust = TrustStore(tmp_path / "a" / "trust")
    orch = orchestrator(tmp_path, "orch")
    trust.add(Role.ORCHESTRATOR, orch.identity.pem)
    up, down = os.urandom(8 << 20), os.urandom(8 << 20)
    digests: dict[str, str] = {}
    with TlsListener(socket.create_server(("127.0.0.1", 0)), agent_id, trust, log=Log()) as listener:
        server_thread = threading.Thread(
            target=lambda: _duplex(listener.accept(WAIT)[0], down, "server", digests)
        )
        server_thread.start()
        conn = dial("127.0.0.1", listener.address[1], identity=orch.identity, pin=agent_id.fingerprint,
                    trust=orch.trust)  # fmt: skip
        _duplex(conn, up, "client", digests)
        server_thread.join(WAIT)
    assert digests == {"server": hashlib.sha256(up).hexdigest(), "client": hashlib.sha256(down).hexdigest()}


def _duplex(conn: ssl.SSLSocket, data: bytes, name: str, digests: dict[str, str]) -> None:
    """Send ``data`` in small pieces from one thread while this one reads what the peer sends."""

    def write() -> None:
        for start in range(0, len(data), 3000):
            conn.sendall(data[start : start + 3000])

    writer = threading.Thread(target=write)
    writer.start()
    received = hashlib.sha256()
    left = len(data)
    while left:
        chunk = conn.recv(min(left, 5000))
        assert chunk, f"{name}: end of stream with {left} bytes to go"
        received.update(chunk)
        left -= len(chunk)
    writer.join()
    digests[name] = received.hexdigest()
    conn.close()
