"""Protocol v2's op ring and the pipelined ``save_stream``/``load_stream``, on the host build of the MH.

Each guest is a ``HostGuest`` (the MH's C engine in threads, the real ``Mailbox`` client), as in
test_mailbox_roundtrip.py; the booted-guest stream test is in test_mh_guest.py.
"""

from __future__ import annotations

import array
import ctypes

import pytest
from hostpair import PAGE, PRIVATE, host_pair

from confplan.migration import Mailbox, MailboxError, MhStatus, Op
from confplan.migration.host_mh import HostGuest, build_host_library
from confplan.migration.mailbox import BatchResult
from confplan.migration.mailbox_layout import RING, SLOT_GPA, SLOT_SIZE


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    return build_host_library(tmp_path_factory.mktemp("mh-stream"))


def _stream_across(src: HostGuest, dst: HostGuest, gpas: array.array[int], gen: int, banks: int) -> list[int]:
    """save_stream on the source into a byte buffer, load_stream from it on the target; returns the GPAs
    in the order the source's consume saw them."""
    records, seen = bytearray(), []

    def consume(_mb: Mailbox, result: BatchResult) -> None:
        assert result.gpas is not None and len(result.records) == len(result.gpas) * SLOT_SIZE
        sealed = [int.from_bytes(result.records[i + SLOT_GPA : i + 8], "little")
                  for i in range(0, len(result.records), SLOT_SIZE)]  # fmt: skip
        assert sealed == list(result.gpas)  # each record is the page asked for in its slot
        seen.extend(result.gpas)
        records.extend(result.records)

    at = [0]

    def fill(_mb: Mailbox, slots: memoryview) -> int:
        n = min(len(slots), len(records) - at[0])
        slots[:n] = records[at[0] : at[0] + n]
        at[0] += n
        return n // SLOT_SIZE

    src.mailboxes.save_stream(gpas, gen, consume, banks=banks)
    dst.mailboxes.load_stream(fill, banks=banks)
    assert at[0] == len(records) == len(gpas) * SLOT_SIZE
    return seen


@pytest.mark.parametrize(("mh_vcpus", "banks"), [(1, 2), (2, 4), (1, 1)])
def test_streamed_pages_arrive_identical(lib: ctypes.CDLL, mh_vcpus: int, banks: int) -> None:
    with host_pair(lib, mh_vcpus=mh_vcpus) as (src, dst):
        gpas = array.array("Q", PRIVATE)  # 1024 pages: many times the mailboxes' 64 slots
        seen = _stream_across(src, dst, gpas, 1, banks)
        assert sorted(seen) == list(gpas)
        assert dst.ram[PRIVATE.start : PRIVATE.stop] == src.ram[PRIVATE.start : PRIVATE.stop]
        ops = sum(mb.counters()["ops"] for mb in src.mailboxes.mailboxes)
        bank = src.batch_pages // banks
        assert ops == 1 * mh_vcpus + len(gpas) // bank  # INIT on each, then one SAVE per bank's worth


def test_a_bank_count_that_does_not_divide_the_slots_still_streams_every_page(lib: ctypes.CDLL) -> None:
    # 64 slots in 3 banks: a bank is 21 slots and one slot is left over; no op may run past the slots.
    with host_pair(lib, 1) as (src, dst):
        assert src.batch_pages % 3 != 0
        gpas = array.array("Q", PRIVATE)
        seen = _stream_across(src, dst, gpas, 1, banks=3)
        assert sorted(seen) == list(gpas)
        assert dst.ram[PRIVATE.start : PRIVATE.stop] == src.ram[PRIVATE.start : PRIVATE.stop]


def test_a_stream_refuses_a_replayed_round_and_names_the_page(lib: ctypes.CDLL) -> None:
    with host_pair(lib, 1) as (src, dst):
        gpas = array.array("Q", PRIVATE[:200])
        _stream_across(src, dst, gpas, 5, 2)
        with pytest.raises(MailboxError, match=r"SAVE on MH vCPU 0: 32 of 32 pages refused.*GEN_STALE"):
            src.mailboxes.save_stream(gpas, 5, lambda _mb, _r: None, banks=2)
        # the ops queued behind the refused one finish on their own; the mailbox works on afterwards
        mb = src.mailboxes.mailboxes[0]
        assert mb.save(gpas[:3], 6).n_ok == 3


def test_a_target_stream_reports_forged_records_to_consume(lib: ctypes.CDLL) -> None:
    with host_pair(lib, 1) as (src, dst):
        gpas = array.array("Q", PRIVATE[:100])
        records = bytearray()
        src.mailboxes.save_stream(gpas, 1, lambda _mb, r: records.extend(r.records), banks=2)
        records[7 * SLOT_SIZE + 100] ^= 1  # one ciphertext bit of page 7
        at, statuses = [0], array.array("I")

        def fill(_mb: Mailbox, slots: memoryview) -> int:
            n = min(len(slots), len(records) - at[0])
            slots[:n] = records[at[0] : at[0] + n]
            at[0] += n
            return n // SLOT_SIZE

        dst.mailboxes.load_stream(fill, lambda _mb, r: statuses.extend(r.statuses), banks=2)
        assert [i for i, s in enumerate(statuses) if s] == [7] and statuses[7] == MhStatus.AUTH
        page7 = gpas[7]
        assert dst.ram[page7 : page7 + PAGE] == bytes(PAGE)  # a refused record writes nothing


def test_queued_ops_use_their_own_slots_and_ring_entries(lib: ctypes.CDLL) -> None:
    with host_pair(lib, 1) as (src, _):
        mb = src.mailboxes.mailboxes[0]
        parts = [(0, array.array("Q", PRIVATE[0:10])), (10, array.array("Q", PRIVATE[10:15])),
                 (40, array.array("Q", [PRIVATE[20], 0x1001, PRIVATE[21]]))]  # fmt: skip
        posted = [(mb.post_save(g, 3, first=first), first, g) for first, g in parts]
        results = [mb.finish(Op.SAVE, seq, len(g), first=first, gpas=g) for seq, first, g in posted]
        no = 0xFFFFFFFF
        assert [(r.n_ok, r.n_refused, r.first_bad) for r in results] == [(10, 0, no), (5, 0, no), (2, 1, 1)]
        assert results[2].refused() == [(1, MhStatus.GPA_ALIGN)]
        for seq, _, _ in posted:
            start, end = mb.op_tsc(seq)
            assert 0 < start <= end  # the helper stamps each op with the TSC
        # slot ranges past the mailbox's slots are refused by the helper, not only by the client
        seq = mb.post(Op.SAVE, count=2, generation=4, first=mb.batch_pages - 1)
        assert mb.wait(Op.SAVE, seq) == MhStatus.COUNT
        with pytest.raises(ValueError, match="from slot 63"):
            mb.post_save([PRIVATE[0], PRIVATE[1]], 4, first=63)


def test_the_client_never_queues_more_than_the_ring_holds() -> None:
    mb = Mailbox(memoryview(bytearray(PAGE + 4 * SLOT_SIZE)), mh_index=1, batch_pages=4, kick=lambda: None,
                 timeout=0.05)  # fmt: skip
    for _ in range(RING):
        mb.post(Op.RESET)
    assert mb.queued == RING
    with pytest.raises(ValueError, match=f"MH vCPU 1: {RING} ops are queued already"):
        mb.post(Op.RESET)
