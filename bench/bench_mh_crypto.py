"""Seal/open throughput of the firmware's AES-256-GCM against OpenSSL, measured in the same run.

Builds firmware/crypto into a host shared library (same sources and flags as the guest image, plus -fPIC),
then seals and opens 1 MiB as 256 x 4 KiB pages in ONE ctypes call (cp_gcm_seal_pages/cp_gcm_open_pages),
so the figure is the C code's, as the in-guest migration helper runs it per page (open: the helper's one
pass through a private scratch page, cp_gcm_open_shared). Baselines: OpenSSL through `cryptography`'s
AESGCM on 1 MiB calls and on single 4 KiB calls. One core, best of several runs. ``--before REF`` also
builds firmware/crypto as it was at git commit REF and measures it in the same rounds ("before" rows).
The 512-bit path (vaes512) runs only on a CPU with AVX-512F/BW/VL; elsewhere the bench says it was not run.

``--impl aesni,vaes`` measures only those implementations (default: every one this CPU can run).

    .venv/bin/python bench/bench_mh_crypto.py [--seconds 0.25] [--repeats 5] [--before REF] [--impl LIST]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ROOT = Path(__file__).resolve().parent.parent
CRYPTO_DIR = ROOT / "firmware" / "crypto"
PAGE = 4096
PAGES = 256
MIB = PAGE * PAGES
AAD_LEN = 28  # gpa u64 | generation u32 | migration id 16 bytes
IMPLS = {"vaes512": 3, "vaes": 2, "aesni": 1, "portable": 0}


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def runnable_impls() -> list[str]:
    """The fast implementations this CPU can execute (the dispatch's rule, from /proc/cpuinfo)."""
    flags = cpu_flags()
    names = ["aesni"] if {"aes", "pclmulqdq", "ssse3", "sse4_1"} <= flags else []
    if names and {"avx2", "vaes", "vpclmulqdq"} <= flags:
        names.insert(0, "vaes")
        if {"avx512f", "avx512bw", "avx512vl"} <= flags:
            names.insert(0, "vaes512")
    return names


def build_library(out_dir: Path, source: Path = CRYPTO_DIR) -> ctypes.CDLL:
    subprocess.run(["make", "-s", "-C", str(source), f"O={out_dir}", "lib"], check=True)
    lib = ctypes.CDLL(str(out_dir / "libcpgcm.so"))
    p, sz, u32, u64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32, ctypes.c_uint64
    lib.cp_gcm_ctx_size.restype = sz
    lib.cp_gcm_init.argtypes = [p, p, u32]
    lib.cp_gcm_nonce_seq_init.argtypes = [p, u32, u64]
    lib.cp_gcm_seal_pages.argtypes = [p, p, sz, p, sz, p, p, p, p]
    lib.cp_gcm_seal_pages.restype = sz
    lib.cp_gcm_open_pages.argtypes = [p, sz, p, p, sz, p, p, p, p]
    lib.cp_gcm_open_pages.restype = sz
    return lib


Case = tuple[Callable[[], object], int]  # one call, bytes it processes


def one_run(fn: Callable[[], object], nbytes: int, seconds: float) -> float:
    """Bytes/s of calling fn back to back for at least `seconds`."""
    calls = 0
    start = time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls * nbytes / elapsed


def best_rates(cases: dict[str, Case], seconds: float, repeats: int) -> dict[str, float]:
    """Best of `repeats` rounds; each round runs every case once, so noise from the other users of this
    shared machine hits baseline and candidate alike."""
    best = dict.fromkeys(cases, 0.0)
    for _ in range(repeats):
        for name, (fn, nbytes) in cases.items():
            best[name] = max(best[name], one_run(fn, nbytes, seconds))
    return best


class PageBench:
    """Buffers and one key for sealing and opening PAGES pages through the library."""

    def __init__(self, lib: ctypes.CDLL, impl: int) -> None:
        self.lib = lib
        self.ctx = ctypes.create_string_buffer(lib.cp_gcm_ctx_size())
        if lib.cp_gcm_init(self.ctx, os.urandom(32), impl) != 0:
            raise SystemExit(f"cp_gcm_init refused implementation {impl}")
        self.seq = ctypes.create_string_buffer(16)
        lib.cp_gcm_nonce_seq_init(self.seq, 1, 0)
        self.plain = ctypes.create_string_buffer(os.urandom(MIB), MIB)
        self.sealed = ctypes.create_string_buffer(MIB)
        self.opened = ctypes.create_string_buffer(MIB)
        self.aad = ctypes.create_string_buffer(os.urandom(AAD_LEN * PAGES), AAD_LEN * PAGES)
        self.ivs = ctypes.create_string_buffer(12 * PAGES)
        self.tags = ctypes.create_string_buffer(16 * PAGES)

    def seal(self) -> None:
        done = self.lib.cp_gcm_seal_pages(self.ctx, self.seq, PAGES, self.aad, AAD_LEN, self.plain,
                                          self.sealed, self.ivs, self.tags)
        if done != PAGES:
            raise SystemExit("nonce sequence exhausted")

    def open(self) -> None:
        refused = self.lib.cp_gcm_open_pages(self.ctx, PAGES, self.ivs, self.aad, AAD_LEN, self.sealed,
                                             self.opened, self.tags, None)
        if refused:
            raise SystemExit(f"{refused} pages refused")


def openssl_cases() -> dict[str, Case]:
    aead = AESGCM(AESGCM.generate_key(256))
    nonce, aad = os.urandom(12), os.urandom(AAD_LEN)
    big, page = os.urandom(MIB), os.urandom(PAGE)
    big_ct, page_ct = aead.encrypt(nonce, big, aad), aead.encrypt(nonce, page, aad)
    return {
        "openssl seal 1MiB": (lambda: aead.encrypt(nonce, big, aad), MIB),
        "openssl open 1MiB": (lambda: aead.decrypt(nonce, big_ct, aad), MIB),
        "openssl seal 4KiB": (lambda: aead.encrypt(nonce, page, aad), PAGE),
        "openssl open 4KiB": (lambda: aead.decrypt(nonce, page_ct, aad), PAGE),
    }


def sources_at(ref: str, into: Path) -> Path:
    """firmware/crypto as it was at git commit ``ref``, unpacked under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "firmware/crypto"], check=True,
                             capture_output=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "firmware" / "crypto"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.2, help="minimum duration of one run")
    parser.add_argument("--repeats", type=int, default=7, help="rounds; the best run of each case is kept")
    parser.add_argument("--before", metavar="REF", help="also measure firmware/crypto as of this git commit")
    parser.add_argument("--impl", help="comma-separated subset of vaes512,vaes,aesni (default: all runnable)")
    args = parser.parse_args()
    impls = runnable_impls()
    if "vaes512" not in impls:
        print("vaes512 not run: this CPU lacks AVX-512F/BW/VL (or VAES/VPCLMULQDQ)")
    if args.impl:
        wanted = args.impl.split(",")
        if not set(wanted) <= set(impls) | {"portable"}:
            parser.error(f"--impl: this CPU runs {', '.join([*impls, 'portable'])}")
        impls = [name for name in impls if name in wanted]
    with tempfile.TemporaryDirectory(prefix="cpgcm-bench-") as tmp:
        libs = {"cp_gcm": build_library(Path(tmp) / "now")}
        if args.before:
            libs["before"] = build_library(Path(tmp) / "before", sources_at(args.before, Path(tmp)))
        cases = openssl_cases()
        benches = []  # kept alive: the cases hold their bound methods
        for impl_name in impls:
            for label, lib in libs.items():
                if label == "before" and not hasattr(lib, "cp_vaes512_seal") and IMPLS[impl_name] > 2:
                    continue  # sources before session 5 had no 512-bit path
                bench = PageBench(lib, IMPLS[impl_name])
                bench.seal()
                benches.append(bench)
                cases[f"{label} {impl_name} seal"] = (bench.seal, MIB)
                cases[f"{label} {impl_name} open"] = (bench.open, MIB)
        got = best_rates(cases, args.seconds, args.repeats)
        portable = PageBench(libs["cp_gcm"], IMPLS["portable"])
        portable.seal()
        got |= best_rates({"cp_gcm portable seal": (portable.seal, MIB),
                           "cp_gcm portable open": (portable.open, MIB)}, args.seconds / 4, 1)
    print(f"{'what (cp_gcm: 256 x 4 KiB pages per call)':42} {'GB/s':>7} {'x OpenSSL 1MiB':>15} "
          f"{'x OpenSSL 4KiB':>15}")
    for name, value in got.items():
        line = f"{name:42} {value / 1e9:7.3f}"
        if name.startswith(("cp_gcm", "before")):
            op = name.split()[-1]
            line += f" {value / got[f'openssl {op} 1MiB']:15.2f} {value / got[f'openssl {op} 4KiB']:15.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
