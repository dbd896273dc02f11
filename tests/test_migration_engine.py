"""The source and target engines end to end, in one process: two real KVM machines, their in-guest
migration helpers (``open_mailboxes``: the MH at CPL3 on aux vCPUs or a mirror VM) and a real TCP
stream. The guest runs, migrates, resumes on the target, and its self-check ledger must pass there."""

from __future__ import annotations

import array
import dataclasses
import os
import re
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from relay import CorruptingRelay, CuttingRelay
from waiting import until

from confplan.core.datapath import DataLoop, LoopResult
from confplan.core.streamauth import StreamAuthError, client_handshake, key_schedule
from confplan.core.wire import DeviceState, Hello, HelperMode
from confplan.errors import ConfplanError
from confplan.kvm import structs as kvm_structs
from confplan.migration.dirty import DirtyTracker
from confplan.migration.helper import open_mailboxes
from confplan.migration.precopy import RoundStats
from confplan.migration.sealed_path import SealedPath
from confplan.migration.session import ENC_BITMAP_DEVICE, ENC_BITMAP_FORMAT, resynced_tsc
from confplan.migration.source import Outgoing
from confplan.migration.target import Incoming, IncomingState, IncomingStatus, apply_clock
from confplan.migration.verify import private_digests, shared_digest
from confplan.sev import CONFPLAN_TRANSPORT_KEY_GUID
from confplan.sev.secret_table import CONFPLAN_MIGRATION_ID_GUID, build_secret_table
from confplan.vmm import Machine, MachineConfig, abi
from confplan.vmm.cpu_setup import host_cpu_flags
from confplan.vmm.vcpu_thread import RunState

pytestmark = pytest.mark.kvm
MIGRATION_ID = bytes(range(16))


def _config(mode: str, **extra: object) -> MachineConfig:
    helpers = {"aux_vcpus": 2} if mode == "aux-vcpu" else {"helper_mode": "mirror-vm", "mirror_vcpus": 2}
    fields = {"memory": 32 * abi.MIB, "vcpus": 1, "shared_fraction": 0.1, "dirty_rate": 16 * abi.MIB,
              "batch_pages": 64, **helpers, **extra}  # fmt: skip
    return MachineConfig(**fields)  # type: ignore[arg-type]


def _secret(key: bytes) -> bytes:
    return build_secret_table({CONFPLAN_TRANSPORT_KEY_GUID: key, CONFPLAN_MIGRATION_ID_GUID: MIGRATION_ID})


class Pair:
    """A running source, an MH-only target, both helpers, and a connected stream."""

    def __init__(
        self, mode: str, *, relay: bool = False, dst_batch_pages: int = 64, strangers: int = 0,
        channels: int = 1, dial: Callable[[Pair, int], socket.socket] | None = None, **guest: object,
    ) -> None:  # fmt: skip
        self.mode, self.key = mode, os.urandom(32)
        self.src = Machine(_config(mode, **guest))
        self.dst = Machine(_config(mode, mh_only=True, batch_pages=dst_batch_pages, **guest))
        for m in (self.src, self.dst):
            m.write(abi.SECRET_GPA, _secret(self.key))
            m.start()
        fill = 30 + 20 * self.src.config.memory // (1 << 30)  # a big guest fills for long on a loaded host
        self.src.wait_workload(abi.EV_WL_FILLED, timeout=fill)  # shared pages are reported after the fill
        self.src_mb, self.dst_mb = open_mailboxes(self.src), open_mailboxes(self.dst)
        self.src_mb.init()
        self.dst_mb.init()
        hmode = HelperMode.MIRROR_VM if mode == "mirror-vm" else HelperMode.AUX_VCPU
        self.hello = hello = Hello(self.src.config.memory, MIGRATION_ID, hmode, 1)
        listener = socket.create_server(("127.0.0.1", 0))
        self.stream_key = os.urandom(32)  # the orchestrator's per-attempt stream key (wire v2)
        self.incoming = Incoming(self.dst, listener, hello=hello, stream_key=self.stream_key,
                                 mailboxes=self.dst_mb)  # fmt: skip
        port = listener.getsockname()[1]
        for _ in range(strangers):  # someone on the network reaches the page port before the source
            _stranger(port, hello)
        self.relay = CorruptingRelay(port, offset=200_000, mask=0x40) if relay else None
        sock = socket.create_connection(("127.0.0.1", self.relay.port if self.relay else port))
        self.tracker = DirtyTracker(self.src)
        self.tracker.reset()
        self.port = port
        dial_extra = dial or (lambda _, p: socket.create_connection(("127.0.0.1", p)))
        self.out = Outgoing(self.src, sock, hello=hello, stream_key=self.stream_key, mailboxes=self.src_mb,
                            tracker=self.tracker, next_generation=1, channels=channels,
                            dial=lambda: dial_extra(self, port))  # fmt: skip
        self.out.start()

    def finish(self) -> tuple[RoundStats, IncomingStatus]:
        """The pause: the guest's vCPUs stop, the final round and the vCPU state go, and the target holds
        the whole copy (COMPLETE). (The final round's stats, the target's status.)"""
        self.src.pause_all_vcpus_except_aux()
        final = self.out.send_round(final=True)
        self.out.send_state(time.time())
        status = self.incoming.wait(30)
        assert status.state is IncomingState.COMPLETE, status.error
        return final, status

    def close(self) -> None:
        self.out.abort("the test ends")
        self.incoming.close()
        for m in (self.src, self.dst):
            m.close()


