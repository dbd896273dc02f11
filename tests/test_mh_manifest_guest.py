"""Mailbox v5 in booted guests (real KVM): a source and an mh_only target, each launched through the
emulated secure processor with the owner's broker releasing the same transport key; every private page
sealed by the source's helper and opened by the target's. Then the source helper seals the manifest and
the target helper checks it (and refuses every way it can differ), the vCPU register state goes through
SEAL_STATE / OPEN_STATE into the target's VMSA slots, and the emulated "hardware" loads the vCPUs from
there, after which the guest runs on the target and its ledger passes. The test reads MH memory through
the raw host mapping, as only a test may; the VMM's own read API refuses the VMSA slots."""

from __future__ import annotations

import array
import dataclasses
import os
import time
from dataclasses import dataclass

import pytest
from launcher import Launcher, move_sealed

from confplan.errors import ConfplanError
from confplan.migration import mailbox_layout as mbx
from confplan.migration.helper import open_mailboxes
from confplan.migration.mailbox_set import MailboxSet
from confplan.migration.manifest import ManifestRefused, state_hash
from confplan.migration.session import vcpu_blob
from confplan.migration.target import apply_enc_bitmap
from confplan.vmm import Machine, MachineConfig, abi, vmsa_slot

pytestmark = pytest.mark.kvm

MEM = 32 * abi.MIB
PAGE = abi.PAGE
NPAGES = MEM // PAGE
CHUNK = mbx.MANIFEST_CHUNK_PAGES  # verify's 8 MiB chunks: 4 of them
KEY = bytes(range(32))


@dataclass
class Migrated:
    """A source whose every workload page the target placed; the source's guest paused."""

    src: Machine
    dst: Machine
    src_mb: MailboxSet
    dst_mb: MailboxSet
    blobs: list[bytes]  # the source VMM's vCPU state blobs (what VCPU_STATE frames carry)
    launcher: Launcher

    @property
    def bitmap(self) -> bytes:
        return bytes(self.src.enc_bitmap.bitmap.view())

    @property
    def state_hash(self) -> bytes:
        return state_hash([*self.blobs, self.bitmap])

    def move(self, gpas: array.array[int], generation: int, *, skip: int | None = None) -> None:
        """SAVE on the source, frame with the C core, unframe into the target's slots, LOAD; the record of
        GPA ``skip`` is dropped on the way."""
        move_sealed(self.src_mb, self.dst_mb, gpas, generation, MEM, skip=skip)

    def seal(self, **kwargs: object) -> bytes:
        args: dict[str, object] = {"enc_bitmap": self.bitmap, "state_hash": self.state_hash, "rounds": 1}
        args.update(kwargs)
        return self.src_mb.seal_manifest(0, NPAGES, **args)  # type: ignore[arg-type]

    def check(self, sealed: bytes, **kwargs: object) -> None:
        args: dict[str, object] = {"enc_bitmap": self.bitmap, "state_hash": self.state_hash, "rounds": 1}
        args.update(kwargs)
        self.dst_mb.check_manifest(sealed, 0, NPAGES, **args)  # type: ignore[arg-type]


