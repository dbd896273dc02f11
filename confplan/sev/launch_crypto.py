"""The cryptography of the legacy SEV launch, shared by the emulated secure processor and the key broker.

Formats follow the AMD SEV API specification as implemented by AMDESE/sev-tool and virtee/sev:
- KDF: NIST SP800-108 counter mode, PRF HMAC-SHA256, one block truncated to 16 bytes.
- Session blob (LAUNCH_START): NONCE[16] WRAP_TK[32] WRAP_IV[16] WRAP_MAC[32] POLICY_MAC[32].
- Measurement (LAUNCH_MEASURE): HMAC-SHA256(TIK, 0x04 | api | build | policy | digest | mnonce) | MNONCE.
- Secret packet (LAUNCH_SECRET): header FLAGS[4] IV[16] MAC[32] and an AES-128-CTR(TEK) ciphertext.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_LEN = 16
SESSION_BLOB_LEN = 128
MEASURE_LEN = 48
SECRET_HEADER_LEN = 52
MEASURE_CONTEXT = 0x04  # LAUNCH_MEASURE_CTX
SECRET_CONTEXT = 0x01  # the LAUNCH_SECRET MAC context byte
SECRET_FLAG_COMPRESSED = 1 << 0

LABEL_MASTER = b"sev-master-secret"
LABEL_KEK = b"sev-kek"
LABEL_KIK = b"sev-kik"


def kdf(key: bytes, label: bytes, context: bytes, out_len: int = KEY_LEN) -> bytes:
    """SP800-108 counter-mode KDF, PRF HMAC-SHA256.

    Block i is ``HMAC(key, LE32(i) | label | 0x00 | context | LE32(out_len * 8))``.
    """
    out = b""
    counter = 1
    while len(out) < out_len:
        msg = struct.pack("<I", counter) + label + b"\x00" + context + struct.pack("<I", out_len * 8)
        out += hmac.digest(key, msg, "sha256")
        counter += 1
    return out[:out_len]


def aes128_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-128-CTR with a 128-bit big-endian counter block (encrypts and decrypts)."""
    cipher = Cipher(algorithms.AES(key), modes.CTR(iv))
    enc = cipher.encryptor()
    return enc.update(data) + enc.finalize()


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


@dataclass(frozen=True)
class TransportKeys:
    """The TEK (encryption) and TIK (integrity) keys the owner and the secure processor share."""

    tek: bytes
    tik: bytes


@dataclass(frozen=True)
class SessionBlob:
    """The LAUNCH_START session buffer (SEV_SESSION_BUF)."""

    nonce: bytes
    wrap_tk: bytes
    wrap_iv: bytes
    wrap_mac: bytes
    policy_mac: bytes

    def pack(self) -> bytes:
        return self.nonce + self.wrap_tk + self.wrap_iv + self.wrap_mac + self.policy_mac

    @classmethod
    def unpack(cls, blob: bytes) -> SessionBlob:
        if len(blob) != SESSION_BLOB_LEN:
            raise ValueError(f"a session blob is {SESSION_BLOB_LEN} bytes, got {len(blob)}")
        return cls(blob[0:16], blob[16:48], blob[48:64], blob[64:96], blob[96:128])


def _kek_kik(z: bytes, nonce: bytes) -> tuple[bytes, bytes]:
    master = kdf(z, LABEL_MASTER, nonce)
    return kdf(master, LABEL_KEK, b""), kdf(master, LABEL_KIK, b"")


def wrap_session(z: bytes, keys: TransportKeys, policy: int, nonce: bytes, iv: bytes) -> SessionBlob:
    """Build the session blob: wrap TEK|TIK under the KEK derived from the ECDH secret ``z``."""
    kek, kik = _kek_kik(z, nonce)
    wrap_tk = aes128_ctr(kek, iv, keys.tek + keys.tik)
    return SessionBlob(
        nonce=nonce,
        wrap_tk=wrap_tk,
        wrap_iv=iv,
        wrap_mac=hmac_sha256(kik, wrap_tk),
        policy_mac=hmac_sha256(keys.tik, struct.pack("<I", policy)),
    )