def _stranger(port: int, hello: Hello) -> None:
    """A peer without this migration's stream key: a right HELLO, then it cannot prove the key."""
    refused = pytest.raises(StreamAuthError, match="does not prove this migration's stream key")
    with socket.create_connection(("127.0.0.1", port)) as sock, refused:
        client_handshake(sock, os.urandom(32), hello, timeout=10.0)


@pytest.fixture
def pairs() -> Iterator[list[Pair]]:
    made: list[Pair] = []
    yield made
    for pair in made:
        pair.close()


@pytest.mark.parametrize("mode", ["aux-vcpu", "mirror-vm"])
def test_migrate_resume_ledger_ok(pairs: list[Pair], mode: str) -> None:
    pair = Pair(mode)
    pairs.append(pair)
    rounds = [pair.out.send_round() for _ in range(3)]
    assert rounds[0].sealed_pages > 1000 and rounds[0].shared_pages > 100  # the first round sends everything
    assert rounds[1].pages < rounds[0].pages  # later rounds: only what the workload dirtied
    final, status = pair.finish()
    assert status.sealed_pages == sum(r.sealed_pages for r in [*rounds, final])
    # verify: the two helpers' keyed digests and the shared-page CRCs agree
    assert shared_digest(pair.src) == shared_digest(pair.dst)
    assert private_digests(pair.src_mb, pair.src) == private_digests(pair.dst_mb, pair.dst)
    # resume on the target with the clock moved on; the workload's ledger passes there
    states = [s.state for s in status.vcpus.values()]
    saved = next(iter(status.vcpus.values()))
    assert resynced_tsc(saved, saved.paused_wall + 1.0, 1000) == saved.state.tsc + 1_000_000
    pair.dst.restore_vcpu_states(states)
    assert status.clock is not None  # the source's kvm-clock (DEVICE_STATE kvm-clock)
    apply_clock(pair.dst, status, time.time())
    ticks = pair.dst.workload.clock().ticks
    pair.dst.resume_all_vcpus_except_aux()
    check = pair.dst.workload.check()
    assert check.ok
    # time went on in the guest across the migration: never backwards, the pause seen as a gap > 0
    assert pair.dst.workload.wait_clock_read()
    seen = pair.dst.workload.clock()
    assert seen.monotonic and seen.max_gap_seconds is not None and 0 < seen.max_gap_seconds < 60
    assert until(lambda: pair.dst.workload.clock().ticks > ticks)  # the LAPIC timer (restored with it) ticks
    if pair.dst.host.features & abi.FEATURE_BITS["avx"]:
        assert check.vector == "intact"  # the upper YMM halves crossed with the vCPU's XSAVE area
    written = pair.dst.workload.progress().pages_written
    assert until(lambda: pair.dst.workload.progress().pages_written > written)  # it goes on writing there
    pair.src.resume_all_vcpus_except_aux()
    assert pair.src.workload.check().ok


def _pause_inside_timer_handler(m: Machine, attempts: int = 200) -> tuple[int, int] | None:
    """Pause ``m``'s guest until vCPU 0 is at CPL0 in its LAPIC timer handler (``Machine.pause_in_cpl0``:
    the tick due at a re-entry is delivered and the pause finds it there): (rip, rsp), or None."""
    m.pause_all_vcpus_except_aux()
    if not m.pause_in_cpl0(attempts):
        return None
    state = m.save_vcpu_states()[0]
    cs = kvm_structs.KvmSregs.from_buffer_copy(state.sregs).cs
    handler = range(m.firmware.sym("timer_entry"), m.firmware.sym("gp_entry"))
    assert cs.selector & 3 == 0 and state.regs["rip"] in handler
    return state.regs["rip"], state.regs["rsp"]


