"""The migration helper inside booted guests: a source (workload ran, pages private) and an mh_only target,
each launched through the emulated secure processor with the owner's broker releasing the same transport
key; pages sealed by the source's MH, framed by the C core, unframed into the target's slots and opened by
the target's MH. Refusals (tampering, wrong GPA, replay, wrong key) are checked in the real guest, and the
test reads both guests' RAM through the raw host mappings (as only a test may) to check every byte."""

from __future__ import annotations

import array
import dataclasses
import os
import struct

import pytest
from launcher import Launcher, move_sealed

from confplan.core import frame_sealed_pages, unframe_sealed_pages
from confplan.core.wire import sealed_frame_size
from confplan.migration.helper import open_mailboxes
from confplan.migration.mailbox import BatchResult, Mailbox
from confplan.migration.mailbox_layout import SLOT_CT, SLOT_GPA, SLOT_KEY_ID, SLOT_SIZE, MhStatus, Op
from confplan.migration.mailbox_set import MailboxSet
from confplan.vmm import Machine, MachineConfig, abi
from confplan.vmm.cpu_setup import host_cpu_flags
from confplan.vmm.tables import pt_pages

pytestmark = pytest.mark.kvm

MEM = 32 * abi.MIB
PAGE = abi.PAGE
KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))
MARKER = b"CONFPLAN-CANARY!"  # 16 bytes; a canary page is this, repeated
TARGET_FILL = b"\x5a" * PAGE  # the target's pages before LOAD: a write by a refused LOAD would show


def configs(mode: str) -> tuple[MachineConfig, MachineConfig]:
    helper: dict[str, object] = (
        {"aux_vcpus": 2} if mode == "aux-vcpu" else {"helper_mode": "mirror-vm", "mirror_vcpus": 2}
    )
    src = MachineConfig(
        memory=MEM,
        workload_kind="quiet",
        batch_pages=64,
        measured_launch=True,
        **helper,  # type: ignore[arg-type]
    )
    return src, dataclasses.replace(src, mh_only=True)


def raw_read(m: Machine, gpa: int, n: int) -> bytes:
    return m.ram.read(gpa, n)


def raw_write(m: Machine, gpa: int, data: bytes) -> None:
    m.ram.write(gpa, data)


def source_ready(m: Machine) -> None:
    """The workload filled its pages; stop it so the pages hold still (the helper keeps running)."""
    m.wait_workload(abi.EV_WL_FILLED)
    m.pause_all_vcpus_except_aux()


