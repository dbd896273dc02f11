"""Measured launches for tests of the helper in booted guests: each machine launched through the emulated
secure processor, the owner's broker allowing exactly its launch digest and releasing the given key."""

from __future__ import annotations

from pathlib import Path

from confplan.sev import EmulatedSecureProcessor, KeyBroker, OwnerPolicy
from confplan.sev.policy import encode_sev_policy
from confplan.vmm import Machine, MachineConfig
from confplan.vmm.bootparams import HostCpu
from confplan.vmm.firmware import Firmware
from confplan.vmm.launch_blobs import expected_launch_digest
from confplan.vmm.sev_launch import launch_with_broker

POLICY = encode_sev_policy(nodbg=True, noks=True, api_major=1, api_minor=40)


class Launcher:
    """Boots measured machines whose digests the owner allowed, each with its own broker release."""

    def __init__(self, psp: EmulatedSecureProcessor, host: HostCpu, owner_dir: Path) -> None:
        self.psp, self.host, self.owner_dir = psp, host, owner_dir
        self.machines: list[Machine] = []

    def boot(self, config: MachineConfig, key: bytes, migration_id: bytes | None = None) -> Machine:
        digest = expected_launch_digest(config, Firmware.load(), self.host).hex()
        owner = OwnerPolicy(
            allowed_digests=[digest], allowed_policies=[POLICY], min_api="1.40", trust_emulated_platform=True
        )
        broker = KeyBroker.init(self.owner_dir, owner, force=True)
        m = Machine(config)
        self.machines.append(m)
        launch_with_broker(m, self.psp, broker, POLICY, key, migration_id=migration_id)
        m.start()
        return m

    def close(self) -> None:
        for m in reversed(self.machines):
            m.close()
