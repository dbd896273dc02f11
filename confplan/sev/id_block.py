"""SNP ID blocks and ID authentication blocks (SNP ABI, SNP_LAUNCH_FINISH; sev-snp-measure's
``snp-create-id-block``, virtee/sev ``measurement/idblock``).

ID block (0x60 bytes): launch digest[48], family_id[16], image_id[16], version u32 = 1, guest_svn u32,
policy u64. ID auth block (0x1000): id_key_algo u32 @0, auth_key_algo u32 @4 (1 = ECDSA P-384 SHA-384),
id_block_sig[512] @0x40, id_key[1028] @0x240, id_key_sig[512] @0x680, author_key[1028] @0x880, reserved to
0x1000. A signature is r[72], s[72] little-endian then zeros; a key is curve u32 (2 = P-384), qx[72], qy[72]
little-endian then zeros. The ID key signs the ID block; the author key signs the ID key's 1028 bytes. A
report's id_key_digest and author_key_digest are SHA-384 of those 1028-byte keys.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from confplan.sev.signing import VerifyError, le_int, sign_ecdsa_le, verify_ecdsa_le

ID_BLOCK_LEN = 0x60
ID_AUTH_LEN = 0x1000
KEY_LEN = 0x404
SIG_LEN = 0x200
ALGO_ECDSA_P384_SHA384 = 1
CURVE_P384 = 2
DEFAULT_POLICY = 0x30000  # SMT and the reserved-one bit, sev-snp-measure's default
_ID_AUTH_FIELDS = {"id_block_sig": 0x40, "id_key": 0x240, "id_key_sig": 0x680, "author_key": 0x880}


@dataclass(frozen=True)
class IdBlock:
    launch_digest: bytes
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    version: int = 1
    guest_svn: int = 0
    policy: int = DEFAULT_POLICY

    def pack(self) -> bytes:
        if len(self.launch_digest) != 48 or len(self.family_id) != 16 or len(self.image_id) != 16:
            raise ValueError("an ID block holds a 48-byte digest and 16-byte family and image ids")
        tail = struct.pack("<IIQ", self.version, self.guest_svn, self.policy)
        return self.launch_digest + self.family_id + self.image_id + tail

    @classmethod
    def parse(cls, raw: bytes) -> IdBlock:
        if len(raw) != ID_BLOCK_LEN:
            raise VerifyError(f"an ID block is {ID_BLOCK_LEN:#x} bytes, got {len(raw):#x}", field="length")
        version, svn, policy = struct.unpack_from("<IIQ", raw, 0x50)
        return cls(raw[:48], raw[48:64], raw[64:80], version, svn, policy)


def encode_key(key: ec.EllipticCurvePublicKey) -> bytes:
    if key.curve.name != "secp384r1":
        raise ValueError("SNP ID and author keys are P-384")
    nums = key.public_numbers()
    body = struct.pack("<I", CURVE_P384) + nums.x.to_bytes(72, "little") + nums.y.to_bytes(72, "little")
    return body.ljust(KEY_LEN, b"\x00")


def decode_key(raw: bytes, field: str) -> ec.EllipticCurvePublicKey:
    (curve,) = struct.unpack_from("<I", raw)
    if curve != CURVE_P384:
        raise VerifyError(f"ID auth {field}: curve = {curve}, expected 2 (P-384)", field=field)
    if any(raw[4 + 144 :]):
        raise VerifyError(f"ID auth {field}: reserved bytes after qx, qy must be zero", field=field)
    try:
        return ec.EllipticCurvePublicNumbers(
            le_int(raw[4:76]), le_int(raw[76:148]), ec.SECP384R1()
        ).public_key()
    except ValueError:
        raise VerifyError(f"ID auth {field}: not a point on P-384", field=field) from None


def key_digest(key: ec.EllipticCurvePublicKey) -> bytes:
    """SHA-384 of the 1028-byte key: what a report's id_key_digest / author_key_digest hold."""
    return hashlib.sha384(encode_key(key)).digest()


