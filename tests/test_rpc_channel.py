"""The control channel between real processes: spawn_child + the selftest server, TCP, raw sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from confplan.rpc import (
    MAX_MESSAGE,
    PROTOCOL_VERSION,
    ChildClient,
    MessageTooLarge,
    PeerGone,
    ProtocolError,
    RemoteError,
    RpcClient,
    RpcTimeout,
    VersionMismatch,
    connect_tcp,
    spawn_child,
)
from confplan.rpc.selftest import build_server

SELFTEST = [sys.executable, "-m", "confplan.rpc.selftest"]


@pytest.fixture
def child() -> Iterator[ChildClient]:
    client = spawn_child(SELFTEST, timeout=20)
    yield client
    client.close()


def test_round_trip_and_events(child: ChildClient) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    child.on_event = lambda event, params: events.append((event, params))
    answer = child.call("echo", {"a": [1, 2], "b": "ü"})
    assert answer["params"] == {"a": [1, 2], "b": "ü"}
    assert answer["pid"] == child.child.pid != os.getpid()
    assert child.call("count", {"n": 4}) == 4
    # Events are read (in order) before the answer that follows them on the stream.
    assert events == [("progress", {"done": n, "total": 4}) for n in range(1, 5)]
    assert child.server_info["version"] == PROTOCOL_VERSION
    assert "echo" in child.server_info["methods"]


def test_concurrent_calls_get_their_own_answers(child: ChildClient) -> None:
    answers: dict[int, Any] = {}

    def ask(n: int) -> None:
        answers[n] = child.call("echo", {"n": n})["params"]["n"]

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == {n: n for n in range(8)}


def test_handler_errors_come_back_typed_and_the_channel_survives(child: ChildClient) -> None:
    with pytest.raises(RemoteError) as refused:
        child.call("fail", {"message": "no such disk /dev/x", "hint": "check the plan"})
    assert refused.value.code == "failed"
    assert refused.value.message == "the VMM process: no such disk /dev/x"
    assert refused.value.hint == "check the plan"
    with pytest.raises(RemoteError) as bug:
        child.call("bug")
    assert bug.value.code == "internal" and "ValueError: a bug in the handler" in bug.value.message
    with pytest.raises(RemoteError) as unknown:
        child.call("nope")
    assert unknown.value.code == "unknown-method" and "'nope'" in unknown.value.message
    assert child.call("echo", {"still": "alive"})["params"] == {"still": "alive"}


def test_peer_exit_mid_call(child: ChildClient) -> None:
    with pytest.raises(PeerGone) as gone:
        child.call("crash", {"code": 7})
    message = gone.value.message
    assert message.startswith("the VMM process exited with code 7: selftest: crashing on purpose with code 7")
    assert "during call 'crash'" in message
    with pytest.raises(PeerGone) as later:  # later calls fail at once, not after a timeout
        child.call("echo", timeout=60)
    assert not child.connected
    # in the same words, naming the call: whether the peer went before or during a call is a race
    assert later.value.message.replace("'echo'", "'crash'") == message


def test_peer_killed_mid_call(child: ChildClient) -> None:
    # Killed once it is inside the call (it says so with an event), not before the call was sent.
    child.on_event = lambda event, params: os.kill(child.child.pid, signal.SIGKILL)
    with pytest.raises(PeerGone) as gone:
        child.call("sleep", {"seconds": 30}, timeout=20)
    assert "was killed by SIGKILL" in gone.value.message and "during call 'sleep'" in gone.value.message


def test_timeout_then_the_late_answer_is_dropped(child: ChildClient) -> None:
    with pytest.raises(RpcTimeout, match=r"did not answer 'sleep' within 0.2s"):
        child.call("sleep", {"seconds": 0.6}, timeout=0.2)
    # Calls are served in order: this answer comes after the late one, which must not be taken for it.
    assert child.call("echo", {"after": 1}, timeout=10)["params"] == {"after": 1}


def test_oversized_request_is_refused_before_sending(child: ChildClient) -> None:
    with pytest.raises(MessageTooLarge, match="more than the limit"):
        child.call("echo", {"blob": "x" * MAX_MESSAGE})
    assert child.call("echo", {"ok": True})["params"] == {"ok": True}


def test_oversized_answer_becomes_an_error(child: ChildClient) -> None:
    with pytest.raises(RemoteError) as caught:
        child.call("big", {"size": MAX_MESSAGE + 10})
    assert caught.value.code == "too-large"
    assert len(child.call("big", {"size": 1000})) == 1000


def test_client_of_another_version_is_refused() -> None:
    ours, theirs = socket.socketpair()
    threading.Thread(target=build_server().serve_connection, args=(theirs,), daemon=True).start()
    with RpcClient(ours, version=PROTOCOL_VERSION + 1) as client, pytest.raises(VersionMismatch) as caught:
        client.hello(timeout=10)
    text = caught.value.message
    assert f"v{PROTOCOL_VERSION}" in text and f"v{PROTOCOL_VERSION + 1}" in text


def test_server_of_another_version_is_refused() -> None:
    with pytest.raises(VersionMismatch) as caught:
        spawn_child([*SELFTEST, "--speak", str(PROTOCOL_VERSION + 1)], timeout=20)
    assert caught.value.message == (
        f"the VMM process speaks confplan RPC v{PROTOCOL_VERSION + 1}, this side speaks v{PROTOCOL_VERSION}"
    )
    assert caught.value.hint and "same confplan release" in caught.value.hint


def _raw_server() -> tuple[socket.socket, Any]:
    ours, theirs = socket.socketpair()
    threading.Thread(target=build_server().serve_connection, args=(theirs,), daemon=True).start()
    return ours, ours.makefile("rb")


def _ask(sock: socket.socket, reader: Any, line: bytes) -> dict[str, Any]:
    sock.sendall(line)
    answer: dict[str, Any] = json.loads(reader.readline())
    return answer


def test_server_refuses_calls_before_hello_and_bad_lines() -> None:
    sock, reader = _raw_server()
    with sock, reader:
        early = _ask(sock, reader, b'{"v":1,"id":1,"method":"echo","params":{}}\n')
        assert early["error"]["code"] == "hello-first"
        assert _ask(sock, reader, b"not json\n")["error"]["code"] == "bad-request"
        assert _ask(sock, reader, b'{"v":1,"id":"x","method":"echo"}\n')["error"]["code"] == "bad-request"
        hello = _ask(sock, reader, b'{"v":1,"id":2,"method":"hello","params":{"version":1}}\n')
        assert hello == {"v": 1, "id": 2, "result": hello["result"]} and hello["result"]["version"] == 1
        assert _ask(sock, reader, b'{"v":1,"id":3,"method":"echo","params":{"k":1}}\n')["id"] == 3


def test_server_refuses_an_oversized_line_and_hangs_up() -> None:
    sock, reader = _raw_server()
    with sock, reader:
        sock.sendall(b'{"v":1,"id":1,"method":"hello","params":{}}\n')
        reader.readline()
        sock.sendall(b'{"v":1,"id":2,"method":"echo","params":{"x":"' + b"y" * (MAX_MESSAGE + 1))
        answer = json.loads(reader.readline())
        assert answer["error"]["code"] == "too-large" and answer["id"] is None
        assert reader.readline() == b""  # closed


def test_client_refuses_an_oversized_line_from_the_peer() -> None:
    ours, theirs = socket.socketpair()
    client = RpcClient(ours, peer="the target VMM", max_message=1024)

    def misbehave() -> None:
        theirs.makefile("rb").readline()
        theirs.sendall(b'{"v":1,"id":1,"result":"' + b"z" * 5000 + b'"}\n')

    threading.Thread(target=misbehave, daemon=True).start()
    with client, pytest.raises(ProtocolError, match=r"the target VMM broke the protocol: .*longer than"):
        client.call("anything", timeout=10)
    theirs.close()


def test_tcp_round_trip() -> None:
    server = subprocess.Popen([*SELFTEST, "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().split()[1])
        with connect_tcp("127.0.0.1", port) as client:
            assert client.call("echo", {"over": "tcp"})["params"] == {"over": "tcp"}
            assert client.peer == f"the agent at 127.0.0.1:{port}"
        with connect_tcp("127.0.0.1", port) as again:  # one thread per connection: a second one works
            assert again.call("count", {"n": 2}) == 2
    finally:
        server.kill()
        server.wait()


def test_tcp_connect_refused_is_clear() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound but not listening: connections are refused
        with pytest.raises(PeerGone, match=f"cannot connect to the agent at 127.0.0.1:{port}"):
            connect_tcp("127.0.0.1", port, timeout=5)


def test_spawn_of_a_missing_program_is_clear() -> None:
    with pytest.raises(PeerGone, match="cannot start the VMM process"):
        spawn_child(["/nonexistent/confplan-vmm"])


def test_child_that_exits_before_hello() -> None:
    with pytest.raises(PeerGone) as gone:
        spawn_child([sys.executable, "-c", "import sys; sys.exit('vmm: no /dev/kvm')"], timeout=20)
    assert "exited with code 1: vmm: no /dev/kvm" in gone.value.message
    assert "during call 'hello'" in gone.value.message


def test_close_reaps_the_child(child: ChildClient) -> None:
    child.close()
    assert child.returncode == 0  # it saw end of stream and exited on its own
