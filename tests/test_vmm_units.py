"""VMM parts that need no KVM: page bitmaps, the encryption bitmap, layouts, config checks."""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from confplan.errors import ConfplanError
from confplan.kvm import structs as kvm_structs
from confplan.vmm import abi
from confplan.vmm.bitmap import PageBitmap
from confplan.vmm.bootparams import HostCpu, boot_params
from confplan.vmm.config import MachineConfig
from confplan.vmm.cpu_setup import CpuInfo, cap_for_crypto, cpu_info, host_cpu_flags, host_features
from confplan.vmm.devices.mailbox_doorbell import MailboxDoorbells
from confplan.vmm.enc_bitmap import EncBitmap, EncStatusError
from confplan.vmm.exits import GuestError
from confplan.vmm.layout import GuestLayout
from confplan.vmm.vcpu_thread import VcpuRunner


@given(st.integers(1, 700), st.data())
def test_set_range_matches_a_set(npages: int, data: st.DataObject) -> None:
    bm, model = PageBitmap(npages), set[int]()
    for _ in range(data.draw(st.integers(1, 6))):
        first = data.draw(st.integers(0, npages - 1))
        count = data.draw(st.integers(0, npages - first))
        value = data.draw(st.booleans())
        bm.set_range(first, count, value)
        span = set(range(first, first + count))
        model = model | span if value else model - span
    assert bm.pages() == sorted(model)
    assert bm.count() == len(model)


def test_enc_bitmap_private_by_default_and_updates() -> None:
    enc = EncBitmap(1000)
    assert enc.shared_pages() == 0 and enc.is_private(999)
    enc.map_gpa_range(10 * abi.PAGE, 100, 0)
    assert enc.shared_pages() == 100 and not enc.is_private(10) and enc.is_private(110)
    enc.map_gpa_range(50 * abi.PAGE, 10, abi.MAP_GPA_RANGE_ENCRYPTED)
    assert enc.shared_pages() == 90 and enc.is_private(55)
    with pytest.raises(EncStatusError):
        enc.map_gpa_range(999 * abi.PAGE, 2, 0)


def test_layout_keeps_areas_apart() -> None:
    lay = GuestLayout.for_config(MachineConfig(memory=64 * abi.MIB, vcpus=2, aux_vcpus=2, batch_pages=256))
    assert lay.mh_end % abi.HUGE == 0 and lay.mailbox_gpa(1) + lay.mailbox_stride <= lay.mh_end
    assert lay.mailbox_stride == abi.PAGE + 256 * (abi.PAGE + 64)
    assert lay.wl_ctl_gpa == lay.mh_end < lay.wl_stack_gpa < lay.wl_ledger_gpa < lay.wl_data_gpa
    assert lay.data_page_gpa(lay.wl_data_pages - 1) + abi.PAGE <= 64 * abi.MIB
    assert lay.partition(0).stop == lay.partition(1).start and lay.partition(1).stop == lay.wl_data_pages


def test_too_small_guest_is_refused_with_a_size_hint() -> None:
    with pytest.raises(ConfplanError) as err:
        GuestLayout.for_config(MachineConfig(memory=4 * abi.MIB, aux_vcpus=4, batch_pages=1024))
    assert "workload pages" in err.value.message and "at least" in err.value.render()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory": 3 * abi.MIB},
        {"vcpus": 0},
        {"vcpus": 120, "aux_vcpus": 9},  # 129 > abi.MAX_VCPUS
        {"workload_kind": "fork-bomb"},
        {"shared_fraction": 1.5},
        {"helper_mode": "mirror-vm", "aux_vcpus": 1},
    ],
)
def test_bad_configs_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfplanError):
        MachineConfig(**kwargs)  # type: ignore[arg-type]


