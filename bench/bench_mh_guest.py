"""In-guest migration helper: SAVE and LOAD through the real mailbox, against OpenSSL in the same run.

Two booted guests on KVM (a source whose quiet workload filled its pages, and an mh_only target with the
same transport key in its secret page), with 1 and then 2 MH vCPUs (aux vCPUs). The VMM side is the real
``open_mailboxes(machine)``. Every round seals every workload page under a new generation and opens the
records on the target, two ways, interleaved round by round so both see the same machine load:
- ``sync``: ``MailboxSet.save``/``load``, one op of ``--batch`` pages per mailbox at a time (post, kick,
  the MH seals at CPL3, one doorbell exit per op wakes the waiter); the records go from the source's slots
  into the target's (timed with SAVE);
- ``stream``: ``save_stream``/``load_stream`` (protocol v2), ``--banks`` ops queued per mailbox, the records
  copied out to a buffer and back into the target's slots (both copies timed).
Baseline: OpenSSL AES-256-GCM via ``cryptography``'s AESGCM on 1 MiB calls, one thread, measured in this run.

Rates per wall second, per CPU-second of this process (guest time of the vCPU threads included), and the
helper's own: the guest TSC time of its SAVE/LOAD ops (the ring entries' stamps), i.e. what the helper's
crypto and per-page work cost, without the host's side. The second and third hold up better when other work
shares the two cores. Best of the rounds. ``--before DIR`` boots a second pair of guests from the firmware
image in DIR (e.g. a copy of confplan/_firmware taken before a change) and interleaves its rounds with the
current image's, so a change is measured against its predecessor in the same run. ``--impl aes-ni,vaes``
boots a pair per image and implementation, the helper's AES-GCM held to that one (MachineConfig.crypto_impl
caps the feature word in the boot parameters: the AES-NI path as a CPU without VAES would run it). The
transport key is written straight into the secret page (no measured launch: that costs nothing per page
and is covered by tests/test_mh_guest.py).

    .venv/bin/python bench/bench_mh_guest.py [--mib 128] [--batch 256] [--banks 2] [--rounds 5] [--before DIR]
        [--impl auto|vaes512|vaes|aes-ni|portable[,...]]
"""

from __future__ import annotations

import argparse
import array
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from confplan.migration.helper import open_mailboxes
from confplan.migration.mailbox import BatchResult, Mailbox
from confplan.migration.mailbox_layout import SLOT_SIZE
from confplan.migration.mailbox_set import DEFAULT_BANKS, MailboxSet
from confplan.sev.secret_table import CONFPLAN_TRANSPORT_KEY_GUID, build_secret_table
from confplan.vmm import Machine, MachineConfig, abi
from confplan.vmm.config import CRYPTO_IMPLS
from confplan.vmm.firmware import Firmware

MIB = 1 << 20
T = TypeVar("T")


def openssl_rates(repeats: int) -> tuple[float, float]:
    """GB per CPU-second for AES-256-GCM seal and open of 1 MiB calls (one thread)."""
    aead, nonce, data, aad = AESGCM(os.urandom(32)), os.urandom(12), os.urandom(MIB), b"a" * 28
    sealed = aead.encrypt(nonce, data, aad)

    def rate(fn: Callable[[], object]) -> float:
        best = 0.0
        for _ in range(repeats):
            c0 = time.process_time()
            for _ in range(64):
                fn()
            best = max(best, 64 * MIB / (time.process_time() - c0) / 1e9)
        return best

    return rate(lambda: aead.encrypt(nonce, data, aad)), rate(lambda: aead.decrypt(nonce, sealed, aad))


@dataclasses.dataclass
class Clock:
    """Wall and process CPU time of the timed parts only."""

    wall: float = 0.0
    cpu: float = 0.0

    def time(self, fn: Callable[[], T]) -> T:
        w0, c0 = time.perf_counter(), time.process_time()
        value = fn()
        self.wall += time.perf_counter() - w0
        self.cpu += time.process_time() - c0
        return value


def boot(config: MachineConfig, key: bytes, firmware: Firmware | None = None) -> Machine:
    m = Machine(config, firmware=firmware)
    m.write(abi.SECRET_GPA, build_secret_table({CONFPLAN_TRANSPORT_KEY_GUID: key}))
    m.start()
    return m


