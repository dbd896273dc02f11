"""The C page-transfer core through its Python API: CRC, zero pages, bitmap scans, shared and sealed frames.

Guest RAM here is a bytearray or an anonymous mmap; sealed records are made with real AES-256-GCM so the
test also shows the record carries everything the target helper needs to open a page.
"""

from __future__ import annotations

import array
import ctypes
import mmap
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from confplan.core import (
    CoreStatus,
    PageCoreError,
    _lib,
    crc32c,
    crc_table,
    forget_pages,
    frame_sealed_pages,
    frame_shared_pages,
    page_is_zero,
    scan_dirty,
    unframe_sealed_pages,
    unframe_shared_pages,
)
from confplan.core.wire import (
    HEADER_SIZE,
    MAX_FRAME_PAGES,
    PAGE_SIZE,
    SEALED_PAGE_SIZE,
    FrameType,
    finish_frame,
    pack_sealed_header,
    sealed_aad,
    sealed_frame_size,
    shared_frame_capacity,
)
from confplan.errors import EnvironmentProblem

# ---------------------------------------------------------------------------------------------------------
# references (slow and obvious, for small inputs)


def crc32c_reference(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def scan_reference(dirty: bytes, shared: bytes | None, npages: int, base: int) -> tuple[list[int], list[int]]:
    shared_gpas, private_gpas = [], []
    for page in range(npages):
        if dirty[page // 8] >> (page % 8) & 1:
            is_shared = shared is not None and shared[page // 8] >> (page % 8) & 1
            (shared_gpas if is_shared else private_gpas).append(base + page * PAGE_SIZE)
    return shared_gpas, private_gpas


def random_ram(npages: int, zero_pages: set[int], seed: int = 1) -> bytearray:
    rng = random.Random(seed)
    ram = bytearray(rng.randbytes(npages * PAGE_SIZE))
    for p in zero_pages:
        ram[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
    return ram


def gpa_list(pages: list[int], base: int = 0) -> array.array[int]:
    return array.array("Q", [base + p * PAGE_SIZE for p in pages])


def shared_frame(ram: bytearray, pages: list[int], seq: int = 7) -> bytearray:
    out = bytearray(shared_frame_capacity(len(pages)))
    info = frame_shared_pages(ram, gpa_list(pages), out, seq=seq)
    return out[: info.frame_len]


def reseal_header(frame: bytearray) -> None:
    """Recompute the header CRC after a test changed a header field (a forged but well-sealed header)."""
    frame[28:32] = crc32c(bytes(frame[:28])).to_bytes(4, "little")


def refused(code: CoreStatus, frame: bytes | bytearray, ram: bytearray) -> PageCoreError:
    before = bytes(ram)
    with pytest.raises(PageCoreError) as info:
        unframe_shared_pages(frame, ram)
    assert info.value.code is code, info.value.message
    assert ram == before, "a refused frame wrote into guest RAM"
    return info.value


# ---------------------------------------------------------------------------------------------------------
# CRC-32C and zero pages


def test_crc32c_known_answers() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert crc32c(b"\xff" * 32) == 0x62A8AB43  # RFC 3720 B.4: 32 bytes of 0xff


@pytest.mark.parametrize("size", [1, 7, 8, 9, 255, 767, 768, 769, 6143, 6144, 6151, 20000])
def test_crc32c_matches_reference_across_the_3_stream_paths(size: int) -> None:
    data = random.Random(size).randbytes(size)
    assert crc32c(data) == crc32c_reference(data)
    cut = size // 3
    assert crc32c(data[cut:], crc32c(data[:cut])) == crc32c(data), "chaining must equal one pass"


@pytest.fixture
def software_crc() -> Iterator[None]:
    dll = _lib.lib()
    was_hw = dll.cp_query(_lib.Q_CRC_HW)
    assert dll.cp_crc32c_select(0) == 0
    try:
        yield
    finally:
        dll.cp_crc32c_select(was_hw)


@pytest.mark.usefixtures("software_crc")
@pytest.mark.parametrize("size", [9, 4096, 20000])
def test_software_crc32c_fallback_matches_reference(size: int) -> None:
    assert crc32c(b"123456789") == 0xE3069283
    data = random.Random(size).randbytes(size)
    assert crc32c(data) == crc32c_reference(data)
    src = random_ram(2, set())
    dst = bytearray(len(src))
    unframe_shared_pages(shared_frame(src, [0, 1]), dst)  # frames built and checked by the fallback
    assert dst == src


def test_crc32c_reads_memoryview_slices_and_mmap() -> None:
    data = bytearray(random.Random(3).randbytes(10000))
    assert crc32c(memoryview(data)[5:9001]) == crc32c_reference(bytes(data[5:9001]))
    with mmap.mmap(-1, len(data)) as mm:
        mm[:] = data
        assert crc32c(mm) == crc32c(bytes(data))


def test_page_is_zero_finds_one_set_byte_anywhere() -> None:
    page = bytearray(PAGE_SIZE)
    assert page_is_zero(page)
    for pos in (0, 255, 256, 2049, PAGE_SIZE - 1):
        page[pos] = 0x80
        assert not page_is_zero(page), pos
        page[pos] = 0


# ---------------------------------------------------------------------------------------------------------
# bitmap scan


@pytest.mark.parametrize("npages", [1, 63, 64, 65, 130, 1000])
@pytest.mark.parametrize("density", [0.0, 0.02, 0.5, 1.0])
def test_scan_matches_reference(npages: int, density: float) -> None:
    rng = random.Random(npages * 100 + int(density * 10))
    nbytes = (npages + 63) // 64 * 8
    dirty = bytearray(nbytes)
    for page in range(npages):
        if rng.random() < density:
            dirty[page // 8] |= 1 << (page % 8)
    shared = rng.randbytes(nbytes)
    base = 0x1_0000_0000
    got_shared, got_private = scan_dirty(dirty, shared, npages, gpa_base=base)
    want_shared, want_private = scan_reference(bytes(dirty), shared, npages, base)
    assert list(got_shared) == want_shared
    assert list(got_private) == want_private


def test_scan_ignores_bits_past_npages_and_treats_no_shared_bitmap_as_all_private() -> None:
    dirty = array.array("Q", [(1 << 64) - 1])  # 64 bits set, only 3 pages exist
    shared_gpas, private_gpas = scan_dirty(dirty, None, 3)
    assert list(shared_gpas) == []
    assert list(private_gpas) == [0, PAGE_SIZE, 2 * PAGE_SIZE]


def test_scan_refuses_a_bitmap_shorter_than_npages() -> None:
    with pytest.raises(ValueError, match="dirty bitmap has 8 bytes, 65 pages need 16"):
        scan_dirty(bytes(8), None, 65)


# ---------------------------------------------------------------------------------------------------------
# SHARED_PAGES


def test_shared_round_trip_in_batches_with_zero_pages_on_mmap_ram() -> None:
    npages = 300
    zero = {0, 5, 6, 150, 299}
    src = random_ram(npages, zero)
    sent = sorted(set(random.Random(2).sample(range(npages), 200)) | zero)
    gpas = gpa_list(sent)
    with mmap.mmap(-1, npages * PAGE_SIZE) as dst:
        dst[:] = b"\xa5" * len(dst)  # earlier-round content the zero pages must overwrite
        frame = bytearray(shared_frame_capacity(64))
        received = array.array("Q", bytes(8 * 64))
        zero_total = 0
        for seq, start in enumerate(range(0, len(gpas), 64)):
            batch = memoryview(gpas)[start : start + 64]
            info = frame_shared_pages(src, batch, frame, seq=seq)
            assert info.type is FrameType.SHARED_PAGES and info.count == len(batch)
            back = unframe_shared_pages(memoryview(frame)[: info.frame_len], dst, gpas_out=received)
            assert (back.seq, back.count, back.zero_pages) == (seq, info.count, info.zero_pages)
            assert received[: back.count] == array.array("Q", batch)
            zero_total += back.zero_pages
        assert zero_total == len(zero)
        for p in range(npages):
            page = slice(p * PAGE_SIZE, (p + 1) * PAGE_SIZE)
            want = src[page] if p in sent else b"\xa5" * PAGE_SIZE
            assert dst[page] == want, f"page {p}"


def test_zero_pages_travel_without_payload() -> None:
    ram = random_ram(4, {1, 2})
    frame = shared_frame(ram, [0, 1, 2, 3])
    assert len(frame) == HEADER_SIZE + 8 + 4 * 16 + 2 * PAGE_SIZE


def test_gpa_base_maps_a_memslot_that_does_not_start_at_zero() -> None:
    base = 0x100000
    ram = random_ram(8, set())
    out = bytearray(shared_frame_capacity(2))
    info = frame_shared_pages(ram, gpa_list([2, 7], base), out, seq=0, gpa_base=base)
    dst = bytearray(len(ram))
    unframe_shared_pages(out[: info.frame_len], dst, gpa_base=base)
    assert dst[2 * PAGE_SIZE : 3 * PAGE_SIZE] == ram[2 * PAGE_SIZE : 3 * PAGE_SIZE]
    with pytest.raises(PageCoreError) as below:
        frame_shared_pages(ram, array.array("Q", [base - PAGE_SIZE]), out, seq=0, gpa_base=base)
    assert below.value.code is CoreStatus.GPA_RANGE


@pytest.mark.parametrize(
    ("gpa", "code"),
    [
        (16 * PAGE_SIZE, CoreStatus.GPA_RANGE),
        (2**63, CoreStatus.GPA_RANGE),
        (PAGE_SIZE + 8, CoreStatus.GPA_ALIGN),
    ],
)
def test_source_refuses_a_gpa_outside_ram(gpa: int, code: CoreStatus) -> None:
    ram = random_ram(16, set())
    out = bytearray(shared_frame_capacity(2))
    with pytest.raises(PageCoreError) as info:
        frame_shared_pages(ram, array.array("Q", [0, gpa]), out, seq=0)
    assert info.value.code is code
    assert info.value.index == 1
    assert f"{gpa:#x}" in info.value.message


def test_source_refuses_too_many_pages_and_a_small_buffer() -> None:
    ram = random_ram(4, set())
    with pytest.raises(PageCoreError) as many:
        frame_shared_pages(ram, array.array("Q", [0]) * (MAX_FRAME_PAGES + 1), bytearray(64), seq=0)
    assert many.value.code is CoreStatus.COUNT
    with pytest.raises(PageCoreError) as small:
        frame_shared_pages(ram, gpa_list([0, 1]), bytearray(shared_frame_capacity(1)), seq=0)
    assert small.value.code is CoreStatus.SPACE


# header fields: (offset, size) in the 32-byte header, and what a flipped byte there must be refused as
HEADER_FIELDS = {
    "magic": (0, CoreStatus.MAGIC),
    "version": (4, CoreStatus.VERSION),
    "type": (6, CoreStatus.HEADER_CRC),
    "flags": (8, CoreStatus.HEADER_CRC),
    "payload_len": (12, CoreStatus.HEADER_CRC),
    "seq": (16, CoreStatus.HEADER_CRC),
    "payload_crc32c": (24, CoreStatus.HEADER_CRC),
    "header_crc32c": (28, CoreStatus.HEADER_CRC),
}


@pytest.mark.parametrize("field", HEADER_FIELDS)
def test_corrupted_header_field_is_refused_and_nothing_written(field: str) -> None:
    src = random_ram(8, {3})
    frame = shared_frame(src, [1, 3, 4])
    offset, code = HEADER_FIELDS[field]
    frame[offset] ^= 0x01
    refused(code, frame, bytearray(len(src)))


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("type", (FrameType.SEALED_PAGES).to_bytes(2, "little"), CoreStatus.TYPE),
        ("type", (99).to_bytes(2, "little"), CoreStatus.TYPE),
        ("flags", (1).to_bytes(4, "little"), CoreStatus.FLAGS),
        ("payload_len", (17 << 20).to_bytes(4, "little"), CoreStatus.PAYLOAD_LEN),
        ("payload_len", (3 * PAGE_SIZE).to_bytes(4, "little"), CoreStatus.TRUNCATED),
    ],
)
def test_forged_header_with_a_valid_crc_is_still_refused(field: str, value: bytes, code: CoreStatus) -> None:
    src = random_ram(8, set())
    frame = shared_frame(src, [1, 2])
    offset = HEADER_FIELDS[field][0]
    frame[offset : offset + len(value)] = value
    reseal_header(frame)
    refused(code, frame, bytearray(len(src)))


def test_corrupted_payload_is_refused_by_its_crc() -> None:
    src = random_ram(8, set())
    frame = shared_frame(src, [1, 2])
    frame[HEADER_SIZE + 8 + 16 + 100] ^= 0x40
    error = refused(CoreStatus.PAYLOAD_CRC, frame, bytearray(len(src)))
    assert "SHARED_PAGES frame 7 refused" in error.message


@pytest.mark.parametrize("keep", [0, 10, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 40, -1])
def test_truncated_frame_is_refused(keep: int) -> None:
    src = random_ram(4, set())
    frame = shared_frame(src, [0, 1])
    refused(CoreStatus.TRUNCATED, frame[:keep], bytearray(len(src)))


def forge_payload(
    frame: bytearray, offset: int, value: bytes, *, payload_len: int | None = None
) -> bytearray:
    """Change payload bytes and seal the frame again, so only the structural checks can catch it."""
    frame[HEADER_SIZE + offset : HEADER_SIZE + offset + len(value)] = value
    length = len(frame) - HEADER_SIZE if payload_len is None else payload_len
    finish_frame(frame, FrameType.SHARED_PAGES, 7, length)
    return frame


def test_target_refuses_gpa_beyond_its_ram_and_writes_nothing() -> None:
    src = random_ram(16, set())
    frame = shared_frame(src, [0, 15])
    small_target = bytearray(8 * PAGE_SIZE)
    error = refused(CoreStatus.GPA_RANGE, frame, small_target)
    assert error.index == 1  # page 0 was valid, but it was not written either


@pytest.mark.parametrize(
    ("offset", "value", "code"),
    [
        (0, (MAX_FRAME_PAGES + 1).to_bytes(4, "little"), CoreStatus.COUNT),
        (0, (3).to_bytes(4, "little"), CoreStatus.PAYLOAD_LEN),  # count says 3, two entries follow
        (0, (1).to_bytes(4, "little"), CoreStatus.PAYLOAD_LEN),  # a whole entry of trailing bytes
        (4, (1).to_bytes(4, "little"), CoreStatus.FLAGS),  # prefix reserved
        (8 + 8, (2).to_bytes(4, "little"), CoreStatus.FLAGS),  # unknown entry flag
        (8 + 12, (1).to_bytes(4, "little"), CoreStatus.FLAGS),  # entry reserved
        (8, (PAGE_SIZE + 1).to_bytes(8, "little"), CoreStatus.GPA_ALIGN),
        (8 + 16 + PAGE_SIZE + 8, (1).to_bytes(4, "little"), CoreStatus.PAYLOAD_LEN),  # ZERO on the last entry
    ],
)
def test_forged_entries_are_refused(offset: int, value: bytes, code: CoreStatus) -> None:
    src = random_ram(4, set())
    frame = forge_payload(shared_frame(src, [0, 1]), offset, value)
    refused(code, frame, bytearray(len(src)))


def test_shared_unframe_refuses_a_sealed_frame() -> None:
    area = sealed_area([(0, 1)])
    frame = bytearray(sealed_frame_size(1))
    frame_sealed_pages(area, 1, frame, seq=0, ram_size=PAGE_SIZE)
    refused(CoreStatus.TYPE, frame, bytearray(PAGE_SIZE))


@settings(max_examples=60, deadline=None)
@given(
    pages=st.lists(st.integers(0, 31), min_size=0, max_size=40),
    zero=st.sets(st.integers(0, 31)),
    seq=st.integers(0, 2**64 - 1),
    flip=st.integers(0, 2**32),
)
def test_round_trip_and_any_single_byte_flip_is_refused(
    pages: list[int], zero: set[int], seq: int, flip: int
) -> None:
    src = random_ram(32, zero, seed=len(pages))
    frame = shared_frame(src, pages, seq=seq)
    dst = bytearray(b"\x11" * len(src))
    info = unframe_shared_pages(frame, dst)
    assert (info.seq, info.count) == (seq, len(pages))
    for p in set(pages):
        assert dst[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] == src[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]
    bad = bytearray(frame)
    bad[flip % len(bad)] ^= 1 << (flip % 8)
    fresh = bytearray(len(src))
    with pytest.raises(PageCoreError):
        unframe_shared_pages(bad, fresh)
    assert fresh == bytes(len(src))


# ---------------------------------------------------------------------------------------------------------
# SEALED_PAGES

KEY = bytes(range(32))
MIGRATION_ID = bytes.fromhex("00112233445566778899aabbccddeeff")


def seal(gpa: int, generation: int, plaintext: bytes) -> bytes:
    """One record as the migration helper writes it: AES-256-GCM, AAD = gpa | generation | migration id."""
    nonce = gpa.to_bytes(8, "little") + generation.to_bytes(4, "little")
    sealed = AESGCM(KEY).encrypt(nonce, plaintext, sealed_aad(gpa, generation, MIGRATION_ID))
    ct, tag = sealed[:-16], sealed[-16:]
    return pack_sealed_header(gpa, generation, nonce, tag) + ct


def plaintext_of(page: int) -> bytes:
    return random.Random(page).randbytes(PAGE_SIZE)


def sealed_area(pages: list[tuple[int, int]], spare: int = 0) -> bytearray:
    return bytearray(b"".join(seal(p * PAGE_SIZE, g, plaintext_of(p)) for p, g in pages) + bytes(spare))


def test_sealed_round_trip_opens_on_the_target() -> None:
    pages = [(3, 1), (9, 1), (0, 2), (63, 2)]
    area = sealed_area(pages, spare=SEALED_PAGE_SIZE)  # the data area may be larger than the batch
    expected = gpa_list([p for p, _ in pages])
    frame = bytearray(sealed_frame_size(len(pages)) + 100)
    info = frame_sealed_pages(
        area, len(pages), frame, seq=11, ram_size=64 * PAGE_SIZE, expected_gpas=expected
    )
    assert (info.count, info.frame_len, info.type) == (4, sealed_frame_size(4), FrameType.SEALED_PAGES)
    target = bytearray(8 * SEALED_PAGE_SIZE)
    gpas = array.array("Q", bytes(8 * 4))
    back = unframe_sealed_pages(frame[: info.frame_len], target, ram_size=64 * PAGE_SIZE, gpas_out=gpas)
    assert (back.seq, back.count) == (11, 4)
    assert gpas == expected
    for i, (page, generation) in enumerate(pages):
        rec = target[i * SEALED_PAGE_SIZE : (i + 1) * SEALED_PAGE_SIZE]
        gpa = int.from_bytes(rec[:8], "little")
        nonce, tag, ct = bytes(rec[16:28]), bytes(rec[32:48]), bytes(rec[64:])
        opened = AESGCM(KEY).decrypt(nonce, ct + tag, sealed_aad(gpa, generation, MIGRATION_ID))
        assert opened == plaintext_of(page)


def record_field(area: bytearray, index: int, offset: int, value: bytes) -> bytearray:
    start = index * SEALED_PAGE_SIZE + offset
    area[start : start + len(value)] = value
    return area


@pytest.mark.parametrize(
    ("offset", "value", "code"),
    [
        (12, (5).to_bytes(4, "little"), CoreStatus.SEAL_STATUS),
        (48, b"\x01", CoreStatus.FLAGS),
        (0, (64 * PAGE_SIZE).to_bytes(8, "little"), CoreStatus.GPA_RANGE),
        (0, (8 * PAGE_SIZE + 1).to_bytes(8, "little"), CoreStatus.GPA_ALIGN),
        (0, (7 * PAGE_SIZE).to_bytes(8, "little"), CoreStatus.GPA_MISMATCH),
    ],
)
def test_source_refuses_a_bad_sealed_record(offset: int, value: bytes, code: CoreStatus) -> None:
    area = record_field(sealed_area([(1, 1), (8, 1)]), 1, offset, value)
    with pytest.raises(PageCoreError) as info:
        frame_sealed_pages(
            area, 2, bytearray(sealed_frame_size(2)), seq=0, ram_size=64 * PAGE_SIZE,
            expected_gpas=gpa_list([1, 8]),
        )  # fmt: skip
    assert info.value.code is code
    assert info.value.index == 1


@pytest.mark.parametrize(
    ("forge", "code"),
    [
        ("record_status", CoreStatus.SEAL_STATUS),
        ("gpa_beyond_target", CoreStatus.GPA_RANGE),
        ("count", CoreStatus.PAYLOAD_LEN),
        ("payload_byte", CoreStatus.PAYLOAD_CRC),
        ("small_area", CoreStatus.SPACE),
    ],
)
def test_target_refuses_a_bad_sealed_frame_and_writes_nothing(forge: str, code: CoreStatus) -> None:
    frame = bytearray(sealed_frame_size(2))
    frame_sealed_pages(sealed_area([(1, 1), (8, 1)]), 2, frame, seq=3, ram_size=64 * PAGE_SIZE)
    body = HEADER_SIZE + 8
    target, ram_size = bytearray(2 * SEALED_PAGE_SIZE), 64 * PAGE_SIZE
    if forge == "record_status":
        frame[body + SEALED_PAGE_SIZE + 12] = 1
    elif forge == "gpa_beyond_target":
        ram_size = 8 * PAGE_SIZE  # the target's RAM is smaller than the source's
    elif forge == "count":
        frame[HEADER_SIZE] = 1
    elif forge == "small_area":
        target = bytearray(SEALED_PAGE_SIZE)
    if forge == "payload_byte":
        frame[body + SEALED_PAGE_SIZE + 20] ^= 1  # a record header's nonce: wire v3's CRC covers the headers
    else:
        finish_frame(frame, FrameType.SEALED_PAGES, 3, len(frame) - HEADER_SIZE)
    before = bytes(target)
    with pytest.raises(PageCoreError) as info:
        unframe_sealed_pages(frame, target, ram_size=ram_size)
    assert info.value.code is code
    assert target == before


def test_source_checks_its_copy_not_guest_memory() -> None:
    # the frame must carry exactly what was checked: frame the records, then change the data area
    area = sealed_area([(1, 1)])
    frame = bytearray(sealed_frame_size(1))
    frame_sealed_pages(area, 1, frame, seq=0, ram_size=64 * PAGE_SIZE)
    record_field(area, 0, 0, (999 * PAGE_SIZE).to_bytes(8, "little"))
    target = bytearray(SEALED_PAGE_SIZE)
    unframe_sealed_pages(frame, target, ram_size=64 * PAGE_SIZE)
    assert int.from_bytes(target[:8], "little") == PAGE_SIZE


# ---------------------------------------------------------------------------------------------------------
# layout pins and the loader


def test_struct_layouts_are_pinned() -> None:
    assert ctypes.sizeof(_lib.FrameHeaderC) == HEADER_SIZE
    assert ctypes.sizeof(_lib.SealedPageC) == SEALED_PAGE_SIZE == 4160
    offsets = {name: getattr(_lib.SealedPageC, name).offset for name, *_ in _lib.SealedPageC._fields_}
    assert offsets == {
        "gpa": 0, "generation": 8, "status": 12, "nonce": 16, "key_id": 28, "tag": 32, "reserved": 48,
        "ct": 64,
    }  # fmt: skip
    header = {name: getattr(_lib.FrameHeaderC, name).offset for name, *_ in _lib.FrameHeaderC._fields_}
    assert header == {
        "magic": 0, "version": 4, "type": 6, "flags": 8, "payload_len": 12, "seq": 16, "payload_crc32c": 24,
        "header_crc32c": 28,
    }  # fmt: skip


def test_missing_library_is_an_environment_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_lib.importlib.machinery, "EXTENSION_SUFFIXES", [".not-built.so"])
    with pytest.raises(EnvironmentProblem) as info:
        _lib.library_path()
    assert "not built" in info.value.message
    assert info.value.hint is not None and "make install" in info.value.hint


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build a stand-in library")
def test_stale_library_is_refused_by_its_abi_version(tmp_path: Path) -> None:
    source = tmp_path / "stale.c"
    source.write_text("int cp_abi_version(void) { return 99; }\n")
    built = tmp_path / "stale.so"
    subprocess.run(["gcc", "-shared", "-fPIC", str(source), "-o", str(built)], check=True)
    dll = ctypes.CDLL(str(built))
    with pytest.raises(EnvironmentProblem, match=f"ABI version 99, this confplan needs {_lib.ABI_VERSION}"):
        _lib._check_layout(dll, built)


def test_gpa_lists_of_any_alignment() -> None:
    src = random_ram(8, set())
    raw = bytearray(4 + 16)
    raw[4:] = gpa_list([6, 2]).tobytes()
    out = bytearray(shared_frame_capacity(2))
    info = frame_shared_pages(src, memoryview(raw)[4:], out, seq=0)
    received = bytearray(3 + 16)
    dst = bytearray(len(src))
    unframe_shared_pages(out[: info.frame_len], dst, gpas_out=memoryview(received)[3:])
    assert received[3:] == raw[4:]
    assert dst[6 * PAGE_SIZE : 7 * PAGE_SIZE] == src[6 * PAGE_SIZE : 7 * PAGE_SIZE]


def test_crc_table_caches_page_crcs_and_folds_them_in_list_order() -> None:
    """verify's shared-page CRC table in C: computes only entries not valid, folds the list in its order."""
    ram = bytearray(random.Random(7).randbytes(16 * PAGE_SIZE))
    crcs, valid = array.array("I", bytes(4 * 16)), bytearray(16)
    gpas = array.array("Q", [3 * PAGE_SIZE, 0, 9 * PAGE_SIZE])
    page_crcs = [crc32c(ram[g : g + PAGE_SIZE]) for g in gpas]
    want = crc32c(array.array("I", page_crcs), crc32c(gpas))
    assert crc_table(ram, gpas, crcs, valid, crc=crc32c(gpas)) == (want, 3)
    assert [i for i, v in enumerate(valid) if v] == [0, 3, 9]
    ram[3 * PAGE_SIZE] ^= 1  # not forgotten: the cached CRC stands, nothing is computed
    assert crc_table(ram, gpas, crcs, valid, crc=crc32c(gpas)) == (want, 0)
    valid[3] = 0  # forgotten: computed again, and the fold changes
    got, computed = crc_table(ram, gpas, crcs, valid, crc=crc32c(gpas))
    assert computed == 1 and got != want
    with pytest.raises(PageCoreError, match="GPA"):
        crc_table(ram, array.array("Q", [16 * PAGE_SIZE]), crcs, valid)


def test_forget_pages_drops_the_listed_entries_or_none() -> None:
    valid = bytearray(b"\x01" * 16)
    forget_pages(array.array("Q", [3 * PAGE_SIZE, 0, 3 * PAGE_SIZE]), valid)
    assert [i for i, v in enumerate(valid) if not v] == [0, 3]
    with pytest.raises(PageCoreError, match="GPA"):  # one GPA outside the table: nothing changes
        forget_pages(array.array("Q", [5 * PAGE_SIZE, 16 * PAGE_SIZE]), valid)
    assert valid[5] == 1
    with pytest.raises(PageCoreError, match="GPA"):
        forget_pages(array.array("Q", [5 * PAGE_SIZE + 1]), valid)
