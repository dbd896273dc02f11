"""A remote agent against strangers and against its own orchestrator (issue 10), with real processes, real
TLS and real files: a stranger is refused in the handshake for every method, before any runs, and the agent
logs who it refused; a wrong pin stops the orchestrator before it sends a byte; even the enrolled
orchestrator cannot make the agent run a source, dial out, or write where it chooses."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from agents import Agent

from confplan.agent import handle as vmm_handle
from confplan.agent.service import _METHODS
from confplan.rpc import RemoteError
from confplan.transport import Identity, Role, UntrustedPeer
from confplan.vmm import MachineConfig, abi

pytestmark = pytest.mark.kvm


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    running = Agent.start(tmp_path)
    yield running
    running.stop()


def test_a_stranger_is_refused_for_every_method_before_any_runs(agent: Agent, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger-home"
    fingerprint = Identity.load_or_create(stranger, Role.ORCHESTRATOR).fingerprint
    for method in ["hello", "info", *_METHODS]:
        with pytest.raises(UntrustedPeer) as refused:
            handle = vmm_handle.connect_remote("127.0.0.1", agent.port, "target", pin=agent.fingerprint,
                                               home=stranger)  # fmt: skip
            handle.call(method)  # never reached
        assert fingerprint in refused.value.message and agent.fingerprint in refused.value.message
        assert "confplan trust add --orchestrator" in (refused.value.hint or "")
    log = agent.log()
    assert log.count("refused 127.0.0.1") >= len(_METHODS) and fingerprint in log
    assert "create" not in log and "info" not in log  # no method ever ran for it


def test_plain_tcp_gets_nothing(agent: Agent) -> None:
    hello = {"v": 1, "id": 1, "method": "hello", "params": {"version": 1}}
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as sock:
        sock.sendall(json.dumps(hello).encode() + b"\n")
        sock.settimeout(12)
        try:
            answer = sock.recv(4096)
        except ConnectionResetError:
            answer = b""
    assert b"{" not in answer  # at most a TLS alert, never an RPC answer
    assert "does not speak TLS 1.3" in agent.wait_log("does not speak TLS 1.3")


def test_a_wrong_pin_stops_the_orchestrator_before_it_sends_a_byte(agent: Agent) -> None:
    wrong = "sha256:" + "ab" * 32
    with pytest.raises(UntrustedPeer) as refused:
        vmm_handle.connect_remote("127.0.0.1", agent.port, "target", pin=wrong, home=agent.orchestrator_home)
    assert wrong in refused.value.message and agent.fingerprint in refused.value.message
    assert "confplan identity show --role agent" in (refused.value.hint or "")


def test_the_agent_takes_nothing_dangerous_from_its_orchestrator(agent: Agent, tmp_path: Path) -> None:
    handle = vmm_handle.connect_remote("127.0.0.1", agent.port, "target", pin=agent.fingerprint,
                                       home=agent.orchestrator_home)  # fmt: skip
    try:
        config = {"memory": 32 * abi.MIB, "aux_vcpus": 1}
        with pytest.raises(RemoteError, match="serves migration targets only"):
            handle.call("create", {"role": "source", "config": config})
        sneaky = tmp_path / "cron-job"
        with pytest.raises(RemoteError, match="'console_log' are not accepted"):
            handle.call("create", {"role": "target", "config": {**config, "console_log": str(sneaky)}})
        assert not sneaky.exists()
        handle.call("create", {"role": "target", "config": {**config, "mh_only": True}})
        with pytest.raises(RemoteError, match="only a source VMM serves 'connect_outgoing'"):
            handle.call("connect_outgoing", {"host": "127.0.0.1", "port": 9, "migration_id": "00" * 16})
        assert MachineConfig(memory=32 * abi.MIB).console_log is None
    finally:
        handle.close()
    log = agent.wait_log("refused 'connect_outgoing'")
    orchestrator = Identity.load_or_create(agent.orchestrator_home, Role.ORCHESTRATOR).fingerprint
    assert f"refused 'create' from {orchestrator}" in log
    assert f"refused 'connect_outgoing' from {orchestrator}" in log
