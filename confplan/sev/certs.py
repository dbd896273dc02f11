"""SEV platform certificates (AMD SEV API, appendix C: the 0x824-byte ``SEV_CERT``) and the platform chain.

Layout (little-endian): version u32 = 1 @0, api_major u8 @4, api_minor u8 @5, reserved[2], pub_key_usage
u32 @8, pub_key_algo u32 @0xC, pubkey[1028] @0x10 (ECDSA/ECDH: curve u32 (1 P-256, 2 P-384), qx[72],
qy[72] little-endian, reserved; RSA: modulus_size u32, pub_exp[512], modulus[512]), then two signature
slots @0x414 and @0x61C, each usage u32, algo u32 and 512 bytes (ECDSA: r[72], s[72] little-endian, then
zeros; RSA-PSS: the signature little-endian, then zeros). A signature covers bytes [0, 0x414) exactly as
received: a parsed certificate keeps its bytes and nothing is re-encoded to be verified or fingerprinted.
A slot's algorithm must be one the SEV API defines and must fit the signer's key (see ``signing``).

The chain of a platform: ARK (self-signed) -> ASK -> CEK -> PEK, OCA (self-signed) -> PEK, PEK -> PDH.
On real hardware the ARK and ASK are AMD's RSA ``AMD_CERT``s (``amd_cert``); the emulated secure processor
issues them as P-384 SEV certificates, which is how an emulated chain is recognised (``PlatformChain``).
Which roots are trusted is ``anchors``' business, not this module's.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from confplan.sev.amd_cert import AmdCaChain, AmdCert
from confplan.sev.signing import (
    ECDSA_COMPONENT_LEN,
    SigAlgo,
    VerifyError,
    le_int,
    rsa_public_key,
    sig_algo,
    sign_ecdsa_le,
    verify_ecdsa_le,
    verify_rsa_pss,
)

CERT_LEN = 0x824
SIGNED_LEN = 0x414
PUBKEY_LEN = 1028
SIG_LEN = 512
SIG_SLOT_LEN = 8 + SIG_LEN
COMPONENT_LEN = ECDSA_COMPONENT_LEN
CERT_VERSION = 1
CURVES: dict[int, ec.EllipticCurve] = {1: ec.SECP256R1(), 2: ec.SECP384R1()}
CURVE_P384 = 2
Algo = SigAlgo  # the name this module used before signing.py existed

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class Usage(enum.IntEnum):
    """``pub_key_usage``: which key a certificate holds."""

    ARK = 0x0
    ASK = 0x13
    INVALID = 0x1000
    OCA = 0x1001
    PEK = 0x1002
    PDH = 0x1003
    CEK = 0x1004


class CertError(VerifyError):
    """A certificate or chain that does not parse or verify."""


def _name(usage: int) -> str:
    return Usage(usage).name if usage in Usage.__members__.values() else f"{usage:#x}"


def encode_pubkey(key: ec.EllipticCurvePublicKey) -> bytes:
    curve = next(cid for cid, c in CURVES.items() if c.name == key.curve.name)
    nums = key.public_numbers()
    body = struct.pack("<I", curve) + nums.x.to_bytes(72, "little") + nums.y.to_bytes(72, "little")
    return body.ljust(PUBKEY_LEN, b"\x00")


def decode_pubkey(raw: bytes, algo: int = SigAlgo.ECDSA_SHA256, what: str = "certificate") -> PublicKey:
    """The public key field for ``pub_key_algo`` ``algo``."""
    kind = sig_algo(algo, f"{what}: pub_key_algo").kind
    if kind == "rsa":
        (bits,) = struct.unpack_from("<I", raw)
        if bits not in (2048, 4096):
            raise CertError(f"{what}: RSA modulus_size = {bits}, expected 2048 or 4096", field="modulus_size")
        return rsa_public_key(raw[4 + 512 : 4 + 512 + bits // 8], raw[4 : 4 + bits // 8], what)
    if kind == "invalid":
        raise CertError(f"{what}: pub_key_algo = 0 (INVALID) holds no key", field="pub_key_algo")
    (curve,) = struct.unpack_from("<I", raw)
    if curve not in CURVES:
        raise CertError(f"{what}: curve = {curve}, expected 1 (P-256) or 2 (P-384)", field="curve")
    x, y = le_int(raw[4 : 4 + COMPONENT_LEN]), le_int(raw[4 + COMPONENT_LEN : 4 + 2 * COMPONENT_LEN])
    try:
        return ec.EllipticCurvePublicNumbers(x, y, CURVES[curve]).public_key()
    except ValueError as err:
        raise CertError(
            f"{what}: the public key is not a point on the curve: {err}", field="pubkey"
        ) from None


@dataclass(frozen=True)
class Signature:
    """One signature slot: the signer's usage, the algorithm and 512 bytes of signature."""

    usage: int
    algo: int
    body: bytes = bytes(SIG_LEN)

    def pack(self) -> bytes:
        return struct.pack("<II", self.usage, self.algo) + self.body

    @classmethod
    def unpack(cls, raw: bytes) -> Signature:
        usage, algo = struct.unpack_from("<II", raw)
        return cls(usage, algo, bytes(raw[8:SIG_SLOT_LEN]))

    @property
    def empty(self) -> bool:
        return self.algo == SigAlgo.INVALID