def _sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = sign_ecdsa_le(key, data, hashes.SHA384())
    return (r + s).ljust(SIG_LEN, b"\x00")


def _verify(key: ec.EllipticCurvePublicKey, sig: bytes, data: bytes, field: str) -> None:
    if any(sig[144:]) or not verify_ecdsa_le(key, sig[:72], sig[72:144], data, hashes.SHA384()):
        raise VerifyError(f"ID auth {field}: the ECDSA P-384/SHA-384 signature does not verify", field=field)


def make_id_auth(
    id_block: bytes, id_key: ec.EllipticCurvePrivateKey, author_key: ec.EllipticCurvePrivateKey | None = None
) -> bytes:
    """The ID auth block for ``id_block`` (packed), signed by ``id_key`` and, if given, certified by
    ``author_key``."""
    raw = bytearray(ID_AUTH_LEN)
    id_pub = encode_key(id_key.public_key())
    struct.pack_into("<II", raw, 0, ALGO_ECDSA_P384_SHA384, ALGO_ECDSA_P384_SHA384 if author_key else 0)
    raw[0x40 : 0x40 + SIG_LEN] = _sign(id_key, id_block)
    raw[0x240 : 0x240 + KEY_LEN] = id_pub
    if author_key is not None:
        raw[0x680 : 0x680 + SIG_LEN] = _sign(author_key, id_pub)
        raw[0x880 : 0x880 + KEY_LEN] = encode_key(author_key.public_key())
    return bytes(raw)


@dataclass(frozen=True)
class IdAuthVerdict:
    id_block: IdBlock
    id_key_digest: bytes
    author_key_digest: bytes | None


def verify_id_auth(id_block: bytes, id_auth: bytes) -> IdAuthVerdict:
    """Check an ID block against its auth block as SNP_LAUNCH_FINISH does; every byte counts."""
    block = IdBlock.parse(id_block)
    if len(id_auth) != ID_AUTH_LEN:
        raise VerifyError(
            f"an ID auth block is {ID_AUTH_LEN:#x} bytes, got {len(id_auth):#x}", field="length"
        )
    id_algo, auth_algo = struct.unpack_from("<II", id_auth)
    if id_algo != ALGO_ECDSA_P384_SHA384:
        raise VerifyError(
            f"ID auth id_key_algo = {id_algo:#x}, expected 1 (ECDSA P-384 SHA-384)", field="id_key_algo"
        )
    if auth_algo not in (0, ALGO_ECDSA_P384_SHA384):
        raise VerifyError(f"ID auth auth_key_algo = {auth_algo:#x}, expected 0 or 1", field="auth_key_algo")
    reserved = id_auth[8:0x40] + id_auth[0x644:0x680] + id_auth[0xC84:]
    if any(reserved):
        raise VerifyError("ID auth: reserved bytes must be zero", field="reserved")
    if block.version != 1:
        raise VerifyError(f"ID block version = {block.version}, expected 1", field="version")
    fields = {name: id_auth[off : off + (KEY_LEN if "key" in name and "sig" not in name else SIG_LEN)]
              for name, off in _ID_AUTH_FIELDS.items()}  # fmt: skip
    id_pub = decode_key(fields["id_key"], "id_key")
    _verify(id_pub, fields["id_block_sig"], id_block, "id_block_sig")
    author_digest = None
    if auth_algo:
        author = decode_key(fields["author_key"], "author_key")
        _verify(author, fields["id_key_sig"], fields["id_key"], "id_key_sig")
        author_digest = hashlib.sha384(fields["author_key"]).digest()
    elif any(fields["id_key_sig"]) or any(fields["author_key"]):
        raise VerifyError(
            "ID auth: auth_key_algo is 0 but an author key or signature is present", field="auth_key_algo"
        )
    return IdAuthVerdict(block, hashlib.sha384(fields["id_key"]).digest(), author_digest)
