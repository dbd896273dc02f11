"""The typed API over the C core: bitmap scans, shared-page gather/scatter, sealed-record framing, CRC-32C.

Every function takes buffers (bytes, bytearray, mmap, memoryview, array, ctypes arrays) or ``HostMemory``
and hands them to C in one call: Python never loops over pages. GPA lists are ``array('Q')`` (or any
buffer of little-endian u64). Refusals raise ``PageCoreError`` naming the frame, the page and the value;
a refused frame has written nothing into guest RAM or the data area.
"""

from __future__ import annotations

import array
import ctypes
from dataclasses import dataclass

from confplan.core._buffers import Memory, pinned, pinned_optional, zeroed
from confplan.core._lib import Q_CRC_HW, ErrorC, FrameInfoC, lib
from confplan.core.status import CoreStatus, PageCoreError, raise_for
from confplan.core.wire import MAX_FRAME_PAGES, PAGE_SIZE, SEALED_PAGE_SIZE, FrameType


@dataclass(frozen=True)
class FrameInfo:
    """What a frame held: its number, type, pages (or records), zero pages, and its length in bytes."""

    seq: int
    type: FrameType
    count: int
    zero_pages: int
    frame_len: int

    @classmethod
    def _from_c(cls, info: FrameInfoC) -> FrameInfo:
        return cls(
            int(info.seq), FrameType(info.type), int(info.count), int(info.zero_pages), int(info.frame_len)
        )


def crc32c(data: Memory, crc: int = 0) -> int:
    """CRC-32C (Castagnoli) of ``data``; pass a previous result as ``crc`` to continue it."""
    with pinned(data, writable=False, what="crc32c data") as (addr, n):
        return int(lib().cp_crc32c(crc, addr, n))


def crc32c_uses_hardware() -> bool:
    """True when the core uses the SSE4.2 crc32 instruction (else slice-by-8 in software)."""
    return bool(lib().cp_query(Q_CRC_HW))