def test_a_guest_paused_inside_its_timer_handler_resumes_on_the_target(pairs: list[Pair]) -> None:
    """(ABI v7) The CPL0 area migrates: a vCPU paused inside its timer interrupt handler (CPL0, the
    interrupt frame it returns through on its CPL0 stack) goes on in the target from the source's kernel
    state, which the target never had (its workload never ran), returns to CPL3 through that frame, and
    the guest's ledger and clock checks pass there. The CPL0 pages are in the digests both sides agree on."""
    pair = Pair("aux-vcpu", timer_hz=1000)
    pairs.append(pair)
    top = abi.KSTACK_GPA + abi.KSTACK_SIZE
    own = pair.dst.ram.read(abi.KSTACK_GPA, abi.KSTACK_SIZE)  # the target's own CPL0 stack (never used)
    pair.out.send_round()
    inside = _pause_inside_timer_handler(pair.src)
    if inside is None:
        pair.src.resume_all_vcpus_except_aux()
        pytest.skip("no pause of 200 landed inside the timer handler (the guest was always at CPL3)")
    rip, rsp = inside
    assert abi.KSTACK_GPA <= rsp < top
    frame = pair.src.ram.read(rsp, top - rsp)
    assert own[rsp - abi.KSTACK_GPA :] != frame  # not what the target booted with: it comes with the guest
    final = pair.out.send_round(final=True)
    pair.out.send_state(time.time())
    status = pair.incoming.wait(30)
    assert status.state is IncomingState.COMPLETE, status.error
    assert final.pages > 0 and pair.dst.ram.read(rsp, top - rsp) == frame
    assert private_digests(pair.src_mb, pair.src) == private_digests(pair.dst_mb, pair.dst)
    assert shared_digest(pair.src) == shared_digest(pair.dst)
    state = next(iter(status.vcpus.values())).state
    assert (state.regs["rip"], state.regs["rsp"]) == (rip, rsp)
    pair.dst.restore_vcpu_states([v.state for v in status.vcpus.values()])
    assert status.clock is not None
    apply_clock(pair.dst, status, time.time())
    ticks = pair.dst.workload.clock().ticks
    pair.dst.resume_all_vcpus_except_aux()
    assert pair.dst.workload.check().ok
    assert pair.dst.workload.wait_clock_read()
    assert pair.dst.workload.clock().monotonic
    assert until(lambda: pair.dst.workload.clock().ticks > ticks + 1)  # the interrupted tick, and later ones
    written = pair.dst.workload.progress().pages_written
    assert until(lambda: pair.dst.workload.progress().pages_written > written)  # back at CPL3, writing there
    pair.dst.check()


def test_a_cpl0_page_changed_on_the_target_breaks_verify(pairs: list[Pair]) -> None:
    """The digests cover the guest's CPL0 area: one byte of the workload's page tables changed on the
    target after the stream, and the helpers' digests disagree."""
    pair = Pair("aux-vcpu")
    pairs.append(pair)
    pair.out.send_round()
    pair.finish()
    assert private_digests(pair.src_mb, pair.src) == private_digests(pair.dst_mb, pair.dst)
    unused = abi.PT_WL_GPA + abi.PAGE - 8  # the last PML4 entry: nothing maps through it
    pair.dst.write(unused, b"\x01")
    assert private_digests(pair.src_mb, pair.src) != private_digests(pair.dst_mb, pair.dst)


