"""Seal in guest A, move the bytes through the C page core, open in guest B: the real protocol on both sides.

Each guest is a ``HostGuest``: RAM laid out as the firmware ABI says, the MH's C engine (the same sources
as the guest image) serving its mailboxes in threads, driven by the real ``Mailbox`` client. No KVM needed;
the booted-guest versions of these tests come with integration.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import os
import struct
from collections.abc import Iterator
from typing import cast

import pytest

from confplan.core import frame_sealed_pages, unframe_sealed_pages
from confplan.core.wire import sealed_frame_size
from confplan.migration import Mailbox, MailboxError, MhStatus, Op
from confplan.migration.host_mh import SIDE_TARGET, HostGuest, build_host_library
from confplan.migration.mailbox import BatchResult
from confplan.migration.mailbox_layout import SLOT_GPA, SLOT_KEY_ID, SLOT_NONCE, SLOT_SIZE, SLOT_TAG
from confplan.sev.secret_table import CONFPLAN_TRANSPORT_KEY_GUID, build_secret_table
from confplan.vmm import abi

PAGE = 4096
RAM = 8 << 20
PRIVATE = range(0x400000, RAM, PAGE)  # the "workload's" pages: everything above the MH area
TARGET_FILL = 0x5A  # the target's pages before any LOAD: a write by a refused LOAD would show


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    return build_host_library(tmp_path_factory.mktemp("mh-roundtrip"))


def _secret(key: bytes) -> bytes:
    return build_secret_table({CONFPLAN_TRANSPORT_KEY_GUID: key})


@contextlib.contextmanager
def _pair(
    lib: ctypes.CDLL, *, mh_vcpus: int = 1, target_key: bytes | None = None
) -> Iterator[tuple[HostGuest, HostGuest]]:
    key = os.urandom(32)
    with (
        HostGuest(lib, ram_size=RAM, secret=_secret(key), mh_vcpus=mh_vcpus, timeout=10) as src,
        HostGuest(lib, ram_size=RAM, secret=_secret(target_key or key), mh_vcpus=mh_vcpus, side=SIDE_TARGET,
                  timeout=10) as dst,
    ):  # fmt: skip
        src.ram[PRIVATE.start : PRIVATE.stop] = os.urandom(len(PRIVATE) * PAGE)
        dst.ram[PRIVATE.start : PRIVATE.stop] = bytes([TARGET_FILL]) * (len(PRIVATE) * PAGE)
        src.mailboxes.init()
        dst.mailboxes.init()
        yield src, dst


def _seal(src: HostGuest, gpas: array.array[int], generation: int) -> list[bytes]:
    """SAVE on the source, framed by the C core exactly as the source VMM will: one frame per MH batch."""
    frames: list[bytes] = []
    for first in range(0, len(gpas), src.mailboxes.capacity):
        part = gpas[first : first + src.mailboxes.capacity]
        offset = 0
        for _, result in src.mailboxes.save(part, generation):
            n = len(result.statuses)
            frame = bytearray(sealed_frame_size(n))
            frame_sealed_pages(result.records, n, frame, seq=len(frames), ram_size=src.ram_size,
                               expected_gpas=part[offset : offset + n])  # fmt: skip
            frames.append(bytes(frame))
            offset += n
    return frames


def _open(dst: HostGuest, frames: list[bytes]) -> list[BatchResult]:
    """Unframe each frame into a target mailbox's slots (the core checks it first), then LOAD in parallel."""
    results: list[BatchResult] = []
    mbs = dst.mailboxes.mailboxes
    for first in range(0, len(frames), len(mbs)):
        counts = [0] * len(mbs)
        for i, frame in enumerate(frames[first : first + len(mbs)]):
            counts[i] = unframe_sealed_pages(frame, mbs[i].slots, ram_size=dst.ram_size).count
        results.extend(dst.mailboxes.load(counts))
    return results