def workload_gpas(m: Machine) -> array.array[int]:
    """Every page of the workload area: all private but the pvclock page (the quiet workload shares
    nothing else), which these tests move sealed like the rest (the helper seals whatever it is given)."""
    assert m.enc_bitmap.shared_pages() == 1 and not m.enc_bitmap.is_private(m.layout.wl_pvclock_gpa // PAGE)
    return array.array("Q", range(m.layout.wl_base, m.config.memory, PAGE))


def guest_gpas(m: Machine) -> array.array[int]:
    """Every guest page (v7): the workload area and the guest's pages below it (CPU tables, boot page, the
    workload's page tables and CPL0 stacks, the firmware image), never the MH's own."""
    mask = m.layout.guest_page_mask()
    return array.array("Q", (i * PAGE for i in range(m.layout.npages) if mask >> i & 1))


def mh_owned_pages(m: Machine) -> set[int]:
    return {gpa // PAGE for start, end in m.layout.mh_owned() for gpa in range(start, end, PAGE)}


def guest_bytes(m: Machine) -> bytes:
    return b"".join(raw_read(m, gpa, PAGE) for gpa in guest_gpas(m))


def move(src: MailboxSet, dst: MailboxSet, gpas: array.array[int], generation: int) -> list[bytes]:
    return move_sealed(src, dst, gpas, generation, MEM)


def gen_table(m: Machine) -> array.array[int]:
    """The MH's anti-replay table, raw (MH-private memory the VMM's API never touches)."""
    table = array.array("I")
    table.frombytes(raw_read(m, m.layout.mh_gen_gpa, m.layout.mh_gen_entries * 4))
    return table


def helper_impls(m: Machine) -> list[str]:
    return [t.split(" aes ")[1].split()[0] for _, t in m.console.lines if t.startswith("mh: helper vCPU")]


@pytest.mark.parametrize("mode", ["aux-vcpu", "mirror-vm"])
def test_source_seals_target_opens_every_private_page(launcher: Launcher, mode: str) -> None:
    src_cfg, dst_cfg = configs(mode)
    a = launcher.boot(src_cfg, KEY)
    b = launcher.boot(dst_cfg, KEY)
    source_ready(a)
    gpas = guest_gpas(a)  # the CPL0 area too, loaded while the target's helper runs on its own tables
    canaries = workload_gpas(a)[3::223]  # spread over the area, so both MH vCPUs seal some
    for gpa in canaries:
        raw_write(a, gpa, MARKER * (PAGE // len(MARKER)))
    mbs_a, mbs_b = open_mailboxes(a), open_mailboxes(b)
    info_a, info_b = mbs_a.init(), mbs_b.init()
    assert (info_a.migration_id, info_a.key_id) == (info_b.migration_id, info_b.key_id)
    assert info_a.sender_id >> 16 == 0 and info_b.sender_id >> 16 == 1  # side from the measured boot page

    frames = move(mbs_a, mbs_b, gpas, generation=1)

    assert guest_bytes(a) == guest_bytes(b)  # every moved page, byte for byte
    assert all(raw_read(b, gpa, len(MARKER)) == MARKER for gpa in canaries)
    npages = MEM // PAGE
    digest_a, digest_b = mbs_a.digest(0, npages), mbs_b.digest(0, npages)
    assert digest_a == digest_b
    own = mh_owned_pages(a)
    for table in (gen_table(a), gen_table(b)):
        assert {table[gpa // PAGE] for gpa in gpas} == {1} and {table[p] for p in own} == {0}
    # the work was spread over both MH vCPUs of each side, one doorbell per op
    sealed = [mb.counters()["pages_sealed"] for mb in mbs_a.mailboxes]
    opened = [mb.counters()["pages_opened"] for mb in mbs_b.mailboxes]
    assert sum(sealed) == sum(opened) == len(gpas) and min(sealed) > 0 and min(opened) > 0
    assert all(r > 0 for r in a.mailbox_doorbells.rings + b.mailbox_doorbells.rings)
    # the canary never shows outside private memory: not in a frame, a slot or the console
    assert not any(MARKER in f for f in frames)
    for m in (a, b):
        assert all(MARKER not in bytes(mb.slots) for mb in open_mailboxes(m).mailboxes)
        assert MARKER.decode() not in m.console.text()
    # the helper took a hardware AES path, not the portable one, where the host CPU has AES-NI
    impls = helper_impls(a) + helper_impls(b)
    assert len(impls) == 4
    if "aes" in host_cpu_flags():
        assert "portable" not in impls, impls
    # one chunk changed on the target: the digest says so
    raw_write(b, gpas[-1], b"\x01")
    assert mbs_b.digest(0, npages) != digest_a
    a.check()
    b.check()


def test_streamed_rounds_move_every_page_with_one_doorbell_per_drain(launcher: Launcher) -> None:
    """Protocol v2 in the booted guest: save_stream/load_stream queue several ops per MH vCPU; the helper
    rings (one exit) only when it has caught up, and each ring is one drain it counted."""
    src_cfg, dst_cfg = configs("aux-vcpu")
    a, b = launcher.boot(src_cfg, KEY), launcher.boot(dst_cfg, KEY)
    source_ready(a)
    gpas = guest_gpas(a)
    mbs_a, mbs_b = open_mailboxes(a), open_mailboxes(b)
    mbs_a.init()
    mbs_b.init()
    frames: list[bytes] = []  # sealed frames on their way, as the source's core would send them

    def frame(_mb: Mailbox, result: BatchResult) -> None:
        n = len(result.statuses)
        out = bytearray(sealed_frame_size(n))
        frame_sealed_pages(result.records, n, out, seq=0, ram_size=MEM, expected_gpas=result.gpas)
        frames.append(bytes(out))

    def unframe(_mb: Mailbox, slots: memoryview) -> int:
        return unframe_sealed_pages(frames.pop(0), slots, ram_size=MEM).count if frames else 0

    for generation in (1, 2):  # the second round replaces every page under a newer generation
        assert mbs_a.save_stream(gpas, generation, frame, banks=4) == -(-len(gpas) // 16)
        mbs_b.load_stream(unframe, banks=4)
        assert not frames
    assert guest_bytes(a) == guest_bytes(b)
    assert {gen_table(b)[gpa // PAGE] for gpa in gpas} == {2}
    for m in (a, b):
        counters = [mb.counters() for mb in open_mailboxes(m).mailboxes]
        assert [c["drains"] for c in counters] == m.mailbox_doorbells.rings
        assert all(0 < c["drains"] <= c["ops"] for c in counters)
        m.check()


@pytest.mark.parametrize(("src_impl", "dst_impl"), [("aes-ni", "auto"), ("auto", "aes-ni")])
def test_a_stream_sealed_by_one_implementation_opens_under_another(
    launcher: Launcher, src_impl: str, dst_impl: str
) -> None:
    """MachineConfig.crypto_impl holds one side's helper to the AES-NI path (what a CPU without VAES runs)
    while the other picks the fastest it has: a streamed round moves every page both ways round, bit for
    bit, and each helper says which path it took."""
    if not {"aes", "pclmulqdq", "ssse3", "sse4_1"} <= host_cpu_flags():
        pytest.skip("host CPU lacks AES-NI/PCLMULQDQ: no AES-NI path to force")
    src_cfg, dst_cfg = configs("aux-vcpu")
    a = launcher.boot(dataclasses.replace(src_cfg, crypto_impl=src_impl), KEY)
    b = launcher.boot(dataclasses.replace(dst_cfg, crypto_impl=dst_impl), KEY)
    source_ready(a)
    gpas = guest_gpas(a)
    mbs_a, mbs_b = open_mailboxes(a), open_mailboxes(b)
    mbs_a.init()
    mbs_b.init()
    frames: list[bytes] = []

    def frame(_mb: Mailbox, result: BatchResult) -> None:
        out = bytearray(sealed_frame_size(len(result.statuses)))
        frame_sealed_pages(result.records, len(result.statuses), out, seq=0, ram_size=MEM,
                           expected_gpas=result.gpas)  # fmt: skip
        frames.append(bytes(out))

    def unframe(_mb: Mailbox, slots: memoryview) -> int:
        return unframe_sealed_pages(frames.pop(0), slots, ram_size=MEM).count if frames else 0

    mbs_a.save_stream(gpas, 1, frame, banks=2)
    mbs_b.load_stream(unframe, banks=2)
    assert not frames
    assert guest_bytes(a) == guest_bytes(b)
    assert sum(mb.counters()["pages_opened"] for mb in mbs_b.mailboxes) == len(gpas)
    for m, impl in ((a, src_impl), (b, dst_impl)):
        took = set(helper_impls(m))
        if impl == "aes-ni":
            assert took == {"aes-ni"}
        elif {"vaes", "vpclmulqdq", "avx2"} <= host_cpu_flags():  # uncapped on a VAES host: the wider path
            assert took <= {"vaes", "vaes512"}, took
        m.check()


def _slot_records(mbs: MailboxSet, count: int) -> list[bytes]:
    return [bytes(mbs.mailboxes[0].slots[i * SLOT_SIZE : (i + 1) * SLOT_SIZE]) for i in range(count)]


def _load_raw(mbs: MailboxSet, records: list[bytes]) -> list[int]:
    """A hostile VMM: records straight into the slots (no core checks), then LOAD; per-slot statuses."""
    mb = mbs.mailboxes[0]
    mb.slots[: len(records) * SLOT_SIZE] = b"".join(records)
    return list(mb.load(len(records)).statuses)


def _with(record: bytes, offset: int, data: bytes) -> bytes:
    return record[:offset] + data + record[offset + len(data) :]


def test_target_refuses_tampered_misplaced_replayed_and_foreign_pages(launcher: Launcher) -> None:
    src_cfg, dst_cfg = configs("aux-vcpu")
    mig = os.urandom(16)
    a = launcher.boot(src_cfg, KEY, migration_id=mig)
    b = launcher.boot(dst_cfg, KEY, migration_id=mig)
    c = launcher.boot(dst_cfg, OTHER_KEY, migration_id=mig)  # launched and attested, but another key
    source_ready(a)
    gpas = workload_gpas(a)[:4]
    mbs_a, mbs_b, mbs_c = open_mailboxes(a), open_mailboxes(b), open_mailboxes(c)
    assert mbs_a.init().migration_id == mbs_b.init().migration_id == mig  # the owner's id, from the table
    assert mbs_c.init().key_id != mbs_a.mailboxes[0].init().key_id
    old = {gpa: raw_read(a, gpa, PAGE) for gpa in gpas}
    mbs_a.mailboxes[0].save(gpas, 1)
    gen1 = _slot_records(mbs_a, 4)
    new = {gpa: bytes([i + 1]) * PAGE for i, gpa in enumerate(gpas)}
    for gpa, data in new.items():
        raw_write(a, gpa, data)
    mbs_a.mailboxes[0].save(gpas, 2)
    gen2 = _slot_records(mbs_a, 4)
    for m in (b, c):
        for gpa in gpas:
            raw_write(m, gpa, TARGET_FILL)

    def target(m: Machine) -> list[bytes]:
        return [raw_read(m, gpa, PAGE) for gpa in gpas]

    flipped = _with(gen2[0], SLOT_CT + 100, bytes([gen2[0][SLOT_CT + 100] ^ 1]))
    moved = _with(gen2[1], SLOT_GPA, struct.pack("<Q", gpas[2]))  # page 1's record aimed at page 2
    assert _load_raw(mbs_b, [flipped, moved]) == [MhStatus.AUTH, MhStatus.AUTH]
    assert target(b) == [TARGET_FILL] * 4  # nothing written
    assert _load_raw(mbs_b, gen2) == [MhStatus.OK] * 4
    assert target(b) == [new[gpa] for gpa in gpas]
    # replays: an older generation, and the same generation again; the pages keep the newest copy
    assert _load_raw(mbs_b, gen1 + gen2[:1]) == [MhStatus.GEN_STALE] * 5
    assert target(b) == [new[gpa] for gpa in gpas] and target(b) != [old[gpa] for gpa in gpas]
    # another transport key: named by its key id, and the tag fails even with the key id forged
    key_c = mbs_c.mailboxes[0].init().key_id
    assert _load_raw(mbs_c, gen2) == [MhStatus.KEY_ID] * 4
    forged = [_with(r, SLOT_KEY_ID, struct.pack("<I", key_c)) for r in gen2]
    assert _load_raw(mbs_c, forged) == [MhStatus.AUTH] * 4
    assert target(c) == [TARGET_FILL] * 4
    counters = mbs_b.mailboxes[0].counters()
    assert (counters["pages_opened"], counters["pages_refused"]) == (4, 7)
    for m in (a, b, c):
        m.check()


def test_helper_seals_the_guests_cpl0_pages_and_refuses_its_own(launcher: Launcher) -> None:
    """(v7) The guest's pages below the workload area (CPU tables, boot page, its page tables and CPL0
    stacks, the firmware) are sealed like the rest; the MH's own (page 0, its page tables, its vCPUs' CPL0
    stacks, the MH area) it refuses (GPA_MH), exactly the pages the VMM leaves out, and DIGEST skips them."""
    src_cfg, _ = configs("aux-vcpu")
    a = launcher.boot(src_cfg, KEY)
    source_ready(a)
    mbs = open_mailboxes(a)
    mbs.init()
    mb = mbs.mailboxes[0]
    mh_kstack = abi.KSTACK_GPA + src_cfg.vcpus * abi.KSTACK_SIZE  # the first helper vCPU's CPL0 stack
    own = [0, abi.PT_MH_GPA, abi.PT_MH_GPA + 6 * PAGE, mh_kstack, abi.MH_BASE, abi.SECRET_GPA]
    guest = [abi.GDT_GPA, abi.TSS_GPA, abi.BOOT_PARAMS_GPA, abi.PT_WL_GPA, abi.KSTACK_GPA, abi.FW_BASE]
    guest.append(0x100000)  # mapped by no guest table: the guest's all the same (zeros)
    assert all(gpa // PAGE in mh_owned_pages(a) for gpa in own)
    assert not any(gpa // PAGE in mh_owned_pages(a) for gpa in guest)
    result = mb.finish(Op.SAVE, mb.post_save(own + guest, 1), len(own) + len(guest))
    assert list(result.statuses) == [MhStatus.GPA_MH] * len(own) + [MhStatus.OK] * len(guest)
    mb.digest(0, MEM // PAGE)
    assert mb._get("digest_skipped", "<Q") == len(mh_owned_pages(a))
    a.check()


def test_workload_page_tables_leave_out_the_whole_mh_area(launcher: Launcher) -> None:
    src_cfg, _ = configs("aux-vcpu")
    a = launcher.boot(src_cfg, KEY)
    lay = a.layout
    assert abi.MAILBOX_GPA + 2 * lay.mailbox_stride <= lay.mh_shared_gpa < lay.mh_ctx_gpa < lay.mh_gen_gpa
    assert lay.mh_gen_gpa + lay.mh_gen_entries * 4 <= lay.mh_end

    def pd_entries(base: int) -> list[int]:
        pd0 = base + 3 * PAGE  # v8: PML4, PDPT, the low PT, then the PDs
        raw = raw_read(a, pd0, PAGE)
        return [
            struct.unpack_from("<Q", raw, (gpa // abi.HUGE) * 8)[0] for gpa in range(0, lay.mh_end, abi.HUGE)
        ]

    assert pt_pages(lay) == 7  # below 4 GiB: PML4, PDPT, PT, four PDs
    workload, helper = pd_entries(abi.PT_WL_GPA)[1:], pd_entries(abi.PT_MH_GPA)[1:]
    assert workload and all(e == 0 for e in workload)  # [2 MiB, mh_end): not mapped for the workload
    assert all(e & 0x7 == 0x7 for e in helper)  # present, writable, user for the MH


@pytest.mark.parametrize("mode", ["aux-vcpu", "mirror-vm"])
def test_source_and_target_low_pages_differ_only_where_guests_write(launcher: Launcher, mode: str) -> None:
    """Why the CPL0 area may be loaded under a running target helper: before anything moves, the guest's
    pages below the workload area are byte for byte the same on both sides except the boot page's mh_only
    flag (a fact of each launch; the migrated guest's is the source's), the Accessed/Dirty bits the CPU set
    in the workload's page tables and the workload vCPUs' CPL0 stacks (timer frames): only the source's
    workload ran, and the target's helper uses neither. The CPU tables its vCPUs do use (GDT, TSSs, IDT),
    which a LOAD overwrites with the source's, are the same bytes."""
    src_cfg, dst_cfg = configs(mode)
    a, b = launcher.boot(src_cfg, KEY), launcher.boot(dst_cfg, KEY)
    source_ready(a)
    b.wait_helpers_ready()
    low = [gpa for gpa in guest_gpas(a) if gpa < a.layout.mh_end]
    differ = {gpa: (raw_read(a, gpa, PAGE), raw_read(b, gpa, PAGE)) for gpa in low}
    differ = {gpa: pair for gpa, pair in differ.items() if pair[0] != pair[1]}
    kstacks = range(abi.KSTACK_GPA, abi.KSTACK_GPA + src_cfg.vcpus * abi.KSTACK_SIZE)
    tables = range(abi.PT_WL_GPA, abi.PT_WL_GPA + pt_pages(a.layout) * PAGE)
    assert abi.BOOT_PARAMS_GPA in differ and all(
        g == abi.BOOT_PARAMS_GPA or g in kstacks or g in tables for g in differ
    ), [hex(g) for g in differ]
    bp_a, bp_b = differ[abi.BOOT_PARAMS_GPA]
    flags = abi.BootParams.flags.offset
    assert [i for i in range(PAGE) if bp_a[i] != bp_b[i]] == [flags]
    assert bp_a[flags] ^ bp_b[flags] == abi.BP_FLAG_MH_ONLY
    accessed_dirty = 0x60
    for gpa in (g for g in differ if g in tables):
        ea, eb = (struct.unpack(f"<{PAGE // 8}Q", raw) for raw in differ[gpa])
        assert all((x ^ y) & ~accessed_dirty == 0 for x, y in zip(ea, eb, strict=True))
