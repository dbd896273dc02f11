"""The firmware's AES-256-GCM (firmware/crypto): NIST vectors, OpenSSL cross-checks, refusal behaviour.

The C sources are built at test time into a temp dir (nothing prebuilt is committed): the firmware objects
with the guest's exact flags, a host shared library from the same sources for ctypes, and the NIST
known-answer program. The key is in the test's hands here; the product never decrypts outside the MH.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

CRYPTO_DIR = Path(__file__).resolve().parent.parent / "firmware" / "crypto"
PAGE = 4096
PORTABLE, AESNI, VAES, VAES512 = 0, 1, 2, 3
LENGTHS = [0, 1, 15, 16, 17, 255, 257, 4095, 4096, 65536]
GCM_MAX_TEXT = (1 << 36) - 32


def _host_flags() -> set[str]:
    return set(Path("/proc/cpuinfo").read_text().split())


def _host_has_aesni() -> bool:
    return {"aes", "pclmulqdq", "ssse3", "sse4_1"} <= _host_flags()


def _host_has_vaes() -> bool:
    return _host_has_aesni() and {"avx2", "vaes", "vpclmulqdq"} <= _host_flags()


def _host_has_vaes512() -> bool:
    return _host_has_vaes() and {"avx512f", "avx512bw", "avx512vl"} <= _host_flags()


SIMDE_HEADER = Path("/usr/include/simde/x86/avx512.h")  # Debian libsimde-dev (make test installs it)


def _vaes512_emulated() -> bool:
    """Where the CPU lacks AVX-512, the 512-bit path's logic still runs: its intrinsics from SIMDe
    (firmware/crypto/emul512.h) on AVX2 and AES-NI. Its own instructions run only where the CPU has them."""
    return not _host_has_vaes512() and _host_has_aesni() and "avx2" in _host_flags() and SIMDE_HEADER.exists()


def _vaes512_runs() -> bool:
    return _host_has_vaes512() or _vaes512_emulated()


IMPL_PARAMS = [
    pytest.param(PORTABLE, id="portable"),
    pytest.param(AESNI, id="aesni",
                 marks=pytest.mark.skipif(not _host_has_aesni(), reason="host CPU lacks AES-NI/PCLMULQDQ")),
    pytest.param(VAES, id="vaes",
                 marks=pytest.mark.skipif(not _host_has_vaes(), reason="host CPU lacks VAES/VPCLMUL/AVX2")),
    pytest.param(VAES512, id="vaes512",
                 marks=pytest.mark.skipif(not _vaes512_runs(),
                                          reason="host CPU lacks AVX-512F/BW/VL and SIMDe (libsimde-dev) is "
                                                 "not installed: the 512-bit path cannot run")),
]
# Lengths around the fused paths' 256-byte chunks and the 16-byte blocks.
SHARED_LENGTHS = [0, 1, 15, 16, 17, 255, 256, 257, 511, 1000, 4095, 4096, 4097, 8191]


@dataclass(frozen=True)
class Build:
    out: Path
    lib: ctypes.CDLL
    emu512: ctypes.CDLL | None = None  # the same library with the 512-bit path's intrinsics from SIMDe

    def lib_for(self, impl: int) -> ctypes.CDLL:
        """The library that runs ``impl`` here: the emulated 512-bit path where the CPU has no AVX-512."""
        return self.emu512 if impl == VAES512 and self.emu512 is not None else self.lib


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """All prototypes in one table (c_char_p: read-only input, c_void_p: written)."""
    cp, vp, sz, u32, u64 = ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32, ctypes.c_uint64
    table: dict[str, tuple[list[type], type | None]] = {
        "cp_gcm_ctx_size": ([], sz),
        "cp_gcm_init": ([vp, cp, u32], ctypes.c_int),
        "cp_gcm_wipe": ([vp], None),
        "cp_gcm_seal": ([vp, cp, cp, sz, cp, vp, sz, vp], ctypes.c_int),
        "cp_gcm_open": ([vp, cp, cp, sz, cp, vp, sz, cp], ctypes.c_int),
        "cp_gcm_nonce_seq_init": ([vp, u32, u64], None),
        "cp_gcm_nonce_next": ([vp, vp], ctypes.c_int),
        "cp_gcm_seal_pages": ([vp, vp, sz, cp, sz, cp, vp, vp, vp], sz),
        "cp_gcm_open_pages": ([vp, sz, cp, cp, sz, cp, vp, cp, vp], sz),
        "cp_gcm_seal_shared": ([vp, cp, cp, sz, cp, vp, sz, vp, vp], ctypes.c_int),
        "cp_gcm_open_shared": ([vp, cp, cp, sz, cp, vp, sz, cp, vp], ctypes.c_int),
        "cp_gcm_pick_impl": ([u32], u32),
        "cp_cpu_features_from_cpuid": ([u32, u32, u32, u64], u32),
    }
    for name, (args, res) in table.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = res
    return lib


@pytest.fixture(scope="session")
def build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    if shutil.which("gcc") is None or shutil.which("make") is None:
        pytest.fail("building firmware/crypto needs gcc and make on PATH")
    out = tmp_path_factory.mktemp("cpgcm")
    emulated = ["lib-emu512", f"{out}/test_gcm_emu512"] if _vaes512_emulated() else []
    targets = ["objs", "lib", f"{out}/test_gcm", *emulated]
    make = ["make", "-s", "-C", str(CRYPTO_DIR), f"O={out}", *targets]
    subprocess.run(make, check=True, capture_output=True, text=True)
    emu512 = _declare(ctypes.CDLL(str(out / "libcpgcm_emu512.so"))) if emulated else None
    return Build(out, _declare(ctypes.CDLL(str(out / "libcpgcm.so"))), emu512)


class Gcm:
    """One key in one implementation, driven through the library's C API."""

    def __init__(self, build: Build, key: bytes, impl: int) -> None:
        self.lib = build.lib_for(impl)
        self.ctx = ctypes.create_string_buffer(self.lib.cp_gcm_ctx_size())
        assert self.lib.cp_gcm_init(self.ctx, key, impl) == 0

    def seal(self, iv: bytes, aad: bytes, plain: bytes) -> bytes:
        out = ctypes.create_string_buffer(max(len(plain), 1))
        tag = ctypes.create_string_buffer(16)
        assert self.lib.cp_gcm_seal(self.ctx, iv, aad, len(aad), plain, out, len(plain), tag) == 0
        return out.raw[: len(plain)] + tag.raw

    def open_into(self, iv: bytes, aad: bytes, sealed: bytes, out: ctypes.Array[ctypes.c_char]) -> int:
        body, tag = sealed[:-16], sealed[-16:]
        return int(self.lib.cp_gcm_open(self.ctx, iv, aad, len(aad), body, out, len(body), tag))