# ---- the migration helper's pieces that need no KVM ----
def test_mh_state_follows_the_mailboxes_inside_the_mh_area() -> None:
    cfg = MachineConfig(memory=256 * abi.MIB, vcpus=1, aux_vcpus=3, batch_pages=256)
    lay = GuestLayout.for_config(cfg)
    assert lay.mh_shared_gpa == abi.MAILBOX_GPA + 3 * lay.mailbox_stride
    assert lay.mh_ctx_gpa == lay.mh_shared_gpa + abi.PAGE and lay.mh_ctx_of(2) == lay.mh_ctx_gpa + 2 * 0xC000
    assert lay.mh_gen_gpa == lay.mh_ctx_of(3) and lay.mh_gen_entries == 256 * abi.MIB // abi.PAGE
    assert lay.mh_gen_gpa + 4 * lay.mh_gen_entries <= lay.mh_mac_gpa  # 256 KiB table for 256 MiB
    # v4: one 8 KiB VMSA slot per guest vCPU after the MAC table, still inside the MH area
    assert lay.mh_vmsa_gpa == lay.mh_mac_gpa + 16 * lay.npages and lay.vmsa_slot_gpa(0) == lay.mh_vmsa_gpa
    assert lay.mh_vmsa_gpa + lay.vmsa_bytes <= lay.mh_end == lay.wl_base
    bp = boot_params(cfg, lay, HostCpu(tsc_khz=1, features=0, vendor_amd=False))
    assert (bp.mh_shared_gpa, bp.mh_ctx_gpa, bp.mh_gen_gpa, bp.mh_vmsa_gpa, bp.mh_vmsa_slots) == (
        lay.mh_shared_gpa,
        lay.mh_ctx_gpa,
        lay.mh_gen_gpa,
        lay.mh_vmsa_gpa,
        1,
    )
    assert (bp.mh_ctx_stride, bp.mh_gen_entries, bp.mh_size) == (0xC000, 65536, lay.mh_end - abi.MH_BASE)


def test_only_the_emulated_cpu_reads_the_vmsa_slots() -> None:
    """``Machine.hardware_vmsa_view`` stands in for the CPU loading an SEV-ES VMSA: apart from its own
    definition, only vmm/vmsa_slot.py may reach the slots (docs/mailbox.md)."""
    root = Path(__file__).resolve().parents[1] / "confplan"
    users = sorted(
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if "hardware_vmsa_view" in path.read_text(encoding="utf-8")
    )
    assert users == ["vmm/machine.py", "vmm/vmsa_slot.py"]


def test_host_features_need_ymm_state_for_the_avx_group() -> None:
    bits = abi.FEATURE_BITS
    user = {"aes", "pclmulqdq", "ssse3", "sse4_1", "rdrand"}
    ymm = {"avx", "avx2", "vaes", "vpclmulqdq"}
    user_bits = bits["aes-ni"] | bits["pclmulqdq"] | bits["ssse3"] | bits["sse4.1"] | bits["rdrand"]
    assert host_features(frozenset(user)) == user_bits
    assert host_features(frozenset({"rdrand"})) == bits["rdrand"]  # no vector state needed
    assert host_features(frozenset(user | ymm)) == host_features(frozenset(user))  # no XSAVE: no YMM
    zmm = {"avx512f", "avx512bw", "avx512vl"}
    zmm_bits = bits["avx512f"] | bits["avx512bw"] | bits["avx512vl"]
    assert host_features(frozenset(user | ymm | {"xsave"})) == sum(bits.values()) - zmm_bits
    assert host_features(frozenset({"avx2", "vaes", "xsave"})) == 0  # AVX2 without AVX: none of them
    assert host_features(frozenset()) == 0
    # The AVX-512 group: only all three, only with YMM, and only where KVM can hold the ZMM states.
    full = frozenset(user | ymm | zmm | {"xsave"})
    assert host_features(full) == sum(bits.values()) - zmm_bits
    assert host_features(full, zmm_state=True) == sum(bits.values())
    assert host_features(full - {"avx512bw"}, zmm_state=True) == sum(bits.values()) - zmm_bits
    assert host_features(frozenset(user | zmm | {"xsave"}), zmm_state=True) == host_features(frozenset(user))