class SessionRejected(ValueError):
    """The session blob fails a MAC; ``field`` names which one."""

    def __init__(self, field: str) -> None:
        super().__init__(f"{field} does not verify")
        self.field = field


def unwrap_session(z: bytes, blob: SessionBlob, policy: int) -> TransportKeys:
    """Check WRAP_MAC, unwrap TEK|TIK, then check POLICY_MAC (the secure processor's side)."""
    kek, kik = _kek_kik(z, blob.nonce)
    if not hmac.compare_digest(hmac_sha256(kik, blob.wrap_tk), blob.wrap_mac):
        raise SessionRejected("WRAP_MAC")
    tk = aes128_ctr(kek, blob.wrap_iv, blob.wrap_tk)
    keys = TransportKeys(tek=tk[:16], tik=tk[16:])
    if not hmac.compare_digest(hmac_sha256(keys.tik, struct.pack("<I", policy)), blob.policy_mac):
        raise SessionRejected("POLICY_MAC")
    return keys


@dataclass(frozen=True)
class PlatformVersion:
    """The firmware API version and build a measurement is bound to."""

    api_major: int
    api_minor: int
    build: int

    def __str__(self) -> str:
        return f"{self.api_major}.{self.api_minor} build {self.build}"


def measure_mac(tik: bytes, version: PlatformVersion, policy: int, digest: bytes, mnonce: bytes) -> bytes:
    """MEASURE = HMAC-SHA256(TIK, 0x04 | API_MAJOR | API_MINOR | BUILD | LE32(POLICY) | DIGEST | MNONCE)."""
    msg = struct.pack("<BBBBI", MEASURE_CONTEXT, version.api_major, version.api_minor, version.build, policy)
    return hmac_sha256(tik, msg + digest + mnonce)


def secret_mac(tik: bytes, flags: int, iv: bytes, guest_len: int, ciphertext: bytes, measure: bytes) -> bytes:
    """The LAUNCH_SECRET header MAC, bound to the launch's MEASURE so a packet fits one launch only."""
    msg = struct.pack("<BI", SECRET_CONTEXT, flags) + iv + struct.pack("<II", guest_len, len(ciphertext))
    return hmac_sha256(tik, msg + ciphertext + measure)


@dataclass(frozen=True)
class SecretPacket:
    """A LAUNCH_SECRET packet: the 52-byte header (SEV_HDR_BUF) and the ciphertext."""

    flags: int
    iv: bytes
    mac: bytes
    ciphertext: bytes

    def header(self) -> bytes:
        return struct.pack("<I", self.flags) + self.iv + self.mac

    @classmethod
    def from_parts(cls, header: bytes, ciphertext: bytes) -> SecretPacket:
        if len(header) != SECRET_HEADER_LEN:
            raise ValueError(f"a secret header is {SECRET_HEADER_LEN} bytes, got {len(header)}")
        (flags,) = struct.unpack_from("<I", header)
        return cls(flags=flags, iv=header[4:20], mac=header[20:52], ciphertext=ciphertext)


def seal_secret(keys: TransportKeys, measure: bytes, plaintext: bytes, iv: bytes) -> SecretPacket:
    """Encrypt ``plaintext`` under the TEK and MAC it with the TIK, bound to ``measure`` (32 bytes)."""
    ciphertext = aes128_ctr(keys.tek, iv, plaintext)
    mac = secret_mac(keys.tik, 0, iv, len(plaintext), ciphertext, measure)
    return SecretPacket(flags=0, iv=iv, mac=mac, ciphertext=ciphertext)


def sev_launch_digest(blobs: list[bytes]) -> bytes:
    """The SHA-256 launch digest of the LAUNCH_UPDATE_DATA blobs, in the order they were measured."""
    h = hashlib.sha256()
    for blob in blobs:
        h.update(blob)
    return h.digest()