def one_round(src: MailboxSet, dst: MailboxSet, gpas: array.array[int], gen: int) -> tuple[Clock, Clock]:
    """The synchronous path: one op per mailbox at a time; the records go straight from the source's slots
    into the target's (that copy is timed with SAVE: a VMM must move them somewhere)."""
    save, load = Clock(), Clock()

    def move(saved: list[tuple[Mailbox, BatchResult]]) -> list[int]:
        counts = [0] * len(dst.mailboxes)
        for i, (_, result) in enumerate(saved):
            n = len(result.statuses)
            dst.mailboxes[i].slots[: n * SLOT_SIZE] = result.records
            counts[i] = n
        return counts

    for first in range(0, len(gpas), src.capacity):
        chunk = gpas[first : first + src.capacity]
        counts = save.time(lambda c=chunk: move(src.save(c, gen)))  # type: ignore[misc]
        loaded = load.time(partial(dst.load, counts))
        assert all(r.n_refused == 0 for r in loaded)
    return save, load


def stream_round(
    src: MailboxSet, dst: MailboxSet, gpas: array.array[int], gen: int, banks: int, buf: bytearray
) -> tuple[Clock, Clock]:
    """The pipelined path: SAVE every page through ``save_stream`` (each bank's records copied out into
    ``buf``, timed), then LOAD them from ``buf`` through ``load_stream`` (that second copy is timed too, so
    this path moves the records twice where the synchronous one moves them once)."""
    save, load = Clock(), Clock()
    out, src_at, dst_at = memoryview(buf), [0], [0]

    def consume(_mb: Mailbox, result: BatchResult) -> None:
        n = len(result.records)
        out[src_at[0] : src_at[0] + n] = result.records
        src_at[0] += n

    def fill(_mb: Mailbox, slots: memoryview) -> int:
        n = min(len(slots), src_at[0] - dst_at[0])
        slots[:n] = out[dst_at[0] : dst_at[0] + n]
        dst_at[0] += n
        return n // SLOT_SIZE

    save.time(partial(src.save_stream, gpas, gen, consume, banks=banks))
    load.time(partial(dst.load_stream, fill, banks=banks))
    assert src_at[0] == dst_at[0] == len(gpas) * SLOT_SIZE
    return save, load


def helper_seconds(mbs: MailboxSet) -> float:
    """The helpers' own time in SAVE/LOAD ops so far, summed over the MH vCPUs (guest TSC stamps)."""
    return sum(mb.op_seconds for mb in mbs.mailboxes)


@dataclasses.dataclass
class Pair:
    """A source and an mh_only target booted from one firmware image, with their mailboxes open."""

    label: str
    src: MailboxSet
    dst: MailboxSet
    impl: str
    gpas: array.array[int]


Image = tuple[Firmware | None, str]  # a firmware image (None: the current one) and the crypto_impl cap


def open_pair(
    stack: contextlib.ExitStack, cfg: MachineConfig, key: bytes, label: str, image: Image
) -> tuple[Pair, Machine, Machine]:
    firmware, impl_cap = image
    cfg = dataclasses.replace(cfg, crypto_impl=impl_cap)
    a = stack.enter_context(boot(cfg, key, firmware))
    b = stack.enter_context(boot(dataclasses.replace(cfg, mh_only=True), key, firmware))
    a.wait_workload(abi.EV_WL_FILLED, timeout=60)
    a.pause_all_vcpus_except_aux()
    src, dst = open_mailboxes(a), open_mailboxes(b)
    src.init()
    dst.init()
    impl = next(t for _, t in a.console.lines if t.startswith("mh: helper vCPU 0")).split(" aes ")[1]
    gpas = array.array("Q", range(a.layout.wl_base, cfg.memory, abi.PAGE))
    return Pair(label, src, dst, impl, gpas), a, b


