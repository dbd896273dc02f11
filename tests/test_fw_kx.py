"""The firmware's key-exchange primitives (firmware/crypto/cp_kx.h): SHA-256, HMAC, HKDF, X25519, RDRAND.

Known answers from the standards (FIPS 180-2, RFC 4231, RFC 5869, RFC 7748) and randomized comparisons
against OpenSSL through ``cryptography`` and ``hashlib``, through the host library built from the same
sources with the guest's flags (``libcpgcm.so``, as tests/test_fw_crypto.py builds it).
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

CRYPTO_DIR = Path(__file__).resolve().parent.parent / "firmware" / "crypto"
P = 2**255 - 19
HKDF_MAX = 255 * 32


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    if shutil.which("gcc") is None or shutil.which("make") is None:
        pytest.fail("building firmware/crypto needs gcc and make on PATH")
    out = tmp_path_factory.mktemp("cpkx")
    subprocess.run(["make", "-s", "-C", str(CRYPTO_DIR), f"O={out}", "lib"], check=True, capture_output=True)
    lib = ctypes.CDLL(str(out / "libcpgcm.so"))
    cp, vp, sz = ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t
    table: dict[str, tuple[list[type], type | None]] = {
        "cp_sha256": ([cp, sz, vp], None),
        "cp_sha256_init": ([vp], None),
        "cp_sha256_update": ([vp, cp, sz], None),
        "cp_sha256_final": ([vp, vp], None),
        "cp_hmac_sha256": ([cp, sz, cp, sz, vp], None),
        "cp_hkdf_sha256": ([cp, sz, cp, sz, cp, sz, vp, sz], ctypes.c_int),
        "cp_hkdf_sha256_extract": ([cp, sz, cp, sz, vp], None),
        "cp_hkdf_sha256_expand": ([cp, cp, sz, vp, sz], ctypes.c_int),
        "cp_x25519": ([vp, cp, cp], ctypes.c_int),
        "cp_x25519_base": ([vp, cp], None),
        "cp_x25519_is_zero": ([cp], ctypes.c_int),
        "cp_rdrand_bytes": ([vp, sz], ctypes.c_int),
        "cp_cpu_features_from_cpuid": ([ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint64],
                                       ctypes.c_uint32),
    }
    for name, (args, res) in table.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def sha256(lib: ctypes.CDLL, data: bytes) -> bytes:
    out = ctypes.create_string_buffer(32)
    lib.cp_sha256(data, len(data), out)
    return out.raw


def hmac_sha256(lib: ctypes.CDLL, key: bytes, data: bytes) -> bytes:
    out = ctypes.create_string_buffer(32)
    lib.cp_hmac_sha256(key, len(key), data, len(data), out)
    return out.raw


def hkdf(lib: ctypes.CDLL, salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes | None:
    out = ctypes.create_string_buffer(b"\xa5" * max(length, 1), max(length, 1))
    rc = lib.cp_hkdf_sha256(salt, len(salt), ikm, len(ikm), info, len(info), out, length)
    if rc != 0:
        assert out.raw == b"\xa5" * max(length, 1)  # nothing written
        return None
    return out.raw[:length]


def x25519(lib: ctypes.CDLL, scalar: bytes, point: bytes) -> tuple[int, bytes]:
    out = ctypes.create_string_buffer(32)
    rc = lib.cp_x25519(out, scalar, point)
    return int(rc), out.raw


def openssl_x25519(scalar: bytes, point: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(scalar).exchange(X25519PublicKey.from_public_bytes(point))


# ---- SHA-256 ----

FIPS_SHA256 = [
    (b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
    (b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
     "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"),
    (b"a" * 1_000_000, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"),
    (b"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
]  # fmt: skip


@pytest.mark.parametrize(("message", "digest"), FIPS_SHA256, ids=["abc", "448-bit", "million-a", "empty"])
def test_sha256_fips_vectors(lib: ctypes.CDLL, message: bytes, digest: str) -> None:
    assert sha256(lib, message).hex() == digest


def test_sha256_matches_hashlib_at_every_padding_boundary_and_in_pieces(lib: ctypes.CDLL) -> None:
    rng = random.Random(1)
    ctx = ctypes.create_string_buffer(256)
    out = ctypes.create_string_buffer(32)
    for n in [*range(0, 200), 1000, 4096, 65537]:
        data = rng.randbytes(n)
        assert sha256(lib, data) == hashlib.sha256(data).digest(), n
        lib.cp_sha256_init(ctx)  # the same bytes fed in random pieces
        at = 0
        while at < n:
            step = rng.choice([1, 3, 63, 64, 65, 200])
            lib.cp_sha256_update(ctx, data[at : at + step], len(data[at : at + step]))
            at += step
        lib.cp_sha256_final(ctx, out)
        assert out.raw == hashlib.sha256(data).digest(), n


# ---- HMAC-SHA256 (RFC 4231) ----

RFC4231 = [
    (b"\x0b" * 20, b"Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
    (b"Jefe", b"what do ya want for nothing?",
     "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
    (b"\xaa" * 20, b"\xdd" * 50, "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"),
    (bytes(range(1, 26)), b"\xcd" * 50, "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"),
    (b"\x0c" * 20, b"Test With Truncation", "a3b6167473100ee06e0c796c2955552b"),
    (b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First",
     "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"),
    (b"\xaa" * 131, b"This is a test using a larger than block-size key and a larger than block-size data."
     b" The key needs to be hashed before being used by the HMAC algorithm.",
     "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"),
]  # fmt: skip


@pytest.mark.parametrize(("key", "data", "mac"), RFC4231, ids=[f"case{i}" for i in range(1, 8)])
def test_hmac_rfc4231_vectors(lib: ctypes.CDLL, key: bytes, data: bytes, mac: str) -> None:
    assert hmac_sha256(lib, key, data).hex().startswith(mac)  # case 5 is truncated to 128 bits


def test_hmac_matches_python_for_every_key_length(lib: ctypes.CDLL) -> None:
    rng = random.Random(2)
    for key_len in [*range(0, 140), 1000]:
        key, data = rng.randbytes(key_len), rng.randbytes(rng.randrange(300))
        assert hmac_sha256(lib, key, data) == hmac.new(key, data, "sha256").digest(), key_len


# ---- HKDF-SHA256 (RFC 5869) ----

RFC5869 = [
    (b"\x0b" * 22, bytes(range(13)), bytes(range(0xF0, 0xFA)), 42,
     "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5",
     "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"),
    (bytes(range(0x50)), bytes(range(0x60, 0xB0)), bytes(range(0xB0, 0x100)), 82,
     "06a6b88c5853361a06104c9ceb35b45cef760014904671014a193f40c15fc244",
     "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c59045a99cac7827271cb41c65e590e09da32756"
     "00c2f09b8367793a9aca3db71cc30c58179ec3e87c14c01d5c1f3434f1d87"),
    (b"\x0b" * 22, b"", b"", 42,
     "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04",
     "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"),
]  # fmt: skip


@pytest.mark.parametrize(("ikm", "salt", "info", "length", "prk", "okm"), RFC5869, ids=["1", "2", "3"])
def test_hkdf_rfc5869_vectors(
    lib: ctypes.CDLL, ikm: bytes, salt: bytes, info: bytes, length: int, prk: str, okm: str
) -> None:
    got_prk = ctypes.create_string_buffer(32)
    lib.cp_hkdf_sha256_extract(salt, len(salt), ikm, len(ikm), got_prk)
    assert got_prk.raw.hex() == prk
    out = ctypes.create_string_buffer(length)
    assert lib.cp_hkdf_sha256_expand(got_prk.raw, info, len(info), out, length) == 0
    assert out.raw.hex() == okm
    assert hkdf(lib, salt, ikm, info, length) == bytes.fromhex(okm)


def test_hkdf_matches_cryptography_and_refuses_too_long_output(lib: ctypes.CDLL) -> None:
    rng = random.Random(3)
    for length in [1, 31, 32, 33, 64, 100, HKDF_MAX - 1, HKDF_MAX]:
        salt, ikm, info = rng.randbytes(rng.choice([0, 16, 32, 100])), rng.randbytes(32), rng.randbytes(120)
        theirs = HKDF(hashes.SHA256(), length, salt or None, info).derive(ikm)
        assert hkdf(lib, salt, ikm, info, length) == theirs, length
    assert hkdf(lib, b"s", b"k", b"i", HKDF_MAX + 1) is None
    out = ctypes.create_string_buffer(HKDF_MAX + 1)
    assert lib.cp_hkdf_sha256_expand(bytes(32), b"", 0, out, HKDF_MAX + 1) == -1


# ---- X25519 (RFC 7748) ----

RFC7748 = [
    ("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
     "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
     "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"),
    ("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
     "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
     "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"),
]  # fmt: skip


@pytest.mark.parametrize(("scalar", "point", "result"), RFC7748, ids=["5.2-1", "5.2-2"])
def test_x25519_rfc7748_vectors(lib: ctypes.CDLL, scalar: str, point: str, result: str) -> None:
    assert x25519(lib, bytes.fromhex(scalar), bytes.fromhex(point)) == (0, bytes.fromhex(result))


def test_x25519_rfc7748_iterated(lib: ctypes.CDLL) -> None:
    """Section 5.2: k = u = 9; repeat (k, u) = (X25519(k, u), k)."""
    k = u = bytes([9]) + bytes(31)
    expected = {1: "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079",
                1000: "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"}  # fmt: skip
    for i in range(1, 1001):
        k, u = x25519(lib, k, u)[1], k
        if i in expected:
            assert k.hex() == expected[i], i


def test_x25519_rfc7748_diffie_hellman(lib: ctypes.CDLL) -> None:
    """Section 6.1: Alice and Bob."""
    a = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    b = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    pub_a, pub_b = ctypes.create_string_buffer(32), ctypes.create_string_buffer(32)
    lib.cp_x25519_base(pub_a, a)
    lib.cp_x25519_base(pub_b, b)
    assert pub_a.raw.hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert pub_b.raw.hex() == "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert x25519(lib, a, pub_b.raw) == (0, bytes.fromhex(shared)) == x25519(lib, b, pub_a.raw)


def test_x25519_matches_cryptography_on_random_keys(lib: ctypes.CDLL) -> None:
    rng = random.Random(4)
    for _ in range(300):
        ours, theirs = rng.randbytes(32), rng.randbytes(32)
        their_key = X25519PrivateKey.from_private_bytes(theirs)
        public = their_key.public_key().public_bytes_raw()
        expected = openssl_x25519(ours, public)
        assert x25519(lib, ours, public) == (0, expected)
        base = ctypes.create_string_buffer(32)
        lib.cp_x25519_base(base, ours)
        assert base.raw == X25519PrivateKey.from_private_bytes(ours).public_key().public_bytes_raw()


def test_x25519_random_u_coordinates_and_non_canonical_encodings(lib: ctypes.CDLL) -> None:
    """Any 32 bytes are a u-coordinate (RFC 7748 5: mask the top bit; u >= p is accepted, taken mod p):
    random ones (on the curve or its twist), the top bit set, and u + p for u < 2^255 - p."""
    rng = random.Random(5)
    for i in range(300):
        scalar = rng.randbytes(32)
        u = rng.randrange(P) if i % 3 else rng.randrange(2**255 - P)  # the last: has a u + p form
        point = u.to_bytes(32, "little")
        if u in (0, 1):  # low order: OpenSSL refuses the all-zero result, we report it
            assert x25519(lib, scalar, point) == (-1, bytes(32))
            continue
        expected = openssl_x25519(scalar, point)
        assert x25519(lib, scalar, point)[1] == expected
        assert x25519(lib, scalar, (u | 1 << 255).to_bytes(32, "little"))[1] == expected  # top bit ignored
        if u < 2**255 - P:
            non_canonical = (u + P).to_bytes(32, "little")
            assert x25519(lib, scalar, non_canonical)[1] == expected
            assert openssl_x25519(scalar, non_canonical) == expected


def test_x25519_clamps_the_scalar(lib: ctypes.CDLL) -> None:
    rng = random.Random(6)
    point = X25519PrivateKey.generate().public_key().public_bytes_raw()
    for _ in range(20):
        k = bytearray(rng.randbytes(32))
        clamped = bytearray(k)
        clamped[0] &= 248
        clamped[31] = clamped[31] & 127 | 64
        k[0] |= 7  # bits clamping clears / sets
        k[31] ^= 0xC0
        assert x25519(lib, bytes(k), point) == x25519(lib, bytes(clamped), point)


LOW_ORDER = [
    0, 1, P - 1, P, P + 1,  # 0, 1, -1 and the non-canonical encodings of 0 and 1
    0x00B8495F16056286FDB1329CEB8D09DA6AC49FF1FAE35616AEB8413B7C7AEBE0,  # the order-8 points
    0x57119FD0DD4E22D8868E1C58C45C44045BEF839C55B1D0B1248C50A3BC959C5F,
]  # fmt: skip


@pytest.mark.parametrize("u", LOW_ORDER, ids=["0", "1", "p-1", "p", "p+1", "order8-a", "order8-b"])
def test_x25519_low_order_points_give_zero_and_are_reported(lib: ctypes.CDLL, u: int) -> None:
    for scalar in (bytes(range(32)), bytes(32), b"\xff" * 32):
        assert x25519(lib, scalar, u.to_bytes(32, "little")) == (-1, bytes(32))
        assert x25519(lib, scalar, (u | 1 << 255).to_bytes(32, "little"))[0] == -1


def test_is_zero(lib: ctypes.CDLL) -> None:
    assert lib.cp_x25519_is_zero(bytes(32)) == 1
    for at in range(32):
        for bit in (1, 0x80):
            assert lib.cp_x25519_is_zero(bytes(at) + bytes([bit]) + bytes(31 - at)) == 0


# ---- RDRAND ----

HAS_RDRAND = "rdrand" in Path("/proc/cpuinfo").read_text().split()


def test_rdrand_feature_bit_from_cpuid(lib: ctypes.CDLL) -> None:
    """CPUID.1:ECX[30] -> CP_CPU_RDRAND (bit 12), on its own: it enables no GCM path."""
    assert lib.cp_cpu_features_from_cpuid(1 << 30, 0, 0, 0) == 1 << 12
    assert lib.cp_cpu_features_from_cpuid(~(1 << 30) & 0xFFFFFFFF, 0, 0, 0) & 1 << 12 == 0


@pytest.mark.skipif(not HAS_RDRAND, reason="this CPU has no RDRAND (the helper then refuses with ENTROPY)")
def test_rdrand_fills_exactly_n_bytes_with_fresh_values(lib: ctypes.CDLL) -> None:
    for n in [0, 1, 7, 8, 9, 31, 32, 33, 100]:
        buf = ctypes.create_string_buffer(b"\xa5" * (n + 8), n + 8)
        assert lib.cp_rdrand_bytes(buf, n) == 1
        assert buf.raw[n:] == b"\xa5" * 8  # nothing past n
    draws = set()
    for _ in range(8):
        buf = ctypes.create_string_buffer(32)
        assert lib.cp_rdrand_bytes(buf, 32) == 1
        draws.add(buf.raw)
    assert len(draws) == 8 and bytes(32) not in draws