EMPTY_SIG = Signature(Usage.INVALID, SigAlgo.INVALID)


def _check_empty_slot(sig: Signature, field: str, what: str) -> None:
    """An unused slot is usage INVALID and all zeros; anything else in it is not AMD's format."""
    if sig.empty and (sig.usage != Usage.INVALID or any(sig.body)):
        raise CertError(
            f"{what}: {field} is empty (algo 0) but holds usage {sig.usage:#x} or signature bytes",
            field=field,
        )
    if not sig.empty and sig.usage not in (Usage.ARK, Usage.ASK, Usage.OCA, Usage.PEK, Usage.CEK):
        raise CertError(
            f"{what}: {field}_algo = {sig.algo:#x} but {field}_usage = {sig.usage:#x} names no signing key",
            field=f"{field}_usage",
        )


@dataclass(frozen=True)
class SevCert:
    """One ``SEV_CERT`` exactly as received (``raw``), with its fields decoded."""

    raw: bytes
    api_major: int
    api_minor: int
    usage: int
    algo: int
    pubkey: PublicKey
    sig1: Signature
    sig2: Signature

    @classmethod
    def unpack(cls, raw: bytes, what: str = "") -> SevCert:
        if len(raw) != CERT_LEN:
            raise CertError(f"an SEV certificate is {CERT_LEN:#x} bytes, got {len(raw):#x}", field="length")
        version, major, minor, usage, algo = struct.unpack_from("<IBBxxII", raw)
        what = what or f"{_name(usage)} certificate"
        if version != CERT_VERSION:
            raise CertError(f"{what}: version = {version}, expected {CERT_VERSION}", field="version")
        cert = cls(
            raw=bytes(raw),
            api_major=major,
            api_minor=minor,
            usage=usage,
            algo=algo,
            pubkey=decode_pubkey(raw[0x10:SIGNED_LEN], algo, what),
            sig1=Signature.unpack(raw[SIGNED_LEN : SIGNED_LEN + SIG_SLOT_LEN]),
            sig2=Signature.unpack(raw[SIGNED_LEN + SIG_SLOT_LEN :]),
        )
        _check_empty_slot(cert.sig1, "sig1", what)
        _check_empty_slot(cert.sig2, "sig2", what)
        return cert

    def pack(self) -> bytes:
        """The certificate bytes as received (or as issued)."""
        return self.raw

    def body(self) -> bytes:
        """The signed bytes [0, 0x414)."""
        return self.raw[:SIGNED_LEN]

    @property
    def name(self) -> str:
        return _name(self.usage)

    @property
    def sig_algo(self) -> SigAlgo:
        """The algorithm code signatures by this certificate's key carry (its pub_key_algo)."""
        return sig_algo(self.algo, f"{self.name}: pub_key_algo")

    def fingerprint(self) -> str:
        """SHA-256 of the certificate bytes as received (how an owner pins an ARK)."""
        return hashlib.sha256(self.raw).hexdigest()

    def verify_signed_by(
        self, signer_usage: int, signer: PublicKey, signer_algo: SigAlgo | None = None, what: str = ""
    ) -> None:
        """Check that a slot holds a valid signature by ``signer`` (with that usage) over the received bytes.

        The slot's algorithm must be defined, be a signature (not ECDH), fit the signer's key type and,
        when given, name the same algorithm as ``signer_algo`` (the signer's pub_key_algo). Raises
        ``CertError`` naming the slot field and why.
        """
        what = what or self.name
        slots = [(f"sig{i}", s) for i, s in ((1, self.sig1), (2, self.sig2)) if s.usage == signer_usage]
        slots = [(f, s) for f, s in slots if not s.empty]
        if not slots:
            raise CertError(
                f"{what}: no signature slot has the signer's usage {_name(signer_usage)} ({signer_usage:#x})",
                field="sig_usage",
            )
        problems = []
        for field, slot in slots:
            problem = self._slot_problem(field, slot, signer, signer_algo)
            if problem is None:
                return
            problems.append(problem)
        raise CertError(f"{what}: {'; '.join(problems)}", field=slots[0][0] + "_algo")

    def _slot_problem(
        self, field: str, slot: Signature, signer: PublicKey, signer_algo: SigAlgo | None
    ) -> str | None:
        algo = sig_algo(slot.algo, f"{self.name}: {field}_algo")
        want_kind = "rsa" if isinstance(signer, rsa.RSAPublicKey) else "ecdsa"
        if algo.kind != want_kind:
            return f"{field}_algo = {slot.algo:#x} ({algo.name}) does not fit the signer's {want_kind} key"
        if signer_algo is not None and algo.hash.name != signer_algo.hash.name:
            return f"{field}_algo = {slot.algo:#x} ({algo.name}), the signer signs with {signer_algo.name}"
        data = self.body()
        if isinstance(signer, rsa.RSAPublicKey):
            used = signer.key_size // 8
            if any(slot.body[used:]) or not verify_rsa_pss(signer, slot.body[:used], data, algo.hash):
                return f"{field}: the {algo.name} (RSA-PSS) signature does not verify"
            return None
        r, s = slot.body[:COMPONENT_LEN], slot.body[COMPONENT_LEN : 2 * COMPONENT_LEN]
        if any(slot.body[2 * COMPONENT_LEN :]) or not verify_ecdsa_le(signer, r, s, data, algo.hash):
            return f"{field}: the {algo.name} signature does not verify"
        return None

    def signed_by(self, signer_usage: int, signer: PublicKey, signer_algo: SigAlgo | None = None) -> bool:
        """True if ``verify_signed_by`` passes."""
        try:
            self.verify_signed_by(signer_usage, signer, signer_algo)
        except VerifyError:
            return False
        return True


