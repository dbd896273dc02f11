"""MH SAVE / LOAD / DIGEST throughput through the real mailbox protocol, against OpenSSL in the same run.

The migration helper's C engine (firmware/mh + firmware/crypto, built for the host) serves its mailboxes in
1 or 2 threads (one per MH vCPU), driven by the real Python ``MailboxSet`` client: post, futex kick, wait for
done, statuses read back. Only the op is timed (post to done); the target's copying of records into its
slots happens between timed ops. Baseline: OpenSSL AES-256-GCM through ``cryptography``'s AESGCM on 1 MiB
calls, one thread. Rates are given per wall second and per CPU-second of the process (the MH threads plus
the mostly sleeping client), which is the per-MH-vCPU figure and holds up when other work shares the
cores. Best of several runs.

    .venv/bin/python bench/bench_mh_mailbox.py [--rounds 24] [--repeats 3] [--batch 256]
"""

from __future__ import annotations

import argparse
import array
import ctypes
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from confplan.migration.host_mh import SIDE_TARGET, HostGuest, build_host_library
from confplan.sev.secret_table import CONFPLAN_TRANSPORT_KEY_GUID, build_secret_table

PAGE = 4096
MIB = 1 << 20
DATA_GPA = 0x800000


def openssl_rates(repeats: int) -> tuple[float, float]:
    aead, nonce, data = AESGCM(os.urandom(32)), os.urandom(12), os.urandom(MIB)
    sealed = aead.encrypt(nonce, data, b"a" * 28)

    def seal() -> None:
        aead.encrypt(nonce, data, b"a" * 28)

    def open_() -> None:
        aead.decrypt(nonce, sealed, b"a" * 28)

    return best(seal, MIB, repeats, 64), best(open_, MIB, repeats, 64)


def best(fn: Callable[[], object], nbytes: int, repeats: int, calls: int) -> float:
    """GB per second of CPU time the process used (one thread here): immune to other load on the machine."""
    rates = []
    for _ in range(repeats):
        c0 = time.process_time()
        for _ in range(calls):
            fn()
        rates.append(nbytes * calls / (time.process_time() - c0) / 1e9)
    return max(rates)


def mh_rates(lib: ctypes.CDLL, mh_vcpus: int, batch: int, rounds: int, repeats: int) -> dict[str, float]:
    key = build_secret_table({CONFPLAN_TRANSPORT_KEY_GUID: os.urandom(32)})
    npages = mh_vcpus * batch
    ram = DATA_GPA + npages * PAGE + 2 * MIB
    out = {k: 0.0 for k in ("save", "load", "digest", "save_cpu", "load_cpu", "digest_cpu")}
    with (
        HostGuest(lib, ram_size=ram, secret=key, mh_vcpus=mh_vcpus, batch_pages=batch) as src,
        HostGuest(
            lib, ram_size=ram, secret=key, mh_vcpus=mh_vcpus, batch_pages=batch, side=SIDE_TARGET
        ) as dst,
    ):
        src.ram[DATA_GPA : DATA_GPA + npages * PAGE] = os.urandom(npages * PAGE)
        src.mailboxes.init()
        dst.mailboxes.init()
        gpas = array.array("Q", range(DATA_GPA, DATA_GPA + npages * PAGE, PAGE))
        gen = 0
        for _ in range(repeats):
            saved: list[list[bytes]] = []
            t_save = t_load = c_save = c_load = 0.0
            for _ in range(rounds):
                gen += 1
                t0, c0 = time.perf_counter(), time.process_time()
                results = src.mailboxes.save(gpas, gen)
                t_save += time.perf_counter() - t0
                c_save += time.process_time() - c0
                saved.append([bytes(r.records) for _, r in results])
            for records in saved:
                for mb, rec in zip(dst.mailboxes.mailboxes, records, strict=True):
                    mb.slots[: len(rec)] = rec
                t0, c0 = time.perf_counter(), time.process_time()
                loaded = dst.mailboxes.load([len(r) // 4160 for r in records])
                t_load += time.perf_counter() - t0
                c_load += time.process_time() - c0
                if any(r.n_refused for r in loaded):
                    raise SystemExit("LOAD refused pages: the bench is broken")
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(rounds):
                dst.mailboxes.digest(DATA_GPA, npages, chunk_pages=batch)
            t_digest, c_digest = time.perf_counter() - t0, time.process_time() - c0
            nbytes = rounds * npages * PAGE
            out["save"] = max(out["save"], nbytes / t_save / 1e9)
            out["load"] = max(out["load"], nbytes / t_load / 1e9)
            out["digest"] = max(out["digest"], nbytes / t_digest / 1e9)
            for key, cpu in (("save_cpu", c_save), ("load_cpu", c_load), ("digest_cpu", c_digest)):
                out[key] = max(out[key], nbytes / cpu / 1e9)
        if dst.ram[DATA_GPA : DATA_GPA + npages * PAGE] != src.ram[DATA_GPA : DATA_GPA + npages * PAGE]:
            raise SystemExit("target pages differ from the source: the bench is broken")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=24, help="batches per MH vCPU per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256, help="batch_pages per mailbox")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_host_library(Path(tmp))
        ssl_seal, ssl_open = openssl_rates(args.repeats)
        one = mh_rates(lib, 1, args.batch, args.rounds, args.repeats)
        two = mh_rates(lib, 2, args.batch, args.rounds, args.repeats)
    print(
        f"OpenSSL AES-256-GCM, 1 MiB calls, 1 thread: seal {ssl_seal:.2f}, open {ssl_open:.2f} GB per CPU-s"
    )
    print(
        f"MH through the mailbox, batch {args.batch} pages; wall GB/s, and GB per CPU-second (per MH vCPU):"
    )
    head = f"{'op':7} {'1 MH wall':>9} {'1 MH /cpu':>9} {'x OpenSSL':>9} {'2 MH wall':>9} {'2 MH /cpu':>9}"
    print(f"{head} {'x OpenSSL':>9} {'wall 2 vs 1':>11}")
    for op, base in (("save", ssl_seal), ("load", ssl_open), ("digest", ssl_seal)):
        c1, c2 = one[f"{op}_cpu"], two[f"{op}_cpu"]
        print(f"{op:7} {one[op]:9.2f} {c1:9.2f} {c1 / base:9.2f} {two[op]:9.2f} {c2:9.2f} {c2 / base:9.2f} "
              f"{two[op] / one[op]:11.2f}")  # fmt: skip
    print(
        f"(cores: {os.cpu_count()}, shared: wall figures depend on other load, CPU-second figures much less)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