def test_crypto_impl_caps_the_feature_word_in_the_boot_parameters() -> None:
    """MachineConfig.crypto_impl drops exactly the bits the helper would need for anything faster, in the
    boot-params page (what a measured launch measures), and nothing else; unknown names are refused."""
    bits = abi.FEATURE_BITS
    everything = sum(bits.values())
    zmm = bits["avx512f"] | bits["avx512bw"] | bits["avx512vl"]
    assert cap_for_crypto(everything, "auto") == cap_for_crypto(everything, "vaes512") == everything
    assert cap_for_crypto(everything, "vaes") == everything - zmm
    assert cap_for_crypto(everything, "aes-ni") == everything - zmm - bits["vaes"] - bits["vpclmulqdq"]
    no_aes = everything - zmm - bits["vaes"] - bits["vpclmulqdq"] - bits["aes-ni"] - bits["pclmulqdq"]
    assert cap_for_crypto(everything, "portable") == no_aes
    assert cap_for_crypto(everything, "aes-ni") & bits["avx2"]  # a Zen 2 still has AVX2 and its YMM state
    cfg = MachineConfig(crypto_impl="aes-ni")
    host = HostCpu(tsc_khz=1, features=everything, vendor_amd=True)
    bp = boot_params(cfg, GuestLayout.for_config(cfg), host)
    assert bp.cpu_features == cap_for_crypto(everything, "aes-ni")
    with pytest.raises(ConfplanError, match="crypto_impl 'aesni'"):
        MachineConfig(crypto_impl="aesni")  # type: ignore[arg-type]


def test_xcr0_grows_with_the_vector_groups_passed_on() -> None:
    bits = abi.FEATURE_BITS
    avx512 = bits["avx512f"] | bits["avx512bw"] | bits["avx512vl"]
    assert CpuInfo(features=0, vendor_amd=True).xcr0 == 0x3
    assert CpuInfo(features=bits["avx"] | bits["avx2"], vendor_amd=True).xcr0 == 0x7
    assert CpuInfo(features=bits["avx"] | avx512, vendor_amd=True).xcr0 == 0xE7