def issue(
    pubkey: ec.EllipticCurvePublicKey,
    usage: Usage,
    signers: list[tuple[ec.EllipticCurvePrivateKey, Usage]],
    api: tuple[int, int] = (0, 0),
) -> SevCert:
    """Make a P-384 certificate for ``pubkey`` signed (ECDSA-SHA256) by up to two keys (self-signed: pass
    its own key). Used by the emulated secure processor and for the owner's unsigned GODH."""
    algo = SigAlgo.ECDH_SHA256 if usage == Usage.PDH else SigAlgo.ECDSA_SHA256
    body = struct.pack("<IBBxxII", CERT_VERSION, api[0], api[1], usage, algo) + encode_pubkey(pubkey)
    slots = [sign_body(body, key, key_usage) for key, key_usage in signers] + [EMPTY_SIG, EMPTY_SIG]
    return SevCert.unpack(body + slots[0].pack() + slots[1].pack())


def sign_body(body: bytes, signer: ec.EllipticCurvePrivateKey, signer_usage: int) -> Signature:
    from cryptography.hazmat.primitives import hashes

    r, s = sign_ecdsa_le(signer, body, hashes.SHA256())
    return Signature(signer_usage, SigAlgo.ECDSA_SHA256, (r + s).ljust(SIG_LEN, b"\x00"))


CHAIN_ORDER = (Usage.PDH, Usage.PEK, Usage.OCA, Usage.CEK, Usage.ASK, Usage.ARK)
CaCert = SevCert | AmdCert


