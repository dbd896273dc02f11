"""What wire v2's frame protection costs: the same stream through a socket pair unprotected and protected.

    .venv/bin/python bench/bench_stream_auth.py [--mib 1024] [--shared 0.05] [--repeat 3]

The stream is what migration/source.py sends for an idle guest: sealed frames of 256 records (one mailbox
bank), shared frames of 256 pages (``--shared`` of the pages), a ROUND_END per 256 MiB, then vCPU state,
the encryption bitmap and DONE. The source process frames (C gather and copy, as the engine does) and
sends; the target process receives and unframes (shared pages into RAM, records into a bank): two processes,
as the two VMMs are, so neither waits for the other's GIL. Unprotected (no key: CRCs only, the v1
behaviour) and protected (handshake, AES-GCM on every frame but the sealed ones, GMAC over their record
headers) runs alternate, --repeat times each; the figure is the median. Printed first: what protection
adds per frame on each side (one thread, best of 7: steadier than the end-to-end runs on a shared
machine) and the extra CPU that projects to for the stream; then wall MB/s of each run (handshake
included), the protected/unprotected time ratio, and each side's CPU seconds. Issue 10's budget is on the
1 GiB idle migration (at most 5 % longer), which streams at ~0.6 GB/s paced by the helpers: there the
extra CPU is the cost, not this bare stream's ratio.
"""

from __future__ import annotations

import argparse
import array
import functools
import multiprocessing
import os
import random
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confplan.core import frame_sealed_pages, frame_shared_pages, unframe_sealed_pages, unframe_shared_pages
from confplan.core.frameauth import Direction, FrameKey
from confplan.core.stream import FrameReader, FrameWriter
from confplan.core.streamauth import client_handshake, server_handshake
from confplan.core.wire import (
    PAGE_SIZE,
    SEALED_PAGE_SIZE,
    DeviceState,
    Done,
    FrameHeader,
    FrameType,
    Hello,
    HelperMode,
    RoundEnd,
    VcpuState,
    pack_sealed_header,
    parse_header,
    sealed_frame_size,
    shared_frame_capacity,
)

BATCH = 256  # records per sealed frame (a bank), pages per shared frame (source.SHARED_FRAME_PAGES)
RAM_PAGES = 16384  # 64 MiB of guest RAM the shared frames gather from (the bytes cycle through it)


@dataclass
class Run:
    seconds: float
    source_cpu: float
    target_cpu: float
    wire_bytes: int


def plan(mib: int, shared: float) -> list[str]:
    """The frame kinds in send order: shared frames spread evenly among the sealed ones."""
    frames = mib * (1 << 20) // (BATCH * PAGE_SIZE)
    n_shared = round(frames * shared)
    kinds, acc = [], 0.0
    for i in range(frames):
        acc += n_shared / frames
        if acc >= 1:
            kinds.append("shared")
            acc -= 1
        else:
            kinds.append("sealed")
        if (i + 1) % 256 == 0:
            kinds.append("round")
    return kinds


def records() -> bytearray:
    """One bank of sealed records as the helper writes them (random ciphertext: nothing opens them here)."""
    rng = random.Random(7)
    area = bytearray()
    for i in range(BATCH):
        area += pack_sealed_header(i * PAGE_SIZE, 1, rng.randbytes(12), rng.randbytes(16)) + rng.randbytes(
            PAGE_SIZE
        )
    return area


