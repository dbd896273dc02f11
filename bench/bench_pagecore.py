"""Speed of the C page-transfer core, as ratios against memmove measured in the same run.

    .venv/bin/python bench/bench_pagecore.py [--mib 64] [--batch 256] [--repeat 5]

Goal (issue 4): the core's shared-page copy at least 0.5x memmove of the same bytes. Gather (frame on the
source: zero check, copy, CRC-32C) and scatter (unframe on the target: all checks, CRC-32C, copy) are timed
separately, since in a migration they run in two processes at once and the slower one sets the pace, and
together in one thread (the harshest reading). Also prints CRC-32C alone, sealed-record framing, and the
dirty-bitmap scan in pages/s. Each figure is the best of --repeat runs; memmove copies the same number of
bytes, contiguously, in one call.
"""

from __future__ import annotations

import argparse
import array
import ctypes
import mmap
import os
import random
import time
from collections.abc import Callable

from confplan.core import (
    crc32c,
    crc32c_uses_hardware,
    frame_sealed_pages,
    frame_shared_pages,
    scan_dirty,
    unframe_sealed_pages,
    unframe_shared_pages,
)
from confplan.core.wire import (
    PAGE_SIZE,
    SEALED_PAGE_SIZE,
    pack_sealed_header,
    sealed_frame_size,
    shared_frame_capacity,
)


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def anon(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def memmove_seconds(src: mmap.mmap, dst: mmap.mmap, nbytes: int, repeat: int) -> float:
    s = (ctypes.c_char * nbytes).from_buffer(src)
    d = (ctypes.c_char * nbytes).from_buffer(dst)
    s_addr, d_addr = ctypes.addressof(s), ctypes.addressof(d)
    seconds = best_of(repeat, lambda: ctypes.memmove(d_addr, s_addr, nbytes))
    del s, d  # release the buffer exports so the mmaps can be closed
    return seconds


def shared_round_trip(
    src: mmap.mmap, dst: mmap.mmap, gpas: array.array[int], batch: int
) -> tuple[float, float]:
    """Seconds spent (framing on the source, unframing on the target) moving every page at ``gpas``."""
    frame = bytearray(shared_frame_capacity(batch))
    view, clock = memoryview(gpas), time.perf_counter
    gather = scatter = 0.0
    for start in range(0, len(gpas), batch):  # one iteration per frame, not per page
        t0 = clock()
        info = frame_shared_pages(src, view[start : start + batch], frame, seq=start)
        t1 = clock()
        unframe_shared_pages(memoryview(frame)[: info.frame_len], dst)
        gather, scatter = gather + t1 - t0, scatter + clock() - t1
    return gather, scatter


def bench_shared(
    src: mmap.mmap, dst: mmap.mmap, gpas: array.array[int], args: argparse.Namespace, label: str
) -> None:
    nbytes = len(gpas) * PAGE_SIZE
    runs = [shared_round_trip(src, dst, gpas, args.batch) for _ in range(args.repeat)]
    gather, scatter = min(r[0] for r in runs), min(r[1] for r in runs)
    both = min(r[0] + r[1] for r in runs)
    base = memmove_seconds(src, dst, nbytes, args.repeat)
    if nbytes == len(src) and src[:] != dst[:]:
        raise SystemExit(f"{label}: the target RAM differs from the source after the round trip")
    print(
        f"shared pages, {label}: {len(gpas)} pages, {args.batch}/frame;"
        f" memmove {gbps(nbytes, base):5.2f} GB/s"
    )
    print(
        f"  gather (frame, source)    {gbps(nbytes, gather):5.2f} GB/s  ratio {base / gather:4.2f}x memmove"
    )
    print(
        f"  scatter (unframe, target) {gbps(nbytes, scatter):5.2f} GB/s  ratio {base / scatter:4.2f}x memmove"
    )
    print(f"  both in one thread        {gbps(nbytes, both):5.2f} GB/s  ratio {base / both:4.2f}x memmove")


def bench_crc(src: mmap.mmap, size: int, args: argparse.Namespace) -> None:
    core = best_of(args.repeat, lambda: crc32c(src))
    dst = anon(size)
    base = memmove_seconds(src, dst, size, args.repeat)
    hw = "SSE4.2" if crc32c_uses_hardware() else "software"
    print(
        f"crc32c ({hw}) over {size >> 20} MiB: {gbps(size, core):6.2f} GB/s"
        f"  ratio {base / core:5.2f}x memmove"
    )
    dst.close()


def bench_sealed(args: argparse.Namespace) -> None:
    nrec = args.batch
    area = bytearray(nrec * SEALED_PAGE_SIZE)
    for i in range(nrec):  # set-up only: the helper writes these in a real run
        off = i * SEALED_PAGE_SIZE
        area[off : off + 64] = pack_sealed_header(i * PAGE_SIZE, 1, bytes(12), bytes(16))
        area[off + 64 : off + SEALED_PAGE_SIZE] = os.urandom(PAGE_SIZE)
    target = bytearray(len(area))
    frame = bytearray(sealed_frame_size(nrec))
    ram_size = nrec * PAGE_SIZE
    frames = max(1, (args.mib << 20) // len(area))

    def run() -> None:
        for seq in range(frames):
            frame_sealed_pages(area, nrec, frame, seq=seq, ram_size=ram_size)
            unframe_sealed_pages(frame, target, ram_size=ram_size)

    core = best_of(args.repeat, run) / frames
    src, dst = anon(len(area)), anon(len(area))
    src[:] = area
    base = memmove_seconds(src, dst, len(area), args.repeat)
    print(
        f"sealed frame+unframe, {nrec} records/frame: {gbps(len(area), core):6.2f} GB/s"
        f"  ratio {base / core:5.2f}x memmove of the records"
    )
    src.close()
    dst.close()


def bench_scan(args: argparse.Namespace) -> None:
    npages = 1 << 20  # 4 GiB of guest RAM
    rng = random.Random(7)
    for label, density in (("sparse 1/64", 1 / 64), ("dense 100%", 1.0)):
        if density == 1.0:
            dirty = array.array("Q", [(1 << 64) - 1]) * (npages // 64)
        else:
            dirty = array.array("Q", bytes(npages // 8))
            for page in rng.sample(range(npages), int(npages * density)):
                dirty[page // 64] |= 1 << (page % 64)
        shared = array.array("Q", [rng.getrandbits(64) for _ in range(npages // 64)])
        seconds = best_of(args.repeat, lambda d=dirty, s=shared: scan_dirty(d, s, npages))
        found = sum(len(x) for x in scan_dirty(dirty, shared, npages))
        print(
            f"bitmap scan, {label:<11}: {npages / seconds / 1e6:8.1f} M pages/s scanned, {found} dirty found"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=64, help="guest RAM to move (default 64 MiB)")
    parser.add_argument("--batch", type=int, default=256, help="pages per frame (default 256)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure; the best counts")
    args = parser.parse_args()
    size = args.mib << 20
    npages = size // PAGE_SIZE
    src, dst = anon(size), anon(size)
    src[:] = os.urandom(size)
    dst[:] = bytes(size)  # fault the target in before timing
    all_pages = array.array("Q", range(0, size, PAGE_SIZE))
    bench_shared(src, dst, all_pages, args, "all dirty, random data")
    rng = random.Random(1)
    sparse = array.array("Q", sorted(p * PAGE_SIZE for p in rng.sample(range(npages), npages // 16)))
    bench_shared(src, dst, sparse, args, "1/16 dirty, scattered")
    for p in range(0, npages, 2):  # half the pages zero: sent as a flag
        src[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
    bench_shared(src, dst, all_pages, args, "all dirty, half zero pages")
    bench_crc(src, size, args)
    bench_sealed(args)
    bench_scan(args)
    src.close()
    dst.close()


if __name__ == "__main__":
    main()