def crc_table(
    ram: Memory, gpas: Memory, crcs: Memory, valid: Memory, *, crc: int = 0, gpa_base: int = 0,
    ram_size: int | None = None,
) -> tuple[int, int]:
    """A cached CRC-32C per page, folded: each listed page's CRC comes from ``crcs`` (u32 per page of RAM)
    where ``valid`` (a byte per page) says it is current, else it is computed and stored. Returns ``crc``
    continued over the page CRCs (u32 LE) in list order, and how many pages were computed."""
    err, out, computed = ErrorC(), ctypes.c_uint32(crc), ctypes.c_uint64()
    with (
        pinned(ram, writable=False, what="guest RAM") as (r, rlen),
        pinned(gpas, writable=False, what="GPA list") as (g, glen),
        pinned(crcs, writable=True, what="CRC table") as (c, clen),
        pinned(valid, writable=True, what="valid table") as (v, vlen),
    ):
        count = _gpa_count(glen, "GPA list")
        pages = min(clen // 4, vlen)
        rc = lib().cp_crc_table(r, gpa_base, _ram_size(rlen, ram_size), g, count, c, v, pages,
                                ctypes.byref(out), ctypes.byref(computed), ctypes.byref(err))  # fmt: skip
    raise_for(rc, err, "the shared-page CRC table")
    return int(out.value), int(computed.value)


def forget_pages(gpas: Memory, valid: Memory, *, gpa_base: int = 0) -> None:
    """``crc_table``'s forget: ``valid[page] = 0`` for each listed GPA (u64), in C; a GPA outside the table
    raises before any entry changes."""
    err = ErrorC()
    with (
        pinned(gpas, writable=False, what="GPA list") as (g, glen),
        pinned(valid, writable=True, what="valid table") as (v, vlen),
    ):
        rc = lib().cp_forget_pages(g, _gpa_count(glen, "GPA list"), gpa_base, v, vlen, ctypes.byref(err))
    raise_for(rc, err, "the shared-page CRC table")


def page_is_zero(page: Memory) -> bool:
    """True when the first 4096 bytes of ``page`` are all zero."""
    with pinned(page, writable=False, what="page") as (addr, n):
        if n < PAGE_SIZE:
            raise ValueError(f"page_is_zero needs {PAGE_SIZE} bytes, got {n}")
        return bool(lib().cp_page_is_zero(addr))


def _bitmap_words(npages: int) -> int:
    return (npages + 63) // 64


def _need_bitmap(addr_len: int, npages: int, what: str) -> None:
    need = _bitmap_words(npages) * 8
    if addr_len < need:
        raise ValueError(f"{what} bitmap has {addr_len} bytes, {npages} pages need {need}")


def _gpa_count(gpas_len: int, what: str) -> int:
    if gpas_len % 8:
        raise ValueError(f"{what} must hold whole u64 GPAs, got {gpas_len} bytes")
    return gpas_len // 8


def scan_dirty(
    dirty: Memory, shared: Memory | None, npages: int, *, gpa_base: int = 0
) -> tuple[array.array[int], array.array[int]]:
    """Split the dirty pages into (shared GPAs, private GPAs), ascending.

    ``dirty`` is KVM's dirty bitmap and ``shared`` the page-encryption bitmap (bit set = shared; None means
    every page is private), both little-endian u64 words, bit i = page i of a memslot at ``gpa_base``.
    """
    dll = lib()
    n_shared, n_private, err = ctypes.c_uint64(), ctypes.c_uint64(), ErrorC()
    with (
        pinned(dirty, writable=False, what="dirty bitmap") as (d, dlen),
        pinned_optional(shared, writable=False, what="shared bitmap") as (s, slen),
    ):
        _need_bitmap(dlen, npages, "dirty")
        if s is not None:
            _need_bitmap(slen, npages, "shared")
        rc = dll.cp_scan_count(d, s, npages, ctypes.byref(n_shared), ctypes.byref(n_private))
        raise_for(rc, err, "scanning the dirty bitmap")
        shared_out, private_out = zeroed("Q", n_shared.value), zeroed("Q", n_private.value)
        with (
            pinned(shared_out, writable=True, what="shared GPAs") as (so, _),
            pinned(private_out, writable=True, what="private GPAs") as (po, _),
        ):
            rc = dll.cp_scan(
                d, s, npages, gpa_base, so, len(shared_out), po, len(private_out),
                ctypes.byref(n_shared), ctypes.byref(n_private), ctypes.byref(err),
            )  # fmt: skip
    raise_for(rc, err, "scanning the dirty bitmap")
    return shared_out, private_out


def _check_count(count: int, what: str) -> None:
    if count > MAX_FRAME_PAGES:
        raise PageCoreError(
            f"{what}: {count} pages in one frame, the maximum is {MAX_FRAME_PAGES}",
            code=CoreStatus.COUNT,
            value=count,
            expected=MAX_FRAME_PAGES,
            hint="split the GPA list into batches of at most MAX_FRAME_PAGES",
        )


def frame_shared_pages(
    ram: Memory, gpas: Memory, out: Memory, *, seq: int, gpa_base: int = 0, ram_size: int | None = None
) -> FrameInfo:
    """Gather the shared pages at ``gpas`` from guest RAM into a SHARED_PAGES frame at the start of ``out``.

    All-zero pages are sent as a ZERO flag without payload. ``ram`` starts at GPA ``gpa_base`` and spans
    ``ram_size`` bytes (default: its whole length). ``out`` needs ``shared_frame_capacity(len(gpas))`` bytes
    at most; the frame is ``out[:info.frame_len]``.
    """
    what = f"framing shared pages (frame {seq})"
    err, info = ErrorC(), FrameInfoC()
    with (
        pinned(ram, writable=False, what="guest RAM") as (r, rlen),
        pinned(gpas, writable=False, what="GPA list") as (g, glen),
        pinned(out, writable=True, what="frame buffer") as (o, olen),
    ):
        count = _gpa_count(glen, "GPA list")
        _check_count(count, what)
        size = _ram_size(rlen, ram_size)
        rc = lib().cp_frame_shared(
            o, olen, r, gpa_base, size, g, count, seq, ctypes.byref(info), ctypes.byref(err)
        )
    raise_for(rc, err, what)
    return FrameInfo._from_c(info)


def unframe_shared_pages(
    frame: Memory,
    ram: Memory,
    *,
    gpa_base: int = 0,
    ram_size: int | None = None,
    gpas_out: Memory | None = None,
) -> FrameInfo:
    """Check a SHARED_PAGES frame completely, then scatter its pages into guest RAM (zero pages cleared).

    ``gpas_out`` (a writable u64 buffer), when given, receives the GPAs written, in frame order.
    """
    err, info = ErrorC(), FrameInfoC()
    with (
        pinned(frame, writable=False, what="frame") as (f, flen),
        pinned(ram, writable=True, what="guest RAM") as (r, rlen),
        pinned_optional(gpas_out, writable=True, what="GPA output") as (g, glen),
    ):
        size = _ram_size(rlen, ram_size)
        rc = lib().cp_unframe_shared(
            f, flen, r, gpa_base, size, g, glen // 8, ctypes.byref(info), ctypes.byref(err)
        )
    raise_for(rc, err, f"SHARED_PAGES frame {_seq_of(frame, flen)} refused")
    return FrameInfo._from_c(info)


def frame_sealed_pages(
    records: Memory,
    count: int,
    out: Memory,
    *,
    seq: int,
    ram_size: int,
    gpa_base: int = 0,
    expected_gpas: Memory | None = None,
) -> FrameInfo:
    """Frame ``count`` sealed page records from the start of ``records`` (the helper's data area).

    The records are copied into ``out`` and the copy is checked: status OK, reserved bytes zero, GPA inside
    guest RAM, and equal to ``expected_gpas[i]`` when that list is given. ``out`` needs
    ``sealed_frame_size(count)`` bytes.
    """
    what = f"framing sealed pages (frame {seq})"
    _check_count(count, what)
    err, info = ErrorC(), FrameInfoC()
    with (
        pinned(records, writable=False, what="sealed records") as (rec, rlen),
        pinned(out, writable=True, what="frame buffer") as (o, olen),
        pinned_optional(expected_gpas, writable=False, what="expected GPAs") as (e, elen),
    ):
        if rlen < count * SEALED_PAGE_SIZE:
            raise ValueError(f"the data area holds {rlen // SEALED_PAGE_SIZE} records, {count} asked for")
        if expected_gpas is not None and _gpa_count(elen, "expected GPAs") < count:
            raise ValueError(f"{elen // 8} expected GPAs for {count} records")
        rc = lib().cp_frame_sealed(
            o, olen, rec, count, e, gpa_base, ram_size, seq, ctypes.byref(info), ctypes.byref(err)
        )
    raise_for(rc, err, what)
    return FrameInfo._from_c(info)


def unframe_sealed_pages(
    frame: Memory, records: Memory, *, ram_size: int, gpa_base: int = 0, gpas_out: Memory | None = None
) -> FrameInfo:
    """Check a SEALED_PAGES frame completely, then copy its records to the start of ``records``."""
    err, info = ErrorC(), FrameInfoC()
    with (
        pinned(frame, writable=False, what="frame") as (f, flen),
        pinned(records, writable=True, what="data area") as (rec, rlen),
        pinned_optional(gpas_out, writable=True, what="GPA output") as (g, glen),
    ):
        rc = lib().cp_unframe_sealed(
            f, flen, rec, rlen // SEALED_PAGE_SIZE, gpa_base, ram_size, g, glen // 8,
            ctypes.byref(info), ctypes.byref(err),
        )  # fmt: skip
    raise_for(rc, err, f"SEALED_PAGES frame {_seq_of(frame, flen)} refused")
    return FrameInfo._from_c(info)


def _ram_size(buffer_len: int, ram_size: int | None) -> int:
    if ram_size is None:
        return buffer_len
    if ram_size > buffer_len:
        raise ValueError(f"ram_size {ram_size:#x} is larger than the RAM buffer ({buffer_len:#x} bytes)")
    return ram_size


def _seq_of(frame: Memory, flen: int) -> str:
    """The frame number for a message, when the header is at least long enough to hold one."""
    if flen < 24:
        return "?"
    with pinned(frame, writable=False, what="frame") as (f, _):
        return str(ctypes.c_uint64.from_address(f + 16).value)