def _load_raw(dst: HostGuest, records: bytes) -> BatchResult:
    """Put records straight into the slots (a hostile VMM skips the core's checks) and LOAD them."""
    mb = dst.mailboxes.mailboxes[0]
    mb.slots[: len(records)] = records
    return mb.load(len(records) // SLOT_SIZE)


def _gpas(pages: range | list[int]) -> array.array[int]:
    return array.array("Q", pages)


def _statuses(results: list[BatchResult]) -> list[int]:
    return [s for r in results for s in r.statuses]


def test_private_pages_arrive_identical_and_digests_agree(lib: ctypes.CDLL) -> None:
    with _pair(lib, mh_vcpus=2) as (src, dst):
        frames = _seal(src, _gpas(PRIVATE), generation=1)
        results = _open(dst, frames)
        assert _statuses(results) == [0] * len(PRIVATE)
        assert dst.ram[PRIVATE.start : PRIVATE.stop] == src.ram[PRIVATE.start : PRIVATE.stop]
        assert dst.generation_of(PRIVATE.start) == dst.generation_of(PRIVATE.stop - PAGE) == 1
        # DIGEST in the guests over all RAM (the MH areas differ and are skipped), 2 helpers in parallel
        npages = RAM // PAGE
        d_src = src.mailboxes.digest(0, npages, chunk_pages=512)
        assert d_src == dst.mailboxes.digest(0, npages, chunk_pages=512)
        assert len(d_src) == 4 and len(set(d_src)) == 4
        dst.ram[0x6ABCDE] ^= 0x01  # one bit of one byte
        d_dst = dst.mailboxes.digest(0, npages, chunk_pages=512)
        assert [a == b for a, b in zip(d_src, d_dst, strict=True)] == [True, True, True, False]


def test_records_use_distinct_nonces_prefixed_by_each_helpers_sender_id(lib: ctypes.CDLL) -> None:
    with _pair(lib, mh_vcpus=2) as (src, _):
        results = src.mailboxes.save(_gpas(PRIVATE[:128]), 1)
        senders = {mb.mh_index: mb.init().sender_id for mb, _ in results}
        nonces = []
        for mb, result in results:
            for i in range(len(result.statuses)):
                nonce = bytes(result.records[i * SLOT_SIZE + SLOT_NONCE : i * SLOT_SIZE + SLOT_NONCE + 12])
                assert struct.unpack(">I", nonce[:4])[0] == senders[mb.mh_index]
                nonces.append(nonce)
        assert len(set(nonces)) == len(nonces) == 128
        assert len(set(senders.values())) == 2


def test_a_newer_round_replaces_pages_and_older_or_equal_generations_are_refused(lib: ctypes.CDLL) -> None:
    with _pair(lib) as (src, dst):
        dirty = _gpas(PRIVATE[:40])
        round1 = _seal(src, dirty, generation=1)
        assert _statuses(_open(dst, round1)) == [0] * 40
        src.ram[PRIVATE.start : PRIVATE.start + 40 * PAGE] = os.urandom(40 * PAGE)
        round2 = _seal(src, dirty, generation=2)
        assert _statuses(_open(dst, round2)) == [0] * 40
        placed = dst.ram[PRIVATE.start : PRIVATE.start + 40 * PAGE]
        assert placed == src.ram[PRIVATE.start : PRIVATE.start + 40 * PAGE]
        for replay in (round1, round2):  # older, then the same generation again
            assert _statuses(_open(dst, replay)) == [MhStatus.GEN_STALE] * 40
        assert dst.ram[PRIVATE.start : PRIVATE.start + 40 * PAGE] == placed
        assert dst.generation_of(PRIVATE.start) == 2


def _one_record(src: HostGuest, gpa: int, generation: int = 1) -> bytearray:
    (_, result), = src.mailboxes.save(_gpas([gpa]), generation)  # fmt: skip
    return bytearray(result.records[:SLOT_SIZE])


def _tampered(record: bytearray, offset: int, value: bytes | None = None) -> bytes:
    out = bytearray(record)
    if value is None:
        out[offset] ^= 0x80
    else:
        out[offset : offset + len(value)] = value
    return bytes(out)


@pytest.mark.parametrize(
    ("what", "offset", "value", "status"),
    [
        ("ciphertext byte", 64 + 1000, None, MhStatus.AUTH),
        ("tag byte", SLOT_TAG + 5, None, MhStatus.AUTH),
        ("nonce byte", SLOT_NONCE + 11, None, MhStatus.AUTH),
        ("GPA moved to another private page", SLOT_GPA, struct.pack("<Q", 0x700000), MhStatus.AUTH),
        ("generation raised", 8, struct.pack("<I", 7), MhStatus.AUTH),
        ("key id", SLOT_KEY_ID, None, MhStatus.KEY_ID),
        ("reserved byte", 50, None, MhStatus.RESERVED),
        ("status set", 12, struct.pack("<I", 1), MhStatus.RESERVED),
        ("GPA beyond RAM", SLOT_GPA, struct.pack("<Q", RAM), MhStatus.GPA_RANGE),
        ("GPA in the MH area", SLOT_GPA, struct.pack("<Q", abi.SECRET_GPA), MhStatus.GPA_MH),
        ("GPA unaligned", SLOT_GPA, struct.pack("<Q", 0x500010), MhStatus.GPA_ALIGN),
        ("generation 0", 8, struct.pack("<I", 0), MhStatus.GEN_INVALID),
    ],
)
def test_tampered_records_are_refused_and_write_nothing(
    lib: ctypes.CDLL, what: str, offset: int, value: bytes | None, status: MhStatus
) -> None:
    with _pair(lib) as (src, dst):
        record, genuine = _one_record(src, 0x500000), _one_record(src, 0x501000)
        before = bytes(dst.ram)
        bad = _tampered(record, offset, value)
        result = _load_raw(dst, bad + bytes(genuine))  # slot 0 tampered, slot 1 a genuine record
        assert list(result.statuses) == [status, MhStatus.OK], what
        assert (result.n_ok, result.n_refused, result.first_bad) == (1, 1, 0)
        after = bytes(dst.ram)
        assert after[0x501000 : 0x501000 + PAGE] == src.page(0x501000)
        changed = [i for i in range(0, RAM, PAGE) if before[i : i + PAGE] != after[i : i + PAGE]]
        mailbox_pages = range(dst.mailbox_gpa(0), dst.mailbox_gpa(0) + dst.stride)
        assert [i for i in changed if i not in mailbox_pages] == [0x501000], what
        assert dst.generation_of(0x500000) == 0


def test_a_target_with_another_key_refuses_everything(lib: ctypes.CDLL) -> None:
    with _pair(lib, target_key=os.urandom(32)) as (src, dst):
        record = _one_record(src, 0x480000)
        assert list(_load_raw(dst, bytes(record)).statuses) == [MhStatus.KEY_ID]
        forged = _tampered(record, SLOT_KEY_ID, struct.pack("<I", dst.mailboxes.mailboxes[0].init().key_id))
        assert list(_load_raw(dst, forged).statuses) == [MhStatus.AUTH]
        assert dst.page(0x480000) == bytes([TARGET_FILL]) * PAGE
        assert dst.generation_of(0x480000) == 0


def test_save_refuses_pages_a_vmm_must_not_ask_for(lib: ctypes.CDLL) -> None:
    with _pair(lib) as (src, _):
        bad = _gpas([0x400000, abi.SECRET_GPA, RAM + PAGE, 0x400800, 0x401000])
        with pytest.raises(MailboxError) as exc:
            src.mailboxes.save(bad, 1)
        err = exc.value
        assert list(err.statuses or []) == [0, MhStatus.GPA_MH, MhStatus.GPA_RANGE, MhStatus.GPA_ALIGN, 0]
        assert "SAVE on MH vCPU 0" in str(err) and "slot 1" in str(err) and "helper's own area" in str(err)
        with pytest.raises(MailboxError, match="GEN_STALE"):  # the source never seals a GPA twice per round
            src.mailboxes.save(_gpas([0x400000]), 1)
        with pytest.raises(MailboxError, match="GEN_INVALID"):
            src.mailboxes.save(_gpas([0x402000]), 0)


def test_the_canary_never_reaches_a_byte_the_host_handles(lib: ctypes.CDLL) -> None:
    marker = b"CANARY-PRIVATE!!"
    with _pair(lib, mh_vcpus=2) as (src, dst):
        src.ram[PRIVATE.start : PRIVATE.stop] = marker * (len(PRIVATE) * PAGE // len(marker))
        frames = _seal(src, _gpas(PRIVATE), generation=1)
        host_bytes = b"".join(frames) + b"".join(
            bytes(src.ram[src.mailbox_gpa(i) : src.mailbox_gpa(i) + src.stride]) for i in range(2)
        )
        assert marker[:8] not in host_bytes and marker[8:] not in host_bytes
        assert _statuses(_open(dst, frames)) == [0] * len(PRIVATE)
        assert dst.ram[PRIVATE.start : PRIVATE.start + len(marker)] == marker  # it did travel, sealed


def test_malformed_secret_fails_init_with_its_status(lib: ctypes.CDLL) -> None:
    table = bytearray(_secret(os.urandom(32)))
    struct.pack_into("<I", table, 36, 200)  # the key entry claims to run past the table
    with HostGuest(lib, ram_size=RAM, secret=bytes(table), timeout=10) as guest:
        with pytest.raises(MailboxError) as exc:
            guest.mailboxes.init()
        assert exc.value.status == MhStatus.SECRET_ENTRY and exc.value.op == Op.INIT
        assert "INIT on MH vCPU 0 failed: SECRET_ENTRY" in str(exc.value)
        with pytest.raises(MailboxError, match="NO_KEY"):
            guest.mailboxes.save(_gpas([0x400000]), 1)


def test_reset_forgets_the_key_and_reinit_keeps_anti_replay_and_nonces(lib: ctypes.CDLL) -> None:
    with _pair(lib) as (src, dst):
        old = _one_record(src, 0x440000, generation=1)
        assert list(_load_raw(dst, bytes(old)).statuses) == [0]
        src.mailboxes.reset()
        dst.mailboxes.reset()
        with pytest.raises(MailboxError, match="NO_KEY"):
            dst.mailboxes.mailboxes[0].digest(0x400000, 1)
        src.mailboxes.init()
        dst.mailboxes.init()
        assert list(_load_raw(dst, bytes(old)).statuses) == [MhStatus.GEN_STALE]
        new = _one_record(src, 0x441000, generation=1)
        assert new[SLOT_NONCE : SLOT_NONCE + 12] != old[SLOT_NONCE : SLOT_NONCE + 12]
        assert struct.unpack(">Q", new[SLOT_NONCE + 4 : SLOT_NONCE + 12])[0] == 1  # the counter went on


def test_op_level_errors_and_timeouts_name_the_op_and_the_helper(lib: ctypes.CDLL) -> None:
    with _pair(lib) as (_, dst):
        mb = dst.mailboxes.mailboxes[0]
        assert mb.wait(Op.LOAD, mb.post(Op.LOAD, count=mb.batch_pages + 1)) == MhStatus.COUNT
        assert mb.wait(Op.INIT, mb.post(cast(Op, 99))) == MhStatus.BAD_OP
        with pytest.raises(MailboxError, match="GPA_RANGE"):
            mb.digest(RAM - PAGE, 2)
    dead = Mailbox(memoryview(bytearray(PAGE + 4 * SLOT_SIZE)), mh_index=3, batch_pages=4, kick=lambda: None,
                   timeout=0.05)  # fmt: skip
    with pytest.raises(MailboxError, match=r"mailbox INIT on MH vCPU 3 got no answer within 0.05 s"):
        dead.init()
