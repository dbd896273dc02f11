"""The per-page MAC table (mailbox v3): MAC_RANGE / MAC_LIST keep one keyed MAC per page in MH memory and
FOLD digests a range from the table, so verify's work in the pause follows the pages changed since. Since
v4, SAVE and LOAD set the entries of the pages they move to the records' tags.

Run against the host build of the MH engine (the same C as the guest's) through the real Mailbox client.
"""

from __future__ import annotations

import array
import ctypes
import os

import pytest

from confplan.migration import mailbox_layout as mbx
from confplan.migration.host_mh import SIDE_TARGET, HostGuest, build_host_library
from confplan.sev.secret_table import CONFPLAN_TRANSPORT_KEY_GUID, build_secret_table

PAGE = 4096
RAM = 12 << 20
WORK = 0x400000  # first page past the host guest's MH area
CHUNK = 256  # pages per digest chunk in these tests (1 MiB)
NPAGES = (RAM - WORK) // PAGE


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    return build_host_library(tmp_path_factory.mktemp("mh-mactable"))


@pytest.fixture(scope="module")
def secret() -> bytes:
    return build_secret_table({CONFPLAN_TRANSPORT_KEY_GUID: os.urandom(32)})


def _guest(lib: ctypes.CDLL, secret: bytes, *, mh_vcpus: int = 2, side: int = 0) -> HostGuest:
    guest = HostGuest(lib, ram_size=RAM, secret=secret, mh_vcpus=mh_vcpus, side=side)
    assert guest.mh_base + guest.mh_size <= WORK
    guest.mailboxes.init()
    return guest


def _fill(guest: HostGuest, content: bytes) -> None:
    guest.ram[WORK:RAM] = content


def test_fold_of_a_current_table_equals_the_digest(lib: ctypes.CDLL, secret: bytes) -> None:
    with _guest(lib, secret) as guest:
        _fill(guest, os.urandom(RAM - WORK))
        assert guest.mailboxes.mac_range(WORK, NPAGES, chunk_pages=CHUNK) == NPAGES
        folded = guest.mailboxes.fold(WORK, NPAGES, chunk_pages=CHUNK)
        assert folded == guest.mailboxes.digest(WORK, NPAGES, chunk_pages=CHUNK)
        assert len(folded) == NPAGES // CHUNK and len(set(folded)) == len(folded)
        # a range that starts inside the MH area folds (skipping it) like DIGEST does
        low = guest.mailboxes.mailboxes[0]
        assert low.finish_fold(low.post_fold(WORK - 8 * PAGE, 40, 64), 1) == [low.digest(WORK - 8 * PAGE, 40)]


def test_the_table_follows_memory_only_where_mac_list_is_asked(lib: ctypes.CDLL, secret: bytes) -> None:
    with _guest(lib, secret) as guest:
        _fill(guest, os.urandom(RAM - WORK))
        guest.mailboxes.mac_range(WORK, NPAGES, chunk_pages=CHUNK)
        before = guest.mailboxes.fold(WORK, NPAGES, chunk_pages=CHUNK)
        changed = [WORK + 3 * PAGE, WORK + 700 * PAGE]  # chunks 0 and 2
        for gpa in changed:
            guest.ram[gpa + 17] ^= 0x40
        # the table still holds the old MACs: the fold is stale until the pages are MAC'd again
        assert guest.mailboxes.fold(WORK, NPAGES, chunk_pages=CHUNK) == before
        assert guest.mailboxes.mac_list(array.array("Q", changed)) == 2
        after = guest.mailboxes.fold(WORK, NPAGES, chunk_pages=CHUNK)
        assert after == guest.mailboxes.digest(WORK, NPAGES, chunk_pages=CHUNK)
        assert [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b] == [0, 2]