def test_host_cpu_flags_reads_the_first_flags_line(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu aes avx\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert host_cpu_flags(str(info)) == frozenset({"fpu", "aes", "avx"})
    assert host_cpu_flags(str(tmp_path / "missing")) == frozenset()


class _FakeVcpu:
    id = 7


def _runner() -> VcpuRunner:
    return VcpuRunner(_FakeVcpu(), aux=True, dispatch=lambda r, e: None, on_error=lambda e: None)  # type: ignore[arg-type]


def test_a_kick_before_the_park_is_latched() -> None:
    r = _runner()
    r.kick()  # lands while the vCPU still runs guest code, before it stores to IDLE
    done = threading.Event()
    threading.Thread(target=lambda: (r.park(None), done.set()), daemon=True).start()
    assert done.wait(5)  # the park returned at once: the kick was not lost
    again = threading.Event()
    threading.Thread(target=lambda: (r.park(None), again.set()), daemon=True).start()
    assert not again.wait(0.05)  # one kick wakes one park
    r.kick()
    assert again.wait(5)


def test_mailbox_doorbell_wakes_the_waiter_of_its_mailbox() -> None:
    bells, runner = MailboxDoorbells(2), _runner()
    woke: list[int] = []

    def ring(offset: int, seq: int) -> None:
        runner.kick()  # the ringing vCPU parks after its doorbell; a latched kick lets this thread go on
        bells.mmio_write(runner, offset, 8, seq)

    def waiter(index: int, seq: int) -> None:
        bells.wait(index, seq, 5.0, lambda: None)
        woke.append(index)

    t = threading.Thread(target=waiter, args=(1, 3))
    t.start()
    ring(0, 3)  # mailbox 0 rings: not the one waited for
    ring(8, 2)  # mailbox 1, an older seq
    t.join(0.05)
    assert t.is_alive()
    ring(8, 3)
    t.join(5)
    assert woke == [1] and bells.rings == [1, 2] and bells.mmio_read(runner, 8, 8) == 3
    bells.wait(1, 3, 5.0, lambda: None)  # already rung: returns at once
    with pytest.raises(GuestError, match="2 mailboxes"):
        bells.mmio_write(runner, 16, 8, 1)
    with pytest.raises(GuestError):
        bells.mmio_write(runner, 4, 4, 1)
    bells.stop()
    with pytest.raises(ConfplanError, match="machine stopped"):
        bells.wait(0, 99, 5.0, lambda: None)


def test_two_waiters_on_one_mailbox_both_wake_and_a_c_loop_rings_like_the_device() -> None:
    """The doorbell's eventfd is consumed by whichever waiter reads it first; the other still wakes (it
    re-reads the seq). A helper's C loop rings through ``cell``: the same words and the same eventfd."""
    bells = MailboxDoorbells(2)
    woke: list[int] = []
    waiters = [threading.Thread(target=lambda: (bells.wait(1, 5, 5.0, lambda: None), woke.append(1)))
               for _ in range(2)]  # fmt: skip
    for t in waiters:
        t.start()
    cell = bells.cell(1)
    ctypes.c_uint64.from_address(cell.rung_addr).value = 5  # what helper_run.c's ring() stores
    ctypes.c_uint64.from_address(cell.rings_addr).value += 1
    os.eventfd_write(cell.fd, 1)
    for t in waiters:
        t.join(5)
    assert woke == [1, 1] and bells.rings == [0, 1] and bells.mmio_read(_runner(), 8, 8) == 5


def test_the_doorbell_parks_the_helper_until_the_next_kick() -> None:
    bells, runner = MailboxDoorbells(1), _runner()
    parked_done = threading.Event()
    threading.Thread(
        target=lambda: (bells.mmio_write(runner, 0, 8, 1), parked_done.set()), daemon=True
    ).start()
    bells.wait(0, 1, 5.0, lambda: None)  # the waiter is woken before the helper parks
    assert not parked_done.wait(0.05)
    runner.kick()  # the VMM's next post
    assert parked_done.wait(5)


def test_guest_ram_is_on_huge_pages_where_the_host_allows_them() -> None:
    """MADV_HUGEPAGE on the RAM: with THP not "never", prefaulted RAM sits on 2 MiB pages (what lets KVM
    map it 2 MiB at a time)."""
    from confplan.vmm.memory import GUEST_RAM_VMFLAGS, GuestRam, smaps

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off on this host: guest RAM uses 4 KiB pages")
    ram = GuestRam(64 * abi.MIB)
    try:
        assert ram.address % (2 * abi.MIB) == 0
        ram.prefault()
        assert ram.resident_bytes() == ram.size
        assert ram.huge_pages() > ram.size // 2
        # what the bench counts as guest RAM in a VMM's RSS
        mine = [m for m in smaps() if ram.address <= m.start < ram.address + ram.top]
        assert mine and all(m.flags >= GUEST_RAM_VMFLAGS for m in mine)
    finally:
        ram.close()


def test_guest_ram_says_whether_it_is_all_on_huge_pages() -> None:
    """What the source's WARM asks before it reads one page per 2 MiB (v9): RAM allocated on huge pages
    says yes; RAM with a span the host holds on 4 KiB pages (MADV_NOHUGEPAGE there) says no, by the
    kernel's PAGEMAP_SCAN over the RAM alone."""
    from confplan.vmm import memory
    from confplan.vmm.pagemap import present_bytes

    ram = memory.GuestRam(64 * abi.MIB)
    try:
        if present_bytes(ram.address, ram.top) is None:
            pytest.skip("this kernel has no PAGEMAP_SCAN (Linux 6.7+): WARM reads every page there")
        assert present_bytes(ram.address, ram.top) == (0, 0)  # nothing allocated yet
        assert not ram.on_huge_pages()
        ram.prefault()
        if ram.huge_pages() == 0:
            pytest.skip("the host gave this RAM no transparent huge pages: nothing to tell apart")
        assert present_bytes(ram.address, ram.top) == (ram.huge_pages(), 0)
        assert ram.on_huge_pages()
    finally:
        ram.close()
    ram = memory.GuestRam(64 * abi.MIB)
    try:
        span = 8 * abi.MIB
        assert memory._libc.madvise(ram.address + 16 * abi.MIB, span, 15) == 0  # MADV_NOHUGEPAGE
        ram.prefault()
        huge, small = present_bytes(ram.address, ram.top) or (0, 0)
        assert small == span and huge == ram.huge_pages() and huge + small == ram.size
        assert not ram.on_huge_pages()
    finally:
        ram.close()


def test_prefault_allocates_all_guest_ram_up_front() -> None:
    from confplan.vmm.memory import GuestRam

    for size, threads in ((8 * abi.MIB, None), (130 * abi.MIB, 2)):  # one span; two threads, uneven spans
        ram = GuestRam(size)
        try:
            assert ram.resident_bytes() < ram.size  # fresh RAM holds no pages yet
            ram.prefault(threads)
            assert ram.resident_bytes() >= ram.size
            assert ram.read(size - abi.PAGE, 16) == bytes(16)  # allocated to the last page, still zero
        finally:
            ram.close()


def test_guest_pages_are_all_of_ram_but_the_helpers_own() -> None:
    """(v7) What migrates: every page but page 0, the helper's page tables, its vCPUs' CPL0 stacks (ids
    after the workload's) and the MH area; the CPL0 area of the guest is in."""
    lay = GuestLayout.for_config(MachineConfig(memory=64 * abi.MIB, vcpus=2, aux_vcpus=3))
    mask = lay.guest_page_mask()
    pages = {i for i in range(lay.npages) if mask >> i & 1}
    k = abi.KSTACK_GPA // abi.PAGE
    own = {0, *range(abi.PT_MH_GPA // abi.PAGE, k), k + 2, k + 3, k + 4}
    own |= set(range(abi.MH_BASE // abi.PAGE, lay.mh_end // abi.PAGE))
    assert pages == set(range(lay.npages)) - own
    assert {abi.GDT_GPA // abi.PAGE, abi.BOOT_PARAMS_GPA // abi.PAGE, k, k + 1, k + 5} <= pages


def _cpuid(*entries: tuple[int, int, dict[str, int]]) -> kvm_structs.KvmCpuid2:
    table = kvm_structs.KvmCpuid2(nent=len(entries))
    for i, (function, index, regs) in enumerate(entries):
        table.entries[i] = kvm_structs.KvmCpuidEntry2(function=function, index=index, **regs)
    return table


def test_avx512_is_passed_only_where_kvm_holds_the_zmm_states() -> None:
    """A CPU with AVX-512 (KVM's leaf 7 and the host flags both say so) gets the group, and XCR0 0xE7, only
    when KVM's leaf 0xD.0 offers opmask, ZMM_Hi256 and Hi16_ZMM; else the guest stays on 256 bits."""
    bits = abi.FEATURE_BITS
    leaf1 = {"ecx": 1 << 28 | 1 << 25 | 1 << 1}  # AVX, AES-NI, PCLMULQDQ
    leaf7 = {"ebx": 1 << 5 | 1 << 16 | 1 << 30 | 1 << 31, "ecx": 1 << 9 | 1 << 10}
    flags = frozenset({"avx", "xsave", "avx2", "aes", "avx512f", "avx512bw", "avx512vl"})
    held = cpu_info(_cpuid((1, 0, leaf1), (7, 0, leaf7), (0xD, 0, {"eax": 0xE7})), flags)
    assert held.has_zmm and held.xcr0 == 0xE7
    assert held.features & bits["avx512f"] and held.features & bits["avx512vl"]
    not_held = cpu_info(_cpuid((1, 0, leaf1), (7, 0, leaf7), (0xD, 0, {"eax": 0x207})), flags)
    assert not not_held.has_zmm and not_held.xcr0 == 0x7
    assert not not_held.features & (bits["avx512f"] | bits["avx512bw"] | bits["avx512vl"])


def test_rdrand_comes_from_kvms_cpuid_or_the_host_flags() -> None:
    """RDRAND (CPUID.1:ECX[30]) is a user-mode instruction: either source passes it, neither means none
    (the helper then refuses the SNP key release with ENTROPY)."""
    rdrand = abi.FEATURE_BITS["rdrand"]
    assert cpu_info(_cpuid((1, 0, {"ecx": 1 << 30})), frozenset()).kvm_features == rdrand
    assert cpu_info(_cpuid((1, 0, {"ecx": 0})), frozenset({"rdrand"})).host_features == rdrand
    assert not cpu_info(_cpuid((1, 0, {"ecx": 1 << 25})), frozenset({"aes"})).features & rdrand


def test_this_host_gets_no_avx512_unless_it_has_it() -> None:
    flags = host_cpu_flags()
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not usable here")
    from confplan.kvm import Kvm

    with Kvm() as kvm:
        info = cpu_info(kvm.supported_cpuid())
    if not {"avx512f", "avx512bw", "avx512vl"} <= flags:
        assert not info.has_zmm and info.xcr0 in (0x3, 0x7)