@dataclass(frozen=True)
class PlatformChain:
    """The certificates a platform hands the owner: PDH, PEK, OCA, CEK, then ASK and ARK.

    The ASK and ARK are AMD ``AMD_CERT``s on real hardware and P-384 ``SEV_CERT``s from the emulated
    secure processor (``emulated``). The chain file is the six back to back, in ``CHAIN_ORDER`` (the
    order of ``sevctl export --full``).
    """

    pdh: SevCert
    pek: SevCert
    oca: SevCert
    cek: SevCert
    ask: CaCert
    ark: CaCert

    @property
    def emulated(self) -> bool:
        """The ARK is not an AMD certificate: no AMD part can have made this chain."""
        return isinstance(self.ark, SevCert)

    def pack(self) -> bytes:
        certs = (self.pdh, self.pek, self.oca, self.cek, self.ask, self.ark)
        return b"".join(c.raw for c in certs)

    @classmethod
    def unpack(cls, raw: bytes) -> PlatformChain:
        shape = (
            f"a platform chain is {len(CHAIN_ORDER)} certificates (PDH, PEK, OCA, CEK as {CERT_LEN:#x}-byte "
            "SEV certificates, then ASK and ARK as AMD certificates, or SEV ones from an emulated platform), "
            f"got {len(raw)} bytes"
        )
        if len(raw) < 4 * CERT_LEN + 2 * 0x40:
            raise CertError(shape, field="length")
        sev = [SevCert.unpack(raw[i * CERT_LEN : (i + 1) * CERT_LEN]) for i in range(4)]
        rest = raw[4 * CERT_LEN :]
        ca: tuple[CaCert, CaCert]
        if len(rest) == 2 * CERT_LEN:
            ca = (SevCert.unpack(rest[:CERT_LEN]), SevCert.unpack(rest[CERT_LEN:]))
        else:
            try:
                amd = AmdCaChain.parse(rest)
            except VerifyError as err:
                raise CertError(f"{shape}: {err}", field=err.field, hint=err.hint) from None
            ca = (amd.ask, amd.ark)
        for cert, want in zip((*sev, *ca), CHAIN_ORDER, strict=True):
            usage = int(cert.usage)
            if usage != want:
                raise CertError(
                    f"certificate {want.name} has usage {usage:#x}, expected {int(want):#x}", field="usage"
                )
        return cls(*sev, *ca)

    def verify(self) -> ec.EllipticCurvePublicKey:
        """Check every link over the received bytes; return the PDH public key. ``CertError`` names the
        broken link and why. Whether the ARK is trusted is decided elsewhere (``anchors``)."""
        self._verify_ca()
        ask_key, ask_algo = (
            self.ask.key if isinstance(self.ask, AmdCert) else self.ask.pubkey,
            self.ask.sig_algo,
        )
        links = (
            (self.cek, Usage.ASK, ask_key, ask_algo, "CEK is not signed by the ASK"),
            (self.oca, Usage.OCA, self.oca.pubkey, self.oca.sig_algo, "OCA is not self-signed"),
            (self.pek, Usage.CEK, self.cek.pubkey, self.cek.sig_algo, "PEK is not signed by the CEK"),
            (self.pek, Usage.OCA, self.oca.pubkey, self.oca.sig_algo, "PEK is not signed by the OCA"),
            (self.pdh, Usage.PEK, self.pek.pubkey, self.pek.sig_algo, "PDH is not signed by the PEK"),
        )
        for cert, signer_usage, key, algo, problem in links:
            _link(problem, lambda c=cert, u=signer_usage, k=key, a=algo: c.verify_signed_by(u, k, a))
        if not isinstance(self.pdh.pubkey, ec.EllipticCurvePublicKey):
            raise CertError(
                "the PDH holds an RSA key; ECDH needs an elliptic-curve key", field="pub_key_algo"
            )
        return self.pdh.pubkey

    def _verify_ca(self) -> None:
        if isinstance(self.ark, AmdCert) and isinstance(self.ask, AmdCert):
            ark, ask = self.ark, self.ask
            _link("ARK is not self-signed", lambda: ark.verify_signed_by(ark, "ARK"))
            _link("ASK is not signed by the ARK", lambda: ask.verify_signed_by(ark, "ASK"))
        elif isinstance(self.ark, SevCert) and isinstance(self.ask, SevCert):
            sark, sask = self.ark, self.ask
            _link(
                "ARK is not self-signed", lambda: sark.verify_signed_by(Usage.ARK, sark.pubkey, sark.sig_algo)
            )
            _link(
                "ASK is not signed by the ARK",
                lambda: sask.verify_signed_by(Usage.ARK, sark.pubkey, sark.sig_algo),
            )
        else:
            raise CertError("the ASK and the ARK are in different formats (AMD and SEV)", field="ark")


def _link(problem: str, check: object) -> None:
    assert callable(check)
    try:
        check()
    except VerifyError as err:
        raise CertError(f"{problem}: {err.message}", field=err.field) from None


def ecdh_secret(private: ec.EllipticCurvePrivateKey, peer: PublicKey) -> bytes:
    """Z: the x-coordinate of the shared point, 48 bytes big-endian."""
    if not isinstance(peer, ec.EllipticCurvePublicKey):
        raise CertError("the PDH is not an elliptic-curve key", field="pub_key_algo")
    return private.exchange(ec.ECDH(), peer)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())