def test_a_posted_mac_list_is_the_mac_list_once_finished(lib: ctypes.CDLL, secret: bytes) -> None:
    """What the pause and the MAC fill use: the MACs posted over the helpers, the caller's own work
    meanwhile, then the wait; and a list longer than one MAC_LIST per helper holds, MAC'd at once."""
    content = os.urandom(RAM - WORK)
    with _guest(lib, secret, mh_vcpus=2) as posted, _guest(lib, secret, mh_vcpus=1) as plain:
        for guest in (posted, plain):
            _fill(guest, content)
            guest.mailboxes.mac_range(WORK, NPAGES, chunk_pages=CHUNK)
            guest.ram[WORK + 9 * PAGE] ^= 1
        moved = array.array("Q", [WORK + p * PAGE for p in (9, 10, 500, NPAGES - 1)])
        finish = posted.mailboxes.post_mac_list(moved)
        assert plain.mailboxes.mac_list(moved) == 4
        assert finish() == 4
        assert posted.mailboxes.fold(WORK, NPAGES, chunk_pages=CHUNK) == plain.mailboxes.fold(
            WORK, NPAGES, chunk_pages=CHUNK
        )
        many = array.array("Q", [WORK] * (2 * posted.mailboxes.mailboxes[0].mac_list_capacity + 1))
        assert posted.mailboxes.post_mac_list(many)() == len(many)
        assert posted.mailboxes.post_mac_list(array.array("Q"))() == 0