def test_pages_converted_while_the_guest_migrates_arrive_as_their_final_kind(pairs: list[Pair]) -> None:
    """The workload converts pages private <-> shared (KVM_HC_MAP_GPA_RANGE over the MMIO channel) while
    the rounds run: each converted page goes again as its new kind, the target's bitmap ends equal to the
    source's, both sides' digests agree and the guest's ledger passes on the target."""
    pair = Pair("aux-vcpu", conversion_rate=5000, dirty_rate=4 * abi.MIB)
    pairs.append(pair)
    before = pair.src.enc_bitmap.stats.conversions
    rounds = []
    # rounds until the guest converted 200 pages meanwhile (~40 ms at 5000/s; a short round of a quiet
    # 32 MiB guest takes a few ms, so count conversions, not rounds), within a deadline
    deadline = time.monotonic() + 30
    while len(rounds) < 3 or (
        pair.src.enc_bitmap.stats.conversions - before < 200 and time.monotonic() < deadline
    ):
        rounds.append(pair.out.send_round())
    converted = pair.src.enc_bitmap.stats.conversions - before
    assert converted >= 200 and pair.src.workload.progress().conversions >= converted
    _, status = pair.finish()
    src_bits, dst_bits = pair.src.enc_bitmap.bitmap.view(), pair.dst.enc_bitmap.bitmap.view()
    assert bytes(dst_bits) == bytes(src_bits)
    assert shared_digest(pair.src) == shared_digest(pair.dst)
    assert private_digests(pair.src_mb, pair.src) == private_digests(pair.dst_mb, pair.dst)
    pair.dst.restore_vcpu_states([s.state for s in status.vcpus.values()])
    pair.dst.resume_all_vcpus_except_aux()
    assert pair.dst.workload.check().ok
    done = pair.dst.workload.progress().conversions
    assert until(lambda: pair.dst.workload.progress().conversions > done)  # it goes on converting there


