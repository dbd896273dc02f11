"""Mailbox v5 in the pause: SEAL_MANIFEST on the source and CHECK_MANIFEST on the target of a 1 GiB guest,
and SEAL_STATE / OPEN_STATE of one vCPU's state, through the real mailbox of booted guests (KVM).

A source whose quiet workload filled its pages and an mh_only target with the same transport key; every
workload page goes through the helpers once (``save_stream`` / ``load_stream``), so both sides' generation
and MAC tables are those of a finished migration. Then, ``--repeat`` times: the source helper seals the
manifest over all of RAM (verify's 8 MiB chunks), the target helper checks it. Reported per op: the VMM's
wall time (request in, op, result out: what the pause pays) and the helper's own compute from the guest TSC
stamps of the ring entry. Mailbox v7: each side's PREPARE_MANIFEST (run in the pause while other work
goes on) and the SEAL / CHECK that follow it, which is what is left on the pause's critical path; the
unprepared SEAL / CHECK of the same repeat are the "before". Baseline in the same run: FOLD of the same
range on the same helper (the MAC half of the manifest, which verify already runs in the pause) and SHA-256
of the 1 GiB bitmap-and-state inputs the VMM hashes. The transport key is written straight into the secret
page (no measured launch: covered by tests/test_mh_manifest_guest.py).

    .venv/bin/python bench/bench_manifest.py [--mib 1024] [--repeat 5] [--batch 256]
"""

from __future__ import annotations

import argparse
import array
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

from confplan.migration.helper import open_mailboxes
from confplan.migration.mailbox import BatchResult, Mailbox
from confplan.migration.mailbox_layout import MANIFEST_CHUNK_PAGES, SLOT_SIZE
from confplan.migration.mailbox_set import MailboxSet
from confplan.migration.manifest import state_hash
from confplan.migration.session import vcpu_blob
from confplan.sev.secret_table import CONFPLAN_TRANSPORT_KEY_GUID, build_secret_table
from confplan.vmm import Machine, MachineConfig, abi

MIB = 1 << 20
T = TypeVar("T")


def boot(config: MachineConfig, key: bytes) -> Machine:
    m = Machine(config)
    m.write(abi.SECRET_GPA, build_secret_table({CONFPLAN_TRANSPORT_KEY_GUID: key}))
    m.start()
    return m


def move_everything(src: MailboxSet, dst: MailboxSet, gpas: array.array[int]) -> None:
    records: list[bytes] = []

    def consume(_mb: Mailbox, result: BatchResult) -> None:
        records.append(bytes(result.records))

    def fill(_mb: Mailbox, slots: memoryview) -> int:
        if not records:
            return 0
        batch = records.pop(0)
        slots[: len(batch)] = batch
        return len(batch) // SLOT_SIZE

    src.save_stream(gpas, 1, consume)
    dst.load_stream(fill)


def guest_ms(mb: Mailbox) -> float:
    """The helper's own time for its last op, from the ring entry's TSC stamps."""
    start, end = mb.op_tsc(mb._get("done", "<Q"))
    return (end - start) / mb.tsc_khz


def timed(fn: Callable[[], T], mb: Mailbox, runs: list[tuple[float, float]]) -> T:
    """Run ``fn`` (one op on ``mb``); record (VMM wall ms, helper ms) in ``runs``; its value."""
    t0 = time.perf_counter()
    value = fn()
    runs.append(((time.perf_counter() - t0) * 1e3, guest_ms(mb)))
    return value


def line(name: str, runs: list[tuple[float, float]]) -> str:
    wall, guest = [r[0] for r in runs], [r[1] for r in runs]
    return (
        f"{name:<16} wall {statistics.median(wall):7.2f} ms (min {min(wall):6.2f})   "
        f"helper {statistics.median(guest):7.2f} ms (min {min(guest):6.2f})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    cfg = MachineConfig(memory=args.mib * MIB, aux_vcpus=1, workload_kind="quiet", batch_pages=args.batch,
                        watchdog_s=60.0)  # fmt: skip
    key = os.urandom(32)
    with boot(cfg, key) as a, boot(dataclasses.replace(cfg, mh_only=True), key) as b:
        a.wait_workload(abi.EV_WL_FILLED, timeout=120)
        a.pause_all_vcpus_except_aux()
        src, dst = open_mailboxes(a), open_mailboxes(b)
        src.init()
        dst.init()
        mask = a.layout.guest_page_mask()  # every guest page (v7: the CPL0 area too), each needs its MAC
        gpas = array.array("Q", (p * abi.PAGE for p in range(a.layout.npages) if mask >> p & 1))
        t0 = time.perf_counter()
        move_everything(src, dst, gpas)
        print(f"{args.mib} MiB guest, {len(gpas)} workload pages moved in {time.perf_counter() - t0:.2f} s")
        bitmap = bytes(a.enc_bitmap.bitmap.view())
        b.enc_bitmap.bitmap.view()[:] = bitmap
        blobs = [vcpu_blob(s, time.time()) for s in a.save_vcpu_states()]
        npages = a.layout.npages
        s_mb, d_mb = src.mailboxes[0], dst.mailboxes[0]
        names = ("state hash", "FOLD", "SEAL_MANIFEST", "CHECK_MANIFEST", "PREPARE (source)", "SEAL prepared",
                 "PREPARE (target)", "CHECK prepared", "SEAL_STATE", "OPEN_STATE")
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
        sealed, record = b"", b""
        for _ in range(args.repeat):
            t = time.perf_counter()
            h = state_hash([*blobs, bitmap])
            runs["state hash"].append(((time.perf_counter() - t) * 1e3, 0.0))
            timed(partial(src.fold, 0, npages, chunk_pages=MANIFEST_CHUNK_PAGES), s_mb, runs["FOLD"])
            seal = partial(src.seal_manifest, 0, npages, enc_bitmap=bitmap, state_hash=h, rounds=1)
            sealed = timed(seal, s_mb, runs["SEAL_MANIFEST"])
            check = partial(dst.check_manifest, sealed, 0, npages, enc_bitmap=bitmap, state_hash=h, rounds=1)
            timed(check, d_mb, runs["CHECK_MANIFEST"])
            # v7: what is left in the pause once each side prepared its fields ahead (PREPARE_MANIFEST)
            for side, mb, name in ((src, s_mb, "PREPARE (source)"), (dst, d_mb, "PREPARE (target)")):
                prepare = partial(side.prepare_manifest, 0, npages, enc_bitmap=bitmap)
                if not timed(prepare, mb, runs[name]):
                    raise SystemExit(f"{name} failed")
                if side is src:
                    sealed = timed(seal, s_mb, runs["SEAL prepared"])
                    check = partial(dst.check_manifest, sealed, 0, npages, enc_bitmap=bitmap, state_hash=h,
                                    rounds=1)  # fmt: skip
            timed(check, d_mb, runs["CHECK prepared"])
            record = timed(partial(src.seal_state, 0, blobs[0]), s_mb, runs["SEAL_STATE"])
            timed(partial(dst.open_state, 0, record), d_mb, runs["OPEN_STATE"])
        chunks = -(-npages // MANIFEST_CHUNK_PAGES)
        print(f"manifest: {len(sealed)} bytes ({chunks} chunks); vCPU state: {len(blobs[0])} bytes blob, "
              f"{len(record)} sealed; median of {args.repeat}")  # fmt: skip
        for name, values in runs.items():
            print(line(name, values))
        a.check()
        b.check()


if __name__ == "__main__":
    main()