@pytest.fixture
def migrated(launcher: Launcher, request: pytest.FixtureRequest) -> Migrated:
    """Helper mode aux-vcpu, or the test's parameter (``indirect``)."""
    mode = getattr(request, "param", "aux-vcpu")
    helper: dict[str, object] = (
        {"aux_vcpus": 2} if mode == "aux-vcpu" else {"helper_mode": "mirror-vm", "mirror_vcpus": 2}
    )
    mig = os.urandom(16)
    src_cfg = MachineConfig(memory=MEM, vcpus=2, workload_kind="quiet", batch_pages=64, measured_launch=True,
                            **helper)  # type: ignore[arg-type]  # fmt: skip
    src = launcher.boot(src_cfg, KEY, mig)
    dst = launcher.boot(dataclasses.replace(src_cfg, mh_only=True), KEY, mig)
    src.wait_workload(abi.EV_WL_FILLED)
    src.pause_all_vcpus_except_aux()
    src_mb, dst_mb = open_mailboxes(src), open_mailboxes(dst)
    assert src_mb.init().migration_id == dst_mb.init().migration_id == mig
    blobs = [vcpu_blob(state, time.time()) for state in src.save_vcpu_states()]
    m = Migrated(src, dst, src_mb, dst_mb, blobs, launcher)
    mask = src.layout.guest_page_mask()  # (v7) every guest page, the CPL0 area included
    m.move(array.array("Q", (i * PAGE for i in range(MEM // PAGE) if mask >> i & 1)), 1)
    apply_enc_bitmap(dst, m.bitmap)  # what the target's stream does at DONE
    return m


def test_a_migrations_manifest_checks_and_any_changed_byte_is_refused(migrated: Migrated) -> None:
    sealed = migrated.seal()
    migrated.check(sealed)
    for i in range(len(sealed)):
        bad = bytearray(sealed)
        bad[i] ^= 1 << (i % 8)
        with pytest.raises(ManifestRefused) as err:
            migrated.check(bytes(bad))
        assert err.value.status == mbx.MhStatus.MANIFEST_AUTH, i
    migrated.check(sealed)
    migrated.src.check()
    migrated.dst.check()


def test_a_manifest_of_another_migration_is_refused(migrated: Migrated) -> None:
    """A third machine, launched with the same key but the owner's other migration id."""
    cfg = dataclasses.replace(migrated.dst.config)
    other = migrated.launcher.boot(cfg, KEY, os.urandom(16))
    mbs = open_mailboxes(other)
    mbs.init()
    with pytest.raises(ManifestRefused) as err:
        mbs.check_manifest(
            migrated.seal(), 0, NPAGES, enc_bitmap=migrated.bitmap, state_hash=migrated.state_hash, rounds=1
        )
    assert (err.value.status, err.value.field) == (mbx.MhStatus.MANIFEST_ID, "migration id")


def test_a_target_missing_a_final_generation_is_refused(migrated: Migrated) -> None:
    wl = migrated.src.layout.wl_base
    last = array.array("Q", [wl + 5 * PAGE, MEM - 3 * PAGE, MEM - 2 * PAGE])
    migrated.move(last, 2, skip=MEM - 3 * PAGE)  # the final round loses one record
    with pytest.raises(ManifestRefused) as err:
        migrated.check(migrated.seal())
    chunk = (MEM - 3 * PAGE) // PAGE // CHUNK
    assert (err.value.status, err.value.index) == (mbx.MhStatus.MANIFEST_GENERATIONS, chunk)
    assert err.value.field == "generation table" and f"chunk {chunk}" in err.value.message


def test_a_target_missing_a_cpl0_page_is_refused(migrated: Migrated) -> None:
    """(v7) The manifest covers the guest's CPL0 area: a final round that loses the record of a workload
    vCPU's CPL0 stack (a timer frame) is refused like any other page."""
    last = array.array("Q", [abi.GDT_GPA, abi.KSTACK_GPA])
    migrated.move(last, 2, skip=abi.KSTACK_GPA)
    with pytest.raises(ManifestRefused) as err:
        migrated.check(migrated.seal())
    assert (err.value.status, err.value.index) == (mbx.MhStatus.MANIFEST_GENERATIONS, 0)


def test_a_different_bitmap_or_state_is_named(migrated: Migrated) -> None:
    sealed = migrated.seal()
    flipped = bytearray(migrated.bitmap)
    flipped[-1] ^= 0x80  # the last page: shared on the target's side
    with pytest.raises(ManifestRefused) as err:
        migrated.check(sealed, enc_bitmap=bytes(flipped))
    assert (err.value.status, err.value.field) == (mbx.MhStatus.MANIFEST_BITMAP, "encryption bitmap")
    edited = [blob.replace(b'"rax": ', b'"rax": 1') for blob in migrated.blobs]
    with pytest.raises(ManifestRefused) as err:
        migrated.check(sealed, state_hash=state_hash([*edited, migrated.bitmap]))
    assert (err.value.status, err.value.field) == (mbx.MhStatus.MANIFEST_STATE, "state hash")


def _raw_ram(m: Machine, gpa: int, n: int) -> bytes:
    return m.ram.read(gpa, n)


def test_sealed_state_reaches_only_the_vmsa_slot_a_changed_byte_nothing(migrated: Migrated) -> None:
    dst = migrated.dst
    blob = migrated.blobs[1]
    record = migrated.src_mb.seal_state(1, blob)
    assert blob not in record and len(record) == mbx.SEALED_HEAD + len(blob)
    slot_gpa = dst.layout.vmsa_slot_gpa(1)
    empty = _raw_ram(dst, slot_gpa, abi.VMSA_SLOT_SIZE)
    for i in (*range(0, mbx.SEALED_HEAD, 3), mbx.SEALED_HEAD, len(record) // 2, len(record) - 1):
        bad = bytearray(record)
        bad[i] ^= 0x04
        with pytest.raises(mbx.MailboxError) as err:
            migrated.dst_mb.open_state(1, bytes(bad))
        assert err.value.status == mbx.MhStatus.AUTH, i
        assert _raw_ram(dst, slot_gpa, abi.VMSA_SLOT_SIZE) == empty, i
    migrated.dst_mb.open_state(1, record)
    head = _raw_ram(dst, slot_gpa, abi.VMSA_SLOT_HEADER)
    data = _raw_ram(dst, slot_gpa + abi.VMSA_SLOT_HEADER, abi.VMSA_DATA_BYTES)
    assert int.from_bytes(head[:4], "little") == abi.VMSA_MAGIC
    assert int.from_bytes(head[12:16], "little") == len(blob)
    assert data[: len(blob)] == blob  # exactly the blob, and not in the mailbox data area
    assert all(blob[:48] not in bytes(mb.slots) for mb in migrated.dst_mb.mailboxes)
    # the VMM's own API refuses the slots, like the secret page
    for gpa, n in ((slot_gpa, 16), (dst.layout.mh_vmsa_gpa - 8, 16), (dst.layout.mh_mac_gpa, 32 * abi.MIB)):
        for read in (dst.read, dst.view):
            with pytest.raises(ConfplanError, match="VMSA slots"):
                read(gpa, n)
    dst.check()


@pytest.mark.parametrize("migrated", ["aux-vcpu", "mirror-vm"], indirect=True)
def test_sev_es_state_is_loaded_only_from_verified_slots_and_the_guest_runs_on(migrated: Migrated) -> None:
    src, dst = migrated.src, migrated.dst
    records = [migrated.src_mb.seal_state(i, blob) for i, blob in enumerate(migrated.blobs)]
    sealed = migrated.seal()  # binds the tags of the states just sealed
    # a relay's edit of one register byte: refused, and the (emulated) CPU loads nothing unverified
    tampered = bytearray(records[0])
    tampered[-5] ^= 1
    with pytest.raises(mbx.MailboxError) as err:
        migrated.dst_mb.open_state(0, bytes(tampered))
    assert err.value.status == mbx.MhStatus.AUTH
    migrated.dst_mb.open_state(1, records[1])
    with pytest.raises(ManifestRefused) as refused:
        migrated.check(sealed)
    assert (refused.value.status, refused.value.index) == (mbx.MhStatus.MANIFEST_VMSA, 0)
    with pytest.raises(vmsa_slot.VmsaSlotError, match="vCPU 0's VMSA slot is empty"):
        vmsa_slot.load_vcpus(dst, now_wall=time.time())
    # the real records: checked, verified, loaded by the emulated CPU; the guest runs on the target
    migrated.dst_mb.open_state(0, records[0])
    assert vmsa_slot.slot_header(dst, 0).state == abi.VMSA_OPENED
    with pytest.raises(vmsa_slot.VmsaSlotError, match=r"opened \(not verified\)"):
        vmsa_slot.load_vcpus(dst, now_wall=time.time())
    migrated.check(sealed)
    assert [vmsa_slot.slot_header(dst, i).state for i in (0, 1)] == [abi.VMSA_VERIFIED] * 2
    gap = vmsa_slot.load_vcpus(dst, now_wall=time.time())
    assert 0 <= gap < 60
    want = [s.regs for s in src.save_vcpu_states()]
    assert [s.regs for s in dst.save_vcpu_states()] == want
    dst.resume_all_vcpus_except_aux()
    assert dst.workload.check().ok
    src.resume_all_vcpus_except_aux()  # the source was never touched
    assert src.workload.check().ok