def test_a_page_converted_after_the_scan_is_held_back_and_sent_next_round(pairs: list[Pair]) -> None:
    """The race a confidential migration must not lose: the round read a page's kind as shared, then the
    guest converted it to private (and may have written secrets into it) before the frame was read. That
    page must not leave in the clear: it is held back and goes in the next round, sealed."""
    pair = Pair("aux-vcpu", workload_kind="quiet")
    pairs.append(pair)
    pair.out.send_round()  # the first round sends everything
    lay, enc = pair.src.layout, pair.src.enc_bitmap
    shared_data = [p for p in range(lay.wl_data_pages) if not enc.is_private(lay.data_page_gpa(p) >> 12)]
    page = shared_data[len(shared_data) // 2]
    pair.src.workload.write_pages([page])  # dirty, and shared: the next scan puts it in a shared frame
    gpa = pair.src.layout.data_page_gpa(page)
    real_frame = pair.out._frame_shared

    def guest_converts_first(chunk: array.array[int], scanned: int) -> object:
        if gpa in chunk:  # between the scan and the frame, as a running vCPU could
            pair.src.enc_bitmap.map_gpa_range(gpa, 1, abi.MAP_GPA_RANGE_ENCRYPTED)
        return real_frame(chunk, scanned)

    pair.out._frame_shared = guest_converts_first  # type: ignore[method-assign]
    pair.out.take_shared_gpas()
    pair.out.send_round()
    # (other shared pages may go: KVM writes the guest's pvclock page, which is shared, when it likes)
    assert pair.out.totals.held_back == 1 and gpa not in pair.out.take_shared_gpas()
    pair.out._frame_shared = real_frame  # type: ignore[method-assign]
    third = pair.out.send_round()  # the conversion log put it in this round's set: sealed now
    assert third.sealed_pages >= 1 and gpa not in pair.out.take_shared_gpas()
    assert gpa in pair.out.take_changed_gpas()


def test_a_stranger_on_the_page_port_is_refused_and_the_real_source_migrates(pairs: list[Pair]) -> None:
    pair = Pair("aux-vcpu", strangers=2)  # two strangers connect first; the listener keeps going
    pairs.append(pair)
    pair.out.send_round()
    pair.finish()
    assert len(pair.incoming.refused) == 2  # each closed before it could prove the key
    assert private_digests(pair.src_mb, pair.src) == private_digests(pair.dst_mb, pair.dst)
    with pytest.raises(OSError):  # once the source is in, nobody else can even connect
        socket.create_connection(("127.0.0.1", pair.incoming.listener.getsockname()[1]), timeout=2).close()


def test_private_page_changed_after_copy_breaks_verify(pairs: list[Pair]) -> None:
    pair = Pair("aux-vcpu")
    pairs.append(pair)
    pair.out.send_round()
    pair.finish()
    data = pair.dst.layout.data_page_gpa(3)
    if pair.dst.enc_bitmap.is_private(data // abi.PAGE):
        pair.dst.write(data, b"\xff" * 8)
    else:
        data = pair.dst.layout.wl_ledger_gpa
        pair.dst.write(data, b"\xff" * 8)
    assert private_digests(pair.src_mb, pair.src) != private_digests(pair.dst_mb, pair.dst)


def test_corrupted_frame_is_refused_and_nothing_applied(pairs: list[Pair]) -> None:
    pair = Pair("aux-vcpu", relay=True)
    pairs.append(pair)
    before = bytes(pair.dst.ram.view(pair.dst.layout.wl_base, 64 * abi.PAGE))
    # wire v2: a flipped bit in a protected frame fails its tag, in a sealed record's ciphertext its CRC
    corrupt = r"refused the migration stream: .*(CRC|authentication)"
    with pytest.raises(ConfplanError, match=corrupt) as refused:
        for _ in range(5):
            pair.out.send_round()
    print(refused.value.message)
    status = pair.incoming.wait(10)
    assert status.state is IncomingState.FAILED
    assert any(word in (status.error or "") for word in ("CRC", "crc", "authentication"))
    # the refused frame wrote nothing: the frames before it were the HELLO and at most one page frame
    assert status.shared_pages + status.sealed_pages <= 2048
    assert pair.dst.vcpus[0].state.name in ("CREATED", "PAUSED")  # never resumed
    assert bytes(pair.dst.ram.view(pair.dst.layout.wl_base, 64 * abi.PAGE)) == before or status.shared_pages


def test_changed_gpas_are_the_pages_the_rounds_sent(pairs: list[Pair]) -> None:
    """The change list for the shared CRC table: every page sent since the last take, over any rounds."""
    pair = Pair("aux-vcpu")
    pairs.append(pair)
    out = pair.out
    out.send_round()
    first = set(out.take_changed_gpas())  # every guest page: the CPL0 area too, never the MH's own pages
    assert {abi.GDT_GPA, abi.BOOT_PARAMS_GPA, abi.PT_WL_GPA, abi.KSTACK_GPA, abi.FW_BASE} <= first
    assert not first & {0, abi.PT_MH_GPA, abi.KSTACK_GPA + abi.KSTACK_SIZE, abi.MH_BASE, abi.SECRET_GPA}
    assert len(first) == pair.src.layout.guest_page_mask().bit_count()
    for rounds in (1, 2):  # the pages of one round since the last take, then of two
        sent = 0
        for _ in range(rounds):
            time.sleep(0.05)  # the workload dirties pages meanwhile
            sent += out.send_round().pages
        got = out.take_changed_gpas()
        assert len(got) == sent > 0, rounds  # every page of every round, each round's own list
        guest = pair.src.layout.guest_page_mask()  # the workload area and the guest's CPL0 area
        assert all(gpa % abi.PAGE == 0 and guest >> (gpa // abi.PAGE) & 1 for gpa in got)
        assert len(out.take_changed_gpas()) == 0


def test_sealed_frame_larger_than_a_load_bank_is_refused(pairs: list[Pair]) -> None:
    """The source's helper seals banks of 16 pages (batch 64), this target's helper opens banks of 8: its
    first sealed frame is refused with the reason, before anything of it is LOADed."""
    pair = Pair("aux-vcpu", dst_batch_pages=32)
    pairs.append(pair)
    with pytest.raises(ConfplanError, match=r"refused the migration stream: .*LOAD bank"):
        for _ in range(5):
            pair.out.send_round()
    status = pair.incoming.wait(10)
    assert status.state is IncomingState.FAILED and status.sealed_pages == 0
    assert re.search(r"SEALED_PAGES frame \d+ holds 16 records, more than the 8 slots of a LOAD bank",
                     status.error or ""), status.error  # fmt: skip


def test_replayed_records_are_refused_by_the_target_helper(pairs: list[Pair]) -> None:
    """A second source with the same transport key seals the same pages under generation 1 again: the
    target's helper placed generation 1 already, so its LOADs refuse them (GEN_STALE) and the stream fails
    with the helper's reason."""
    pair = Pair("aux-vcpu")
    pairs.append(pair)
    pair.out.send_round()
    until(lambda: pair.incoming.status.rounds >= 1, 30)  # every LOAD of it done
    assert pair.incoming.status.rounds == 1, pair.incoming.status.error
    pair.incoming.close()
    again = Machine(_config("aux-vcpu"))
    try:
        again.write(abi.SECRET_GPA, _secret(pair.key))
        again.start()
        again.wait_workload(abi.EV_WL_FILLED, timeout=30)
        mailboxes = open_mailboxes(again)
        mailboxes.init()
        listener = socket.create_server(("127.0.0.1", 0))
        pair.incoming = Incoming(pair.dst, listener, hello=pair.hello, stream_key=pair.stream_key,
                                 mailboxes=pair.dst_mb)  # fmt: skip
        tracker = DirtyTracker(again)
        tracker.reset()
        sock = socket.create_connection(("127.0.0.1", listener.getsockname()[1]))
        out = Outgoing(again, sock, hello=pair.hello, stream_key=pair.stream_key, mailboxes=mailboxes,
                       tracker=tracker, next_generation=1)  # fmt: skip
        out.start()
        with pytest.raises(ConfplanError, match=r"refused the migration stream: .*GEN_STALE"):
            for _ in range(5):
                out.send_round()
        status = pair.incoming.wait(10)
        assert status.state is IncomingState.FAILED
        refused = r"mailbox LOAD on MH vCPU \d: \d+ of \d+ pages refused; first: slot \d+, GPA \w+: GEN_STALE"
        assert re.search(refused, status.error or ""), status.error
        sock.close()
    finally:
        again.close()


def test_a_kvm_clock_restored_backwards_is_seen_by_the_guest(pairs: list[Pair]) -> None:
    """The guest's monotonic-clock check can fail: a target that sets the source's kvm-clock 5 s back
    (instead of moved on by the pause) makes the guest read time going backwards."""
    pair = Pair("aux-vcpu", dirty_rate=4 * abi.MIB)
    pairs.append(pair)
    pair.out.send_round()
    assert pair.src.workload.wait_clock_read()
    _, status = pair.finish()
    pair.dst.restore_vcpu_states([s.state for s in status.vcpus.values()])
    apply_clock(pair.dst, status, time.time(), offset_ns=-5_000_000_000)
    pair.dst.resume_all_vcpus_except_aux()
    assert pair.dst.workload.wait_clock_read()
    assert not pair.dst.workload.clock().monotonic


def resume_and_check(pair: Pair, status: IncomingStatus) -> None:
    """Resume the target with the source's vCPU states and clock, and check the guest's data there."""
    pair.dst.restore_vcpu_states([s.state for s in status.vcpus.values()])
    apply_clock(pair.dst, status, time.time())
    pair.dst.resume_all_vcpus_except_aux()
    assert pair.dst.workload.check().ok


def test_a_guest_with_ram_above_4gib_migrates(pairs: list[Pair]) -> None:
    """(v8) RAM goes on above the hole under 4 GiB: 3584 MiB below it and 64 MiB from 4 GiB. Every data
    page the workload keeps there crosses (its ledger passes on the target), the digests agree, and
    nothing of the hole is touched on either side."""
    pair = Pair("aux-vcpu", memory=3648 * abi.MIB, dirty_rate=4 * abi.MIB)
    pairs.append(pair)
    lay = pair.src.layout
    assert lay.ram_ranges() == ((0, abi.RAM_HOLE_START), (abi.RAM_HOLE_END, abi.RAM_HOLE_END + 64 * abi.MIB))
    high = lay.data_page_gpa(lay.wl_data_pages - 1)
    assert high == abi.RAM_HOLE_END + 64 * abi.MIB - abi.PAGE  # the last data page is the last page of RAM
    first = pair.out.send_round()
    assert first.pages > (3648 - 64) * abi.MIB // abi.PAGE  # every guest page, both ranges
    _, status = pair.finish()
    assert pair.dst.ram.read(high, abi.PAGE) == pair.src.ram.read(high, abi.PAGE) != bytes(abi.PAGE)
    assert private_digests(pair.src_mb, pair.src) == private_digests(pair.dst_mb, pair.dst)
    resume_and_check(pair, status)


# ---- parallel streams (wire v4): one channel per helper vCPU ----
def test_two_channels_migrate_and_the_guest_resumes(pairs: list[Pair]) -> None:
    pair = Pair("aux-vcpu", channels=2)
    pairs.append(pair)
    assert [ch.index for ch in pair.out.channels] == [1]
    rounds = [pair.out.send_round() for _ in range(3)]
    assert rounds[0].sealed_pages > 1000
    final, status = pair.finish()
    assert status.sealed_pages == sum(r.sealed_pages for r in [*rounds, final])
    assert status.rounds == 4
    assert shared_digest(pair.src) == shared_digest(pair.dst)
    assert private_digests(pair.src_mb, pair.src) == private_digests(pair.dst_mb, pair.dst)
    resume_and_check(pair, status)


def test_a_migration_on_the_aes_ni_path_verifies_and_resumes(pairs: list[Pair]) -> None:
    """Both helpers held to the AES-NI path (MachineConfig.crypto_impl: what a CPU without VAES runs) for a
    whole migration through the engine: TCP stream, rounds, the pause, verify, resume."""
    if not {"aes", "pclmulqdq", "ssse3", "sse4_1"} <= host_cpu_flags():
        pytest.skip("host CPU lacks AES-NI/PCLMULQDQ: no AES-NI path to force")
    pair = Pair("aux-vcpu", crypto_impl="aes-ni")
    pairs.append(pair)
    for m in (pair.src, pair.dst):
        assert m.console.wait_for("mh: helper vCPU 1 ready, aes aes-ni", timeout=5) is not None
    rounds = [pair.out.send_round() for _ in range(2)]
    final, status = pair.finish()
    assert status.sealed_pages == sum(r.sealed_pages for r in [*rounds, final]) > 1000
    assert private_digests(pair.src_mb, pair.src) == private_digests(pair.dst_mb, pair.dst)
    resume_and_check(pair, status)


def _channel_hello(hello: Hello) -> Hello:
    return dataclasses.replace(hello, channels=2, channel=1)


def test_a_strange_extra_channel_is_refused_and_the_real_one_migrates(pairs: list[Pair]) -> None:
    """Between the main handshake and the source's channel: a stranger with a channel HELLO, a channel of
    another session under the same stream key (another attempt that reused it), and a second main HELLO
    with the right key. Each is refused; the target keeps listening for the real channel."""
    tried: list[str] = []

    def dial(pair: Pair, port: int) -> socket.socket:
        hello = dataclasses.replace(pair.hello, nonce=os.urandom(32))
        other_session = key_schedule(pair.stream_key, hello.pack(), os.urandom(32)).for_source()
        attempts = [(os.urandom(32), _channel_hello(hello)),
                    (other_session.channel_key(1), _channel_hello(hello)),
                    (pair.stream_key, hello)]  # fmt: skip
        for key, their_hello in attempts:
            with socket.create_connection(("127.0.0.1", port)) as sock, pytest.raises(StreamAuthError) as err:
                client_handshake(sock, key, their_hello, timeout=10.0)
            tried.append(err.value.message)
        return socket.create_connection(("127.0.0.1", port))

    pair = Pair("aux-vcpu", channels=2, dial=dial)
    pairs.append(pair)
    assert len(tried) == 3 and len(pair.incoming.refused) == 3, pair.incoming.refused
    # the stranger and the other session cannot check the target's proof of this channel's key: they give
    # up after its CHALLENGE (the target never learns more than that they went); the second main HELLO is
    # refused before any key is used
    assert all("CHALLENGE does not prove" in m for m in tried[:2]), tried
    gave_up = [m.count("closed the connection during the handshake") for m in pair.incoming.refused[:2]]
    assert gave_up == [1, 1]
    assert "channel 0 of 1: not a channel this stream still waits for" in pair.incoming.refused[2]
    pair.out.send_round()
    _, status = pair.finish()
    assert status.state is IncomingState.COMPLETE
    assert private_digests(pair.src_mb, pair.src) == private_digests(pair.dst_mb, pair.dst)


def test_a_channel_cut_mid_round_fails_the_attempt_and_the_source_runs_on(pairs: list[Pair]) -> None:
    relays: list[CuttingRelay] = []

    def dial(pair: Pair, port: int) -> socket.socket:
        relays.append(CuttingRelay(port, after=3 << 20))  # the cut comes in the first round's sealed pages
        return socket.create_connection(("127.0.0.1", relays[-1].port))

    pair = Pair("aux-vcpu", channels=2, dial=dial)
    pairs.append(pair)
    with pytest.raises(ConfplanError, match=r"channel 1 .*(broke|failed)") as failed:
        for _ in range(5):
            pair.out.send_round()
    print(failed.value.message)
    assert relays[0].cut.is_set()
    assert failed.value.hint is not None and "source guest keeps running" in failed.value.hint
    status = pair.incoming.wait(20)
    assert status.state is IncomingState.FAILED
    assert "channel 1" in (status.error or ""), status.error
    assert pair.dst.vcpus[0].state.name in ("CREATED", "PAUSED")  # never resumed
    # the source's guest never stopped, and its memory is whole
    assert all(v.state in (RunState.RUNNING, RunState.PARKED) for v in pair.src.vcpus)
    assert pair.src.workload.check().ok


def test_a_page_frame_after_the_final_round_is_refused(pairs: list[Pair]) -> None:
    """Verify may start on the pages once the final round is in (before DONE): a page frame after it is
    refused, never applied, and the target never completes."""
    pair = Pair("aux-vcpu")
    pairs.append(pair)
    pair.out.send_round(final=True)  # the guest runs on: the next rounds have pages to send
    with pytest.raises(ConfplanError, match=r"refused the migration stream: .*after its final round"):
        for _ in range(5):
            time.sleep(0.05)
            pair.out.send_round()
    status = pair.incoming.wait(10)
    assert status.state is IncomingState.FAILED and "after its final round" in (status.error or "")


def test_a_second_encryption_bitmap_is_refused(pairs: list[Pair]) -> None:
    """Verify's shared digest starts on the first bitmap: another one would be installed unverified."""
    pair = Pair("aux-vcpu")
    pairs.append(pair)
    pair.src.pause_all_vcpus_except_aux()
    pair.out.send_round(final=True)
    bitmap = bytes(pair.src.enc_bitmap.bitmap.view())
    for _ in range(2):
        pair.out._control(DeviceState(ENC_BITMAP_DEVICE, ENC_BITMAP_FORMAT, bitmap))
    status = pair.incoming.wait(10)
    assert status.state is IncomingState.FAILED and "second encryption bitmap" in (status.error or "")


def test_the_core_loops_wake_parked_helpers_through_their_eventfd(
    pairs: list[Pair], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A helper that caught up parks on its vCPU thread's eventfd; the core's loops wake it by writing
    there (no GIL, no Python), never through the poke: the round's kicks all went that way."""
    pokes: list[int] = []
    results: list[LoopResult] = []
    poke, send, receive = SealedPath.poke, DataLoop.send, DataLoop.receive

    def recording_poke(self: SealedPath, mh: int) -> int:
        pokes.append(mh)
        return poke(self, mh)

    def recording(fn: Callable[..., LoopResult]) -> Callable[..., LoopResult]:
        def run(*args: object, **kwargs: object) -> LoopResult:
            results.append(fn(*args, **kwargs))
            return results[-1]

        return run

    monkeypatch.setattr(SealedPath, "poke", recording_poke)
    monkeypatch.setattr(DataLoop, "send", recording(send))
    monkeypatch.setattr(DataLoop, "receive", recording(receive))
    pair = Pair("aux-vcpu", memory=64 * abi.MIB)
    pairs.append(pair)
    assert all(mb.kick_fd >= 0 for mb in (*pair.src_mb.mailboxes, *pair.dst_mb.mailboxes))
    pair.out.send_round()
    _, status = pair.finish()
    assert status.state is IncomingState.COMPLETE
    assert results and sum(r.kicks for r in results) > 0  # helpers parked between ops, and were woken
    assert all(mh < 0 for mh in pokes)  # only the periodic looks went through Python


def test_every_page_a_round_reads_is_rearmed_just_before(pairs: list[Pair]) -> None:
    """With KVM's log turned on with every bit set, a page is write-protected again only by its reader,
    just before it is read (the shared pages by the round, the sealed ones by the core's loop). A round
    over a quiet guest then leaves next to nothing logged (a page it read without re-arming would still be
    reported: thousands of them), and the guest's writes after the round are logged and go next round."""
    pair = Pair("aux-vcpu", workload_kind="quiet", memory=64 * abi.MIB)
    pairs.append(pair)
    if not pair.src.dirty_log.initially_set:
        pytest.skip("KVM offers no KVM_DIRTY_LOG_INITIALLY_SET here: the log goes on write-protected")
    first = pair.out.send_round()
    assert first.pages > 10_000 and first.dirty_after < first.pages // 100
    pair.out.take_changed_gpas()
    pair.src.workload.write_pages([5, 6, 700])
    second = pair.out.send_round()
    assert second.pages < 100
    written = {pair.src.layout.data_page_gpa(p) for p in (5, 6, 700)}
    assert written <= set(pair.out.take_changed_gpas())
    _, status = pair.finish()
    assert status.state is IncomingState.COMPLETE
    assert private_digests(pair.src_mb, pair.src) == private_digests(pair.dst_mb, pair.dst)
