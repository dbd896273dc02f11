"""Measured launches for tests of the helper in booted guests: each machine launched through the emulated
secure processor, the owner's broker allowing exactly its launch digest and releasing the given key; and
``move_sealed``, the pages of one such guest moved into another through the real helpers and C core."""

from __future__ import annotations

import array
from pathlib import Path

from confplan.core import frame_sealed_pages, unframe_sealed_pages
from confplan.core.wire import sealed_frame_size
from confplan.migration import mailbox_layout as mbx
from confplan.migration.mailbox_set import MailboxSet
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


def move_sealed(
    src: MailboxSet, dst: MailboxSet, gpas: array.array[int], generation: int, ram_size: int, *,
    skip: int | None = None,
) -> list[bytes]:  # fmt: skip
    """SAVE on the source in batches over all its MH vCPUs, frame each mailbox's records with the C core,
    unframe each frame into one target mailbox's slots, LOAD (each refusal fails the test); the record of
    GPA ``skip`` is dropped on the way. Returns the frames."""
    frames: list[bytes] = []
    for first in range(0, len(gpas), src.capacity):
        chunk = gpas[first : first + src.capacity]
        counts = [0] * len(dst.mailboxes)
        offset = 0
        for i, (_, result) in enumerate(src.save(chunk, generation)):
            n = len(result.statuses)
            mine = chunk[offset : offset + n]
            offset += n
            frame = bytearray(sealed_frame_size(n))
            frame_sealed_pages(result.records, n, frame, seq=len(frames), ram_size=ram_size,
                               expected_gpas=mine)  # fmt: skip
            frames.append(bytes(frame))
            keep = [j for j, gpa in enumerate(mine) if gpa != skip]
            scratch = bytearray(n * mbx.SLOT_SIZE)
            unframe_sealed_pages(frame, scratch, ram_size=ram_size)
            packed = b"".join(scratch[j * mbx.SLOT_SIZE : (j + 1) * mbx.SLOT_SIZE] for j in keep)
            dst.mailboxes[i].slots[: len(packed)] = packed
            counts[i] = len(keep)
        for result in dst.load(counts):
            assert result.n_refused == 0, result.refused()[:3]
    return frames