def test_nist_known_answers_program(build: Build) -> None:
    run = subprocess.run([str(build.out / "test_gcm")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[-1].startswith("ok:"), run.stdout
    expected = 1 + _host_has_aesni() + _host_has_vaes() + _host_has_vaes512()
    assert f"x {expected} implementation(s)" in run.stdout, run.stdout


@pytest.mark.skipif(not _vaes512_emulated(), reason="the CPU runs the 512-bit path natively (tested above), "
                    "or SIMDe (libsimde-dev) is not installed")
def test_nist_known_answers_program_with_the_512_bit_path_emulated(build: Build) -> None:
    """The same program with the 512-bit path's intrinsics from SIMDe: its logic against every known answer,
    and against the portable path on random lengths, on a CPU without AVX-512."""
    run = subprocess.run([str(build.out / "test_gcm_emu512")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "tested vaes512" in run.stdout and run.stdout.splitlines()[-1].startswith("ok:"), run.stdout
    emulated = build.out / "emu512" / "gcm_vaes512.o"
    disassembly = subprocess.run(["objdump", "-d", str(emulated)], capture_output=True, text=True, check=True)
    assert "zmm" not in disassembly.stdout  # nothing of it needs AVX-512 to run


def test_firmware_objects_need_nothing_from_libc(build: Build) -> None:
    objects = sorted(build.out.glob("*.o"))
    names = {"gcm.o", "aes_portable.o", "gcm_aesni.o", "gcm_vaes.o", "gcm_vaes512.o", "sha256.o", "x25519.o",
             "rdrand.o"}  # fmt: skip
    assert {o.name for o in objects} == names
    undefined = subprocess.run(["nm", "-u", *map(str, objects)], capture_output=True, text=True, check=True)
    defined = subprocess.run(["nm", "--defined-only", *map(str, objects)], capture_output=True, text=True,
                             check=True)
    provided = {line.split()[-1] for line in defined.stdout.splitlines() if line.count(" ") >= 2}
    needed = {line.split()[-1] for line in undefined.stdout.splitlines() if line.strip().startswith("U ")}
    assert needed <= provided, f"symbols the firmware would need from elsewhere: {needed - provided}"


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("length", LENGTHS)
def test_matches_openssl_both_ways(build: Build, impl: int, length: int) -> None:
    rng = random.Random(length * 2 + impl)
    key, iv = rng.randbytes(32), rng.randbytes(12)
    aad, plain = rng.randbytes(rng.choice([0, 1, 28, 100])), rng.randbytes(length)
    ours = Gcm(build, key, impl).seal(iv, aad, plain)
    theirs = AESGCM(key).encrypt(iv, plain, aad)
    assert ours == theirs
    assert AESGCM(key).decrypt(iv, ours, aad) == plain
    out = ctypes.create_string_buffer(max(length, 1))
    assert Gcm(build, key, impl).open_into(iv, aad, theirs, out) == 0
    assert out.raw[:length] == plain


@pytest.mark.parametrize("impl", IMPL_PARAMS[1:])
def test_implementations_agree_bit_for_bit(build: Build, impl: int) -> None:
    rng = random.Random(7)
    key = rng.randbytes(32)
    portable, fast = Gcm(build, key, PORTABLE), Gcm(build, key, impl)
    for length in [*range(0, 300), 1000, 4096 + 7]:
        iv, aad, plain = rng.randbytes(12), rng.randbytes(length % 41), rng.randbytes(length)
        assert portable.seal(iv, aad, plain) == fast.seal(iv, aad, plain), f"length {length}"


def _tamper(what: str, iv: bytes, aad: bytes, sealed: bytes) -> tuple[bytes, bytes, bytes]:
    def flip(b: bytes, at: int) -> bytes:
        return b[:at] + bytes([b[at] ^ 0x80]) + b[at + 1 :]

    if what == "ciphertext":
        return iv, aad, flip(sealed, 1234)
    if what == "tag":
        return iv, aad, flip(sealed, len(sealed) - 1)
    if what == "aad":
        return iv, flip(aad, 8), sealed
    return flip(iv, 11), aad, sealed


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("what", ["ciphertext", "tag", "aad", "nonce"])
def test_tampering_is_refused_and_nothing_is_written(build: Build, impl: int, what: str) -> None:
    rng = random.Random(what)
    key, iv, aad, plain = rng.randbytes(32), rng.randbytes(12), rng.randbytes(28), rng.randbytes(PAGE)
    gcm = Gcm(build, key, impl)
    sealed = gcm.seal(iv, aad, plain)
    bad_iv, bad_aad, bad_sealed = _tamper(what, iv, aad, sealed)
    out = ctypes.create_string_buffer(b"\xa5" * PAGE, PAGE)
    assert gcm.open_into(bad_iv, bad_aad, bad_sealed, out) == -1
    assert out.raw == b"\xa5" * PAGE
    with pytest.raises(InvalidTag):  # OpenSSL agrees the tampering is real
        AESGCM(key).decrypt(bad_iv, bad_sealed, bad_aad)
    assert gcm.open_into(iv, aad, sealed, out) == 0 and out.raw == plain


def test_refuses_an_uninitialised_or_wiped_context_and_oversized_text(build: Build) -> None:
    lib = build.lib
    ctx = ctypes.create_string_buffer(lib.cp_gcm_ctx_size())
    out, tag = ctypes.create_string_buffer(16), ctypes.create_string_buffer(16)
    assert lib.cp_gcm_seal(ctx, bytes(12), b"", 0, bytes(16), out, 16, tag) == -1
    assert lib.cp_gcm_init(ctx, bytes(32), 99) == -1
    assert lib.cp_gcm_init(ctx, bytes(32), PORTABLE) == 0
    # Beyond the SP 800-38D limit the call fails before touching either buffer.
    assert lib.cp_gcm_seal(ctx, bytes(12), b"", 0, bytes(16), out, GCM_MAX_TEXT + 1, tag) == -1
    assert lib.cp_gcm_seal(ctx, bytes(12), b"", 0, bytes(16), out, 16, tag) == 0
    lib.cp_gcm_wipe(ctx)
    assert ctx.raw == bytes(len(ctx.raw))
    assert lib.cp_gcm_open(ctx, bytes(12), b"", 0, out.raw, out, 16, tag.raw) == -1


def _seq(lib: ctypes.CDLL, sender: int, first: int) -> ctypes.Array[ctypes.c_char]:
    seq = ctypes.create_string_buffer(16)
    lib.cp_gcm_nonce_seq_init(seq, sender, first)
    return seq


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_page_batches_round_trip_and_refuse_page_by_page(build: Build, impl: int) -> None:
    lib, n, aad_len = build.lib_for(impl), 6, 28
    key = os.urandom(32)
    gcm = Gcm(build, key, impl)
    plain, aad = os.urandom(n * PAGE), os.urandom(n * aad_len)
    sealed = ctypes.create_string_buffer(n * PAGE)
    ivs, tags = ctypes.create_string_buffer(12 * n), ctypes.create_string_buffer(16 * n)
    seq = _seq(lib, 0xC0FFEE01, 41)
    assert lib.cp_gcm_seal_pages(gcm.ctx, seq, n, aad, aad_len, plain, sealed, ivs, tags) == n
    for i in range(n):
        iv = ivs.raw[12 * i : 12 * i + 12]
        assert iv == (0xC0FFEE01).to_bytes(4, "big") + (41 + i).to_bytes(8, "big")
        ct = sealed.raw[PAGE * i : PAGE * (i + 1)] + tags.raw[16 * i : 16 * i + 16]
        page_aad = aad[aad_len * i : aad_len * (i + 1)]
        assert AESGCM(key).decrypt(iv, ct, page_aad) == plain[PAGE * i : PAGE * (i + 1)]
    bad = bytearray(sealed.raw)
    bad[3 * PAGE + 100] ^= 1
    out = ctypes.create_string_buffer(b"\x5a" * (n * PAGE), n * PAGE)
    status = (ctypes.c_int32 * n)()
    assert lib.cp_gcm_open_pages(gcm.ctx, n, ivs.raw, aad, aad_len, bytes(bad), out, tags.raw, status) == 1
    assert list(status) == [0, 0, 0, -1, 0, 0]
    assert out.raw[3 * PAGE : 4 * PAGE] == b"\x5a" * PAGE
    assert out.raw[: 3 * PAGE] == plain[: 3 * PAGE] and out.raw[4 * PAGE :] == plain[4 * PAGE :]


def test_nonce_sequence_stops_instead_of_wrapping(build: Build) -> None:
    lib = build.lib
    gcm = Gcm(build, os.urandom(32), PORTABLE)
    seq = _seq(lib, 7, (1 << 64) - 2)
    sealed, ivs, tags = (ctypes.create_string_buffer(k) for k in (4 * PAGE, 48, 64))
    zeros = bytes(4 * PAGE)
    assert lib.cp_gcm_seal_pages(gcm.ctx, seq, 4, bytes(4 * 28), 28, zeros, sealed, ivs, tags) == 2
    assert [ivs.raw[12 * i + 4 : 12 * i + 12] for i in range(2)] == [b"\xff" * 7 + b"\xfe", b"\xff" * 8]
    iv = ctypes.create_string_buffer(12)
    assert lib.cp_gcm_nonce_next(seq, iv) == -1


def test_pick_impl_from_cpuid_words(build: Build) -> None:
    lib = build.lib
    leaf1 = 1 << 25 | 1 << 1 | 1 << 9 | 1 << 19  # AES, PCLMULQDQ, SSSE3, SSE4.1
    leaf7_ebx, leaf7_ecx = 1 << 5, 1 << 9 | 1 << 10  # AVX2; VAES, VPCLMULQDQ
    avx512 = 1 << 16 | 1 << 30 | 1 << 31  # AVX-512F, BW, VL
    features = lib.cp_cpu_features_from_cpuid
    assert lib.cp_gcm_pick_impl(features(leaf1, leaf7_ebx | avx512, leaf7_ecx, 0xE7)) == VAES512
    # The 512-bit path needs every piece: each one missing falls back to 256 bits.
    for missing in (1 << 16, 1 << 30, 1 << 31):
        assert lib.cp_gcm_pick_impl(features(leaf1, leaf7_ebx | avx512 & ~missing, leaf7_ecx, 0xE7)) == VAES
    for xcr0 in (0x7, 0x27, 0x67, 0xA7, 0xC7):  # opmask, ZMM_Hi256 and Hi16_ZMM all needed
        assert lib.cp_gcm_pick_impl(features(leaf1, leaf7_ebx | avx512, leaf7_ecx, xcr0)) == VAES
    assert lib.cp_gcm_pick_impl(features(leaf1, leaf7_ebx | avx512, leaf7_ecx, 0xE3)) == AESNI  # no YMM
    assert lib.cp_gcm_pick_impl(features(leaf1, leaf7_ebx, leaf7_ecx, 0x7)) == VAES
    assert lib.cp_gcm_pick_impl(features(leaf1, leaf7_ebx, leaf7_ecx, 0x3)) == AESNI  # YMM state off
    assert lib.cp_gcm_pick_impl(features(leaf1, 0, leaf7_ecx, 0x7)) == AESNI
    assert lib.cp_gcm_pick_impl(features(leaf1 & ~(1 << 25), leaf7_ebx, leaf7_ecx, 0x7)) == PORTABLE
    assert lib.cp_gcm_pick_impl(0) == PORTABLE


class Shared:
    """seal_shared/open_shared with separate out and scratch buffers the test can inspect."""

    def __init__(self, build: Build, key: bytes, impl: int, length: int) -> None:
        self.gcm, self.n = Gcm(build, key, impl), max(length, 1)
        self.out, self.scratch = ctypes.create_string_buffer(self.n), ctypes.create_string_buffer(self.n)

    def seal(self, iv: bytes, aad: bytes, plain: bytes) -> bytes:
        tag = ctypes.create_string_buffer(16)
        lib, ctx = self.gcm.lib, self.gcm.ctx
        rc = lib.cp_gcm_seal_shared(ctx, iv, aad, len(aad), plain, self.out, len(plain), tag, self.scratch)
        assert rc == 0
        return self.out.raw[: len(plain)] + tag.raw

    def open(self, iv: bytes, aad: bytes, sealed: bytes) -> int:
        body, tag = sealed[:-16], sealed[-16:]
        return int(self.gcm.lib.cp_gcm_open_shared(self.gcm.ctx, iv, aad, len(aad), body, self.out, len(body),
                                                   tag, self.scratch))


def _runnable_impls() -> list[int]:
    return [PORTABLE] + [impl for impl, ok in ((AESNI, _host_has_aesni()), (VAES, _host_has_vaes()),
                                                (VAES512, _vaes512_runs())) if ok]  # fmt: skip


def test_every_implementation_gives_the_same_bytes_every_way(build: Build) -> None:
    """Every implementation this CPU runs, through each call that seals or opens (seal, seal in place,
    seal_shared, open_shared), gives OpenSSL's bytes: every length to 300 and strides past the fused paths'
    16-block groups, AAD of 0 to 300 bytes (whole and partial groups of the aggregated GHASH)."""
    rng = random.Random(14)
    key = rng.randbytes(32)
    aad_lens = [0, 1, 15, 16, 17, 28, 48, 63, 64, 65, 255, 256, 257, 300]
    impls = {impl: Gcm(build, key, impl) for impl in _runnable_impls()}
    for round_, length in enumerate([*range(0, 300), *range(300, 4200, 97), 8192]):
        iv, plain = rng.randbytes(12), rng.randbytes(length)
        aad = rng.randbytes(aad_lens[round_ % len(aad_lens)])
        want = AESGCM(key).encrypt(iv, plain, aad)
        for impl, gcm in impls.items():
            where = f"impl {impl} length {length} aad {len(aad)}"
            assert gcm.seal(iv, aad, plain) == want, where
            buf, tag = ctypes.create_string_buffer(plain, max(length, 1)), ctypes.create_string_buffer(16)
            assert gcm.lib.cp_gcm_seal(gcm.ctx, iv, aad, len(aad), buf, buf, length, tag) == 0
            assert buf.raw[:length] + tag.raw == want, f"in place: {where}"
            shared = Shared(build, key, impl, length)
            assert shared.seal(iv, aad, plain) == want, f"seal_shared: {where}"
            opened = shared.open(iv, aad, want)
            assert opened == 0 and shared.out.raw[:length] == plain, f"open_shared: {where}"


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("length", SHARED_LENGTHS)
def test_shared_seal_and_open_match_openssl(build: Build, impl: int, length: int) -> None:
    """The calls the migration helper makes (SAVE into the slot, LOAD from it), at odd lengths too."""
    rng = random.Random(length * 5 + impl)
    key, iv, aad, plain = rng.randbytes(32), rng.randbytes(12), rng.randbytes(28), rng.randbytes(length)
    shared = Shared(build, key, impl, length)
    sealed = shared.seal(iv, aad, plain)
    assert sealed == AESGCM(key).encrypt(iv, plain, aad)
    shared.out.raw = b"\x5a" * shared.n
    assert shared.open(iv, aad, sealed) == 0
    assert shared.out.raw[:length] == plain


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("what", ["ciphertext", "tag", "aad", "nonce"])
def test_shared_open_refuses_tampering_and_leaves_nothing(build: Build, impl: int, what: str) -> None:
    """One flipped bit anywhere: refused, `out` untouched, and no plaintext left in the scratch buffer (the
    256-bit and two-pass paths never decrypt before the tag matched; the 512-bit one wipes what it did)."""
    rng = random.Random(what + "shared")
    key, iv, aad, plain = rng.randbytes(32), rng.randbytes(12), rng.randbytes(28), rng.randbytes(PAGE)
    shared = Shared(build, key, impl, PAGE)
    bad_iv, bad_aad, bad_sealed = _tamper(what, iv, aad, shared.seal(iv, aad, plain))
    shared.out.raw = b"\xa5" * PAGE
    assert shared.open(bad_iv, bad_aad, bad_sealed) == -1
    assert shared.out.raw == b"\xa5" * PAGE
    assert plain[:64] not in shared.scratch.raw
    if impl == VAES512:  # the fused open decrypted into it: wiped
        assert shared.scratch.raw == bytes(PAGE)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_every_bit_of_a_short_record_is_covered(build: Build, impl: int) -> None:
    """Mutation over a whole 37-byte record (odd length: a fused chunk never fills): each flipped bit of
    ciphertext or tag is refused, by open and by open_shared."""
    rng = random.Random(37 + impl)
    key, iv, aad, plain = rng.randbytes(32), rng.randbytes(12), rng.randbytes(5), rng.randbytes(37)
    gcm, shared = Gcm(build, key, impl), Shared(build, key, impl, 37)
    sealed = gcm.seal(iv, aad, plain)
    out = ctypes.create_string_buffer(37)
    for bit in range(len(sealed) * 8):
        bad = bytearray(sealed)
        bad[bit // 8] ^= 1 << (bit % 8)
        assert gcm.open_into(iv, aad, bytes(bad), out) == -1, f"bit {bit}"
        assert shared.open(iv, aad, bytes(bad)) == -1, f"bit {bit}"
    assert shared.open(iv, aad, sealed) == 0 and shared.out.raw == plain


def test_this_host_picks_a_path_it_can_run(build: Build, tmp_path: Path) -> None:
    """The real chain: the VMM's feature word from KVM and this CPU (cpu_setup.cpu_info), the helper's
    mapping of it (cp_mh_features_from_bp), the pick. Never the 512-bit path on a CPU without AVX-512;
    otherwise the fastest path the CPU has."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not usable here")
    from confplan.kvm import Kvm
    from confplan.migration.host_mh import build_host_library
    from confplan.vmm.cpu_setup import cpu_info

    with Kvm() as kvm:
        info = cpu_info(kvm.supported_cpuid())
    mh = build_host_library(tmp_path)
    picked = mh.cp_gcm_pick_impl(mh.cp_mh_features_from_bp(info.features))
    assert picked == build.lib.cp_gcm_pick_impl(mh.cp_mh_features_from_bp(info.features))
    if not _host_has_vaes512():
        assert picked != VAES512 and not info.has_zmm
    want = VAES if _host_has_vaes() else AESNI if _host_has_aesni() else PORTABLE
    assert picked == (VAES512 if info.has_zmm else want)
    # MachineConfig.crypto_impl caps that word (cap_for_crypto, in the boot parameters): the helper then
    # picks the capped implementation, or a slower one where the CPU lacks it, never a faster one.
    from confplan.vmm.cpu_setup import cap_for_crypto

    for cap, impl in (("vaes512", VAES512), ("vaes", VAES), ("aes-ni", AESNI), ("portable", PORTABLE)):
        capped = mh.cp_gcm_pick_impl(mh.cp_mh_features_from_bp(cap_for_crypto(info.features, cap)))
        assert capped == min(impl, picked), cap  # the implementations are numbered slowest first
    assert mh.cp_gcm_pick_impl(mh.cp_mh_features_from_bp(cap_for_crypto(info.features, "auto"))) == picked
