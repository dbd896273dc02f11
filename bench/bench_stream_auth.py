"""What wire v2's frame protection costs: the same stream through a socket pair unprotected and protected.

    .venv/bin/python bench/bench_stream_auth.py [--mib 1024] [--shared 0.05] [--repeat 3]

The stream is what migration/source.py sends for an idle guest: sealed frames of 256 records (one mailbox
bank), shared frames of 256 pages (``--shared`` of the pages), a ROUND_END per 256 MiB, then vCPU state,
the encryption bitmap and DONE. The source thread frames (C gather and copy, as the engine does) and sends;
the target thread receives and unframes (shared pages into RAM, records into a bank). Unprotected
(no key: CRCs only, the v1 behaviour) and protected (handshake, AES-GCM on every frame but the sealed ones,
GMAC over their record headers) runs alternate, --repeat times each; the figure is the median. Printed:
wall MB/s of each, the protected/unprotected time ratio (issue 10's budget: the 1 GiB idle migration may
grow by at most 5 %), and each side's CPU seconds, which is what the budget is spent on when the helpers
and the VMM threads share the cores.
"""

from __future__ import annotations

import argparse
import array
import os
import random
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confplan.core import frame_sealed_pages, frame_shared_pages, unframe_sealed_pages, unframe_shared_pages
from confplan.core.stream import FrameReader, FrameWriter
from confplan.core.streamauth import client_handshake, server_handshake
from confplan.core.wire import (
    PAGE_SIZE,
    SEALED_PAGE_SIZE,
    DeviceState,
    Done,
    FrameType,
    Hello,
    HelperMode,
    RoundEnd,
    VcpuState,
    pack_sealed_header,
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


def source(writer: FrameWriter, kinds: list[str], ram: bytearray, area: bytearray, cpu: list[float]) -> None:
    t0 = time.thread_time()
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
    cpu.append(time.thread_time() - t0)


def target(reader: FrameReader, ram_size: int) -> tuple[float, int]:
    t0 = time.thread_time()
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
            return time.thread_time() - t0, received


def run_once(kinds: list[str], ram: bytearray, area: bytearray, protected: bool) -> Run:
    a, b = socket.socketpair()
    with a, b:
        hello = Hello(len(ram), os.urandom(16), HelperMode.AUX_VCPU, 2)
        t_start = time.perf_counter()
        if protected:
            key = os.urandom(32)
            answer: list[object] = []
            server = threading.Thread(target=lambda: answer.append(server_handshake(b, key, hello)))
            server.start()
            writer = client_handshake(a, key, hello).writer(a)
            server.join()
            keys, _ = answer[0]  # type: ignore[misc]
            reader = keys.reader(b, "source")
        else:
            writer, reader = FrameWriter(a), FrameReader(b, "source")
        cpu: list[float] = []
        thread = threading.Thread(target=source, args=(writer, kinds, ram, area, cpu))
        thread.start()
        target_cpu, received = target(reader, len(ram))
        thread.join()
        return Run(time.perf_counter() - t_start, cpu[0], target_cpu, received)


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
    runs: dict[bool, list[Run]] = {False: [], True: []}
    for _ in range(args.repeat):
        for protected in (False, True):
            runs[protected].append(run_once(kinds, ram, area, protected))
    med = {p: statistics.median(r.seconds for r in rs) for p, rs in runs.items()}
    for protected, rs in runs.items():
        name = "v2 protected  " if protected else "unprotected   "
        mb = rs[0].wire_bytes / 1e6
        times = ", ".join(f"{r.seconds:.3f}" for r in rs)
        src_cpu = statistics.median(r.source_cpu for r in rs)
        dst_cpu = statistics.median(r.target_cpu for r in rs)
        print(
            f"{name} {mb / med[protected]:7.0f} MB/s  wall {med[protected]:.3f} s [{times}]  "
            f"CPU source {src_cpu:.3f} s, target {dst_cpu:.3f} s"
        )
    extra_cpu = sum(
        statistics.median(getattr(r, side) for r in runs[True])
        - statistics.median(getattr(r, side) for r in runs[False])
        for side in ("source_cpu", "target_cpu")
    )
    print(
        f"protected / unprotected wall time: {med[True] / med[False]:.3f}x; "
        f"extra CPU, both sides together: {extra_cpu * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