def test_two_sides_agree_exactly_when_their_pages_do(lib: ctypes.CDLL, secret: bytes) -> None:
    content = os.urandom(RAM - WORK)
    with _guest(lib, secret, mh_vcpus=2) as src, _guest(lib, secret, mh_vcpus=1, side=SIDE_TARGET) as dst:
        for guest in (src, dst):
            _fill(guest, content)
            guest.mailboxes.mac_range(WORK, NPAGES, chunk_pages=CHUNK)
        # the same pages written on both sides (what a final round does), then MAC'd on both
        moved = array.array("Q", [WORK + p * PAGE for p in (5, 6, 1000, NPAGES - 1)])
        for gpa in moved:
            page = os.urandom(PAGE)
            src.ram[gpa : gpa + PAGE] = page
            dst.ram[gpa : gpa + PAGE] = page
        src.mailboxes.mac_list(moved)
        dst.mailboxes.mac_list(moved)
        assert src.mailboxes.fold(WORK, NPAGES, chunk_pages=CHUNK) == dst.mailboxes.fold(
            WORK, NPAGES, chunk_pages=CHUNK
        )
        # one byte that differs on the target, once MAC'd, shows in exactly its chunk
        dst.ram[WORK + 1000 * PAGE + 5] ^= 1
        dst.mailboxes.mac_list(array.array("Q", [WORK + 1000 * PAGE]))
        ours = src.mailboxes.fold(WORK, NPAGES, chunk_pages=CHUNK)
        theirs = dst.mailboxes.fold(WORK, NPAGES, chunk_pages=CHUNK)
        assert [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b] == [1000 // CHUNK]


def test_save_and_load_set_equal_entries_with_no_pass_over_the_pages(lib: ctypes.CDLL, secret: bytes) -> None:
    """Mailbox v4: SAVE stores each sealed page's GCM tag as its entry and LOAD, once the tag verified, the
    same: the tables fold equal with no MAC_RANGE. A page the stream never moved still refuses the fold, a
    refused record leaves the target's entry, and a page sealed again differs until the target loads it."""
    content = os.urandom(RAM - WORK)
    skip = 8  # pages 0..7 of the workload area never move
    with _guest(lib, secret, mh_vcpus=1) as src, _guest(lib, secret, mh_vcpus=1, side=SIDE_TARGET) as dst:
        _fill(src, content)
        s, d = src.mailboxes.mailboxes[0], dst.mailboxes.mailboxes[0]

        def move(pages: range, generation: int, *, flip: bool = False) -> int:
            gpas = array.array("Q", (WORK + p * PAGE for p in pages))
            records = s.save(gpas, generation).records
            d.slots[: len(records)] = records
            if flip:
                d.slots[100] ^= 1  # a ciphertext byte of the first record
            return d.load(len(gpas)).n_ok

        for start in range(skip, NPAGES, s.batch_pages):
            pages = range(start, min(start + s.batch_pages, NPAGES))
            assert move(pages, 1) == len(pages)
        assert dst.ram[WORK + skip * PAGE : RAM] == content[skip * PAGE :]
        with pytest.raises(mbx.MailboxError) as err:
            src.mailboxes.fold(WORK, NPAGES, chunk_pages=CHUNK)
        assert err.value.status == mbx.MhStatus.MAC_MISSING

        def folds() -> tuple[list[bytes], list[bytes]]:
            rest, n = WORK + skip * PAGE, NPAGES - skip
            ours, theirs = (g.mailboxes.fold(rest, n, chunk_pages=CHUNK) for g in (src, dst))
            return ours, theirs

        ours, theirs = folds()
        assert ours == theirs
        assert move(range(skip, skip + 1), 2, flip=True) == 0  # refused: the target keeps its old entry
        assert folds()[1] == theirs and folds()[0] != theirs
        assert move(range(skip, skip + 1), 3) == 1
        now = folds()
        assert now[0] == now[1] and now[0] != ours


def test_a_page_never_maced_refuses_the_fold(lib: ctypes.CDLL, secret: bytes) -> None:
    with _guest(lib, secret, mh_vcpus=1) as guest:
        guest.mailboxes.mac_range(WORK, NPAGES - 1, chunk_pages=CHUNK)  # the last page left out
        assert guest.mac_of(RAM - PAGE) == bytes(16) and guest.mac_of(WORK) != bytes(16)
        with pytest.raises(mbx.MailboxError) as err:
            guest.mailboxes.fold(WORK, NPAGES, chunk_pages=CHUNK)
        assert err.value.status == mbx.MhStatus.MAC_MISSING and "no MAC" in err.value.message
        assert len(guest.mailboxes.fold(WORK, NPAGES - 1, chunk_pages=CHUNK)) == -(-(NPAGES - 1) // CHUNK)


def test_mac_list_refuses_gpas_outside_the_workload_and_says_which(lib: ctypes.CDLL, secret: bytes) -> None:
    with _guest(lib, secret, mh_vcpus=1) as guest:
        mb = guest.mailboxes.mailboxes[0]
        for gpa, status in ((guest.mh_base, "GPA_MH"), (WORK + 8, "GPA_ALIGN"), (RAM, "GPA_RANGE")):
            before = guest.mac_of(WORK)
            with pytest.raises(mbx.MailboxError) as err:
                mb.finish_mac(mbx.Op.MAC_LIST, mb.post_mac_list(array.array("Q", [WORK, gpa])))
            assert err.value.status == mbx.MhStatus.PARTIAL and f"{gpa:#x} (index 1)" in err.value.message
            assert guest.mac_of(WORK) != bytes(16), status  # the good GPA of the list was MAC'd
            assert before == bytes(16) or guest.mac_of(WORK) == before
        with pytest.raises(ValueError):
            mb.post_mac_list(array.array("Q", [WORK] * (mb.mac_list_capacity + 1)))


def test_table_ops_need_the_key_and_a_fold_must_fit_the_slots(lib: ctypes.CDLL, secret: bytes) -> None:
    with HostGuest(lib, ram_size=RAM, secret=secret, mh_vcpus=1) as guest:
        mb = guest.mailboxes.mailboxes[0]
        with pytest.raises(mbx.MailboxError) as err:
            mb.finish_mac(mbx.Op.MAC_RANGE, mb.post_mac_range(WORK, 4))
        assert err.value.status == mbx.MhStatus.NO_KEY
        mb.init()
        too_many = mb.batch_pages * mbx.SLOT_SIZE // mbx.DIGEST_BYTES + 1  # one digest more than fits
        seq = mb.post(mbx.Op.FOLD, count=1, arg0=WORK, arg1=too_many)
        assert mb.wait(mbx.Op.FOLD, seq) == mbx.MhStatus.COUNT