def source(writer: FrameWriter, kinds: list[str], ram: bytearray, area: bytearray) -> None:
    shared_buf = bytearray(shared_frame_capacity(BATCH))
    sealed_buf = bytearray(sealed_frame_size(BATCH))
    expected = array.array("Q", [i * PAGE_SIZE for i in range(BATCH)])
    first = 0
    for kind in kinds:
        if kind == "shared":
            gpas = array.array("Q", [((first + i) % RAM_PAGES) * PAGE_SIZE for i in range(BATCH)])
            first += BATCH
            info = frame_shared_pages(ram, gpas, shared_buf, seq=writer.seq)
            writer.send(memoryview(shared_buf)[: info.frame_len])
        elif kind == "sealed":
            info = frame_sealed_pages(
                area, BATCH, sealed_buf, seq=writer.seq, ram_size=len(ram), expected_gpas=expected
            )
            writer.send(memoryview(sealed_buf)[: info.frame_len])
        else:
            writer.send_control(RoundEnd(1, 0, 0, 0))
    for vcpu in range(2):
        writer.send_control(VcpuState(vcpu, 1, bytes(1024)))
    writer.send_control(DeviceState("enc-bitmap", 1, bytes(RAM_PAGES // 8)))
    writer.send_control(Done(1, 0, 0))


def source_process(
    sock: socket.socket, key: bytes | None, hello: Hello, kinds: list[str], ram: bytearray, area: bytearray,
    cpu: Connection,
) -> None:  # fmt: skip
    """The source VMM's side, in its own process (as in a migration: no GIL shared with the target)."""
    t0 = time.process_time()
    writer = client_handshake(sock, key, hello).writer(sock) if key else FrameWriter(sock)
    source(writer, kinds, ram, area)
    cpu.send(time.process_time() - t0)


def target(reader: FrameReader, ram_size: int) -> int:
    ram = bytearray(ram_size)
    bank = bytearray(BATCH * SEALED_PAGE_SIZE)
    received = 0
    while True:
        frame = reader.recv()
        received += len(frame.data)
        kind = frame.header.type
        if kind is FrameType.SHARED_PAGES:
            unframe_shared_pages(frame.data, ram)
        elif kind is FrameType.SEALED_PAGES:
            unframe_sealed_pages(frame.data, bank, ram_size=ram_size)
        elif kind is FrameType.DONE:
            return received


def run_once(kinds: list[str], ram: bytearray, area: bytearray, protected: bool) -> Run:
    a, b = socket.socketpair()
    hello = Hello(len(ram), os.urandom(16), HelperMode.AUX_VCPU, 2)
    key = os.urandom(32) if protected else None
    cpu_out, cpu_in = multiprocessing.Pipe()
    child = multiprocessing.get_context("fork").Process(
        target=source_process, args=(a, key, hello, kinds, ram, area, cpu_in)
    )
    with a, b:
        t0, cpu0 = time.perf_counter(), time.process_time()
        child.start()
        if key is not None:
            keys, _ = server_handshake(b, key, hello)
            reader = keys.reader(b, "source")
        else:
            reader = FrameReader(b, "source")
        received = target(reader, len(ram))
        seconds, target_cpu = time.perf_counter() - t0, time.process_time() - cpu0
        source_cpu = cpu_out.recv()
        child.join()
    return Run(seconds, source_cpu, target_cpu, received)


def best_us(fn: Callable[[], object], n: int = 100, repeat: int = 7) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def copy_and_check(key: FrameKey, wired: bytearray, scratch: bytearray, header: FrameHeader) -> None:
    scratch[:] = wired
    key.check(memoryview(scratch), header)


def frame_costs(ram: bytearray, area: bytearray) -> dict[str, tuple[float, float]]:
    """What protection adds per frame, one thread, best of 7 (quieter than the end-to-end runs): for each
    kind, (writer, reader) microseconds of protected minus unprotected (which parses the header)."""
    key = os.urandom(32)
    sealed = bytearray(sealed_frame_size(BATCH))
    frame_sealed_pages(area, BATCH, sealed, seq=2, ram_size=len(ram))
    shared = bytearray(shared_frame_capacity(BATCH))
    gpas = array.array("Q", [i * PAGE_SIZE for i in range(BATCH)])
    shared = shared[: frame_shared_pages(ram, gpas, shared, seq=2).frame_len]
    out: dict[str, tuple[float, float]] = {}
    for name, frame in (("sealed (256 records)", sealed), ("shared (256 pages)", shared)):
        writer = FrameKey(key, Direction.SOURCE_TO_TARGET, 2)
        reader = FrameKey(key, Direction.SOURCE_TO_TARGET, 2)
        header, parts = writer.protect(frame)
        wired = bytearray(b"".join(bytes(p) for p in parts))
        scratch = bytearray(len(wired))
        plain = best_us(functools.partial(parse_header, frame))  # the unprotected writer's and reader's work
        protect = best_us(functools.partial(writer.protect, frame))
        if header.type is FrameType.SEALED_PAGES:  # a GMAC: check() leaves the frame as it was
            check = best_us(functools.partial(reader.check, memoryview(wired), header))
        else:  # check() decrypts in place: start from a copy of the wire bytes each time
            copy = functools.partial(scratch.__setitem__, slice(None), wired)
            check = best_us(functools.partial(copy_and_check, reader, wired, scratch, header)) - best_us(copy)
        out[name] = (protect - plain, check)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="guest pages sent, MiB")
    parser.add_argument("--shared", type=float, default=0.05, help="fraction of pages sent as shared")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    ram = bytearray(random.Random(3).randbytes(RAM_PAGES * PAGE_SIZE))
    area, kinds = records(), plan(args.mib, args.shared)
    n_shared = kinds.count("shared")
    print(
        f"{args.mib} MiB of pages: {kinds.count('sealed')} sealed frames and {n_shared} shared frames of "
        f"{BATCH}, {kinds.count('round')} ROUND_END, state and DONE; median of {args.repeat} runs each"
    )
    costs = frame_costs(ram, area)
    projected = 0.0
    for name, (write, read) in costs.items():
        count = kinds.count(name.split()[0])
        projected += count * (write + read)
        print(f"per {name} frame: writer +{write:.1f} us, reader +{read:.1f} us (x {count} frames)")
    print(f"projected extra CPU for this stream, both sides: {projected / 1000:.0f} ms")
    runs: dict[bool, list[Run]] = {False: [], True: []}
    for _ in range(args.repeat):
        for protected in (False, True):
            runs[protected].append(run_once(kinds, ram, area, protected))

    def median(protected: bool, field: str) -> float:
        return statistics.median(getattr(r, field) for r in runs[protected])

    for protected, rs in runs.items():
        name = "v2 protected" if protected else "unprotected "
        wall, best = median(protected, "seconds"), min(r.seconds for r in rs)
        mb = rs[0].wire_bytes / 1e6
        walls = ", ".join(f"{r.seconds:.3f}" for r in rs)
        cpu = (
            f"source {median(protected, 'source_cpu'):.3f} s, target {median(protected, 'target_cpu'):.3f} s"
        )
        print(
            f"{name}  {mb / wall:5.0f} MB/s (best {mb / best:5.0f})  wall {wall:.3f} s [{walls}]  CPU {cpu}"
        )
    ratio = median(True, "seconds") / median(False, "seconds")
    best_ratio = min(r.seconds for r in runs[True]) / min(r.seconds for r in runs[False])
    extra = {side: median(True, side) - median(False, side) for side in ("source_cpu", "target_cpu")}
    print(
        f"protected / unprotected wall: {ratio:.3f}x (medians), {best_ratio:.3f}x (bests); extra CPU: "
        f"source {extra['source_cpu'] * 1000:+.0f} ms, target {extra['target_cpu'] * 1000:+.0f} ms"
    )


if __name__ == "__main__":
    main()