def mh_rates(
    mib: int, mh_vcpus: int, batch: int, rounds: int, banks: int, images: dict[str, Image]
) -> dict[str, dict[str, dict[str, float]]]:
    """Best rates per image label and path: the synchronous one (``MailboxSet.save``/``load``, one op per
    mailbox at a time) and the pipelined one (``save_stream``/``load_stream``); rounds interleaved over images
    and paths so all see the same load."""
    cfg = MachineConfig(memory=mib * MIB, aux_vcpus=mh_vcpus, workload_kind="quiet", batch_pages=batch,
                        watchdog_s=30.0)  # fmt: skip
    key = os.urandom(32)
    with contextlib.ExitStack() as stack:
        opened = [open_pair(stack, cfg, key, label, fw) for label, fw in images.items()]
        best: dict[str, dict[str, dict[str, float]]] = {}
        for p, _, _ in opened:
            best[p.label] = {"sync": {}, "stream": {}}
        gen = 0
        for _ in range(rounds):
            for pair, _, _ in opened:
                nbytes = len(pair.gpas) * abi.PAGE
                buf = bytearray(len(pair.gpas) * SLOT_SIZE)
                for mode in ("sync", "stream"):
                    gen += 1
                    h0 = helper_seconds(pair.src), helper_seconds(pair.dst)
                    if mode == "sync":
                        clocks = one_round(pair.src, pair.dst, pair.gpas, gen)
                    else:
                        clocks = stream_round(pair.src, pair.dst, pair.gpas, gen, banks, buf)
                    helper = helper_seconds(pair.src) - h0[0], helper_seconds(pair.dst) - h0[1]
                    r = best[pair.label][mode]
                    for name, clock, own in zip(("save", "load"), clocks, helper, strict=True):
                        r[f"{name}_wall"] = max(r.get(f"{name}_wall", 0.0), nbytes / clock.wall / 1e9)
                        r[f"{name}_cpu"] = max(r.get(f"{name}_cpu", 0.0), nbytes / clock.cpu / 1e9)
                        if own > 0:  # per MH vCPU: each vCPU's pages over its own time
                            r[f"{name}_mh"] = max(r.get(f"{name}_mh", 0.0), nbytes / own / 1e9)
        for pair, a, b in opened:
            area = (a.layout.wl_base, len(pair.gpas) * abi.PAGE)
            assert a.ram.read(area[0], area[1]) == b.ram.read(area[0], area[1])
            rings = sum(a.mailbox_doorbells.rings) + sum(b.mailbox_doorbells.rings)
            print(f"  ({mh_vcpus} MH vCPU(s), {pair.label} image: AES in the guest: {pair.impl}; "
                  f"{len(pair.gpas)} pages per pass; {rings} doorbell exits in all)")  # fmt: skip
        return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=128, help="guest RAM of each side")
    ap.add_argument("--batch", type=int, default=256, help="slots per mailbox (the plan's batch_pages)")
    ap.add_argument("--banks", type=int, default=DEFAULT_BANKS, help="slot banks per mailbox when streaming")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--before", type=Path, help="a firmware image directory to measure against, same run")
    caps = ", ".join(CRYPTO_IMPLS)
    ap.add_argument("--impl", default="auto", help=f"caps on the helper's AES-GCM, comma-separated ({caps})")
    args = ap.parse_args()
    impls = args.impl.split(",")
    if not set(impls) <= set(CRYPTO_IMPLS):
        ap.error(f"--impl: use {', '.join(CRYPTO_IMPLS)}")
    firmwares: dict[str, Firmware | None] = {"current": None}
    if args.before is not None:
        firmwares["before"] = Firmware.load(args.before)
    images = {name if impls == ["auto"] else f"{name[:3]}:{impl}": (fw, impl)
              for name, fw in firmwares.items() for impl in impls}  # fmt: skip
    seal, open_ = openssl_rates(args.rounds)
    print(f"OpenSSL AES-256-GCM, 1 MiB calls: seal {seal:.2f} GB/s, open {open_:.2f} GB/s (per CPU-second)")
    print(f"guest {args.mib} MiB, {args.batch} slots per mailbox; sync = one op of {args.batch} pages per "
          f"mailbox at a time, stream = {args.banks} banks queued; best of {args.rounds} rounds; "
          f"helper = the MH's own time (guest TSC), per MH vCPU")  # fmt: skip
    print(f"{'MH vCPUs':>8} {'image':>11} {'path':>6} {'op':>4} {'wall GB/s':>10} {'per MH vCPU':>12} "
          f"{'x OpenSSL':>10} {'per CPU-s':>10} {'x OpenSSL':>10} {'helper':>7} "
          f"{'x OpenSSL':>10}")  # fmt: skip
    one: dict[str, float] = {}
    for n in (1, 2):
        rates = mh_rates(args.mib, n, args.batch, args.rounds, args.banks, images)
        for label, by_mode in rates.items():
            for mode, r in by_mode.items():
                for op, ref in (("save", seal), ("load", open_)):
                    wall, cpu, mh = r[f"{op}_wall"], r[f"{op}_cpu"], r.get(f"{op}_mh", 0.0)
                    one.setdefault(f"{label}_{mode}_{op}", wall)
                    print(f"{n:>8} {label:>11} {mode:>6} {op.upper():>4} {wall:>10.2f} {wall / n:>12.2f} "
                          f"{wall / n / ref:>9.2f}x {cpu:>10.2f} {cpu / ref:>9.2f}x {mh:>7.2f} "
                          f"{mh / ref:>9.2f}x")  # fmt: skip
        if n == 2:
            for label, by_mode in rates.items():
                for mode, r in by_mode.items():
                    print(f"  {label} {mode}: wall 2 vs 1 MH vCPUs: "
                          f"SAVE {r['save_wall'] / one[f'{label}_{mode}_save']:.2f}x, "
                          f"LOAD {r['load_wall'] / one[f'{label}_{mode}_load']:.2f}x")  # fmt: skip
            print(f"  load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
