"""The VMM process on its own: it outlives the orchestrator's connection (a later apply reconnects through
its socket in the checkpoint folder), refuses calls out of order with a clear message, and stops on
`shutdown`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from confplan.agent import handle as vmm_handle
from confplan.agent.handle import VmmHandle
from confplan.rpc import RemoteError
from confplan.vmm import MachineConfig, abi

pytestmark = pytest.mark.kvm


@pytest.fixture
def source(tmp_path: Path) -> Iterator[VmmHandle]:
    handle = vmm_handle.start_local(tmp_path, "source")
    yield handle
    found = vmm_handle.find_local(tmp_path, "source")
    if found is not None:
        vmm_handle.stop(found)


def _config() -> dict[str, object]:
    return dataclasses.asdict(MachineConfig(memory=32 * abi.MIB, aux_vcpus=1, shared_fraction=0.1))


def test_vmm_outlives_its_orchestrator_and_is_found_again(tmp_path: Path, source: VmmHandle) -> None:
    source.call("create", {"role": "source", "config": _config()})
    source.call("start")
    pid = source.pid
    source.close()  # the orchestrator goes away (crash, Ctrl-C)
    again = vmm_handle.find_local(tmp_path, "source")
    assert again is not None and again.pid == pid
    info = again.call("info")
    assert info["running"] and info["role"] == "source"
    assert again.call("workload_check")["ok"]
    vmm_handle.stop(again)
    assert vmm_handle.find_local(tmp_path, "source") is None
    assert not vmm_handle.socket_path(tmp_path, "source").exists()


def test_calls_out_of_order_are_refused_with_a_reason(source: VmmHandle) -> None:
    with pytest.raises(RemoteError, match="no machine yet"):
        source.call("start")
    source.call("create", {"role": "source", "config": _config()})
    with pytest.raises(RemoteError, match="already holds a source machine"):
        source.call("create", {"role": "source", "config": _config()})
    with pytest.raises(RemoteError, match="no measured SEV launch in progress"):
        source.call("launch_secret", {"header": "", "ciphertext": ""})
    with pytest.raises(RemoteError, match="no finished SEV-SNP launch"):
        source.call("key_request", {"nonce": "AA=="})
    source.call("start")
    with pytest.raises(RemoteError, match="only a target VMM"):
        source.call("listen_incoming", {"migration_id": "00" * 16})
    with pytest.raises(RemoteError, match="no outgoing migration stream"):
        source.call("precopy_round")


def test_start_local_replaces_a_stale_socket(tmp_path: Path) -> None:
    stale = vmm_handle.socket_path(tmp_path, "target")
    stale.write_text("")  # a socket file left by a VMM that was killed
    handle = vmm_handle.start_local(tmp_path, "target")
    try:
        assert handle.call("info")["pid"] == handle.pid
    finally:
        vmm_handle.stop(handle)


def test_a_machine_without_dirty_log_refuses_to_send(source: VmmHandle) -> None:
    """A target is built without a dirty log (and with its RAM allocated up front): it cannot be a source."""
    config = {**_config(), "dirty_logging": False, "prefault": True}
    source.call("create", {"role": "source", "config": config})
    with pytest.raises(RemoteError, match="keeps no dirty log") as err:
        source.call("connect_outgoing", {"host": "127.0.0.1", "port": 9, "migration_id": "00" * 16})
    assert "launch-source" in str(err.value.hint)
