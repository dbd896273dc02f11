"""The SEV-SNP certificate chain: ARK -> ASK -> VCEK (or ARK -> ASVK -> VLEK), X.509, RSASSA-PSS.

Each link is checked like ``snpguest verify certs``: the issuer's name, and the signature over the
to-be-signed bytes as received, with exactly the algorithm AMD uses (RSASSA-PSS, SHA-384, MGF1-SHA-384,
salt 48). The root must pass ``anchors.check_root``: one of AMD's built-in ARKs, or an explicitly trusted
emulated one (whose certificates are ECDSA-SHA384: no AMD key ever signs so, and no AMD anchor is EC).
Omitted ARK and ASK are taken from the built-in anchors of the VEK's issuer (CN=SEV-Milan, ...).

The VEK's extensions (OIDs under 1.3.6.1.4.1.3704.1, AMD's "Versioned Chip Endorsement Key" spec) carry the
TCB it was issued for and, for a VCEK, the chip's hardware id; ``VekInfo`` decodes them.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from confplan.sev import anchors
from confplan.sev.anchors import RootVerdict
from confplan.sev.signing import VerifyError

AMD_OID = "1.3.6.1.4.1.3704.1"
TCB_OIDS = {
    "boot_loader": f"{AMD_OID}.3.1",
    "tee": f"{AMD_OID}.3.2",
    "snp": f"{AMD_OID}.3.3",
    "microcode": f"{AMD_OID}.3.8",
    "fmc": f"{AMD_OID}.3.9",
}
HWID_OID = f"{AMD_OID}.4"
PRODUCT_NAME_OID = f"{AMD_OID}.2"
CSP_ID_OID = f"{AMD_OID}.5"
PSS_SALT = 48


def _der_value(raw: bytes, oid: str) -> int | bytes:
    """An extension value: DER INTEGER (02 len ...), OCTET STRING (04 len ...), IA5String, or raw bytes
    (early VCEKs store the hardware id as 64 raw bytes)."""
    if len(raw) >= 2 and raw[0] in (0x02, 0x04, 0x16) and raw[1] == len(raw) - 2:
        body = raw[2:]
        if raw[0] == 0x02:
            if not body or len(body) > 9:
                raise VerifyError(f"VEK extension {oid}: bad INTEGER length {len(body)}", field=oid)
            return int.from_bytes(body, "big", signed=True)
        return body
    return raw


@dataclass(frozen=True)
class VekInfo:
    """What a VCEK/VLEK certificate says about the chip and TCB it was issued for."""

    kind: str  # "VCEK" or "VLEK"
    product: str  # from the issuer: milan, genoa, turin
    product_name: str  # the productName extension (e.g. Milan-B0)
    tcb: dict[str, int]
    hwid: bytes | None  # VCEK only

    @classmethod
    def of(cls, vek: x509.Certificate) -> VekInfo:
        ext = {e.oid.dotted_string: e.value for e in vek.extensions}

        def raw(oid: str) -> bytes | None:
            value = ext.get(oid)
            return value.value if isinstance(value, x509.UnrecognizedExtension) else None

        tcb = {}
        for name, oid in TCB_OIDS.items():
            if (body := raw(oid)) is not None:
                value = _der_value(body, oid)
                if not isinstance(value, int) or not 0 <= value <= 0xFF:
                    raise VerifyError(f"VEK extension {name} ({oid}) is not an 8-bit INTEGER", field=name)
                tcb[name] = value
        hw = raw(HWID_OID)
        hwid = _der_value(hw, HWID_OID) if hw is not None else None
        if isinstance(hwid, int):
            raise VerifyError(f"VEK extension hwID ({HWID_OID}) is an INTEGER, expected bytes", field="hwID")
        name_raw = raw(PRODUCT_NAME_OID)
        product_name = _der_value(name_raw, PRODUCT_NAME_OID) if name_raw is not None else b""
        cn = _cn(vek.subject)
        return cls(
            kind="VLEK" if "VLEK" in cn.upper() else "VCEK",
            product=_product_of(vek.issuer),
            product_name=product_name.decode("ascii", "replace") if isinstance(product_name, bytes) else "",
            tcb=tcb,
            hwid=hwid,
        )


def _cn(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def _product_of(issuer: x509.Name) -> str:
    """'SEV-Milan' / 'SEV-VLEK-Genoa' -> milan / genoa."""
    return _cn(issuer).rsplit("-", 1)[-1].lower()


def verify_link(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    """``cert`` was issued by ``issuer``: names match and the signature verifies over the received TBS."""
    if cert.issuer != issuer.subject:
        raise VerifyError(
            f"{what}: issuer '{cert.issuer.rfc4514_string()}' is not the signer "
            f"'{issuer.subject.rfc4514_string()}'",
            field="issuer",
        )
    key = issuer.public_key()
    oid = cert.signature_algorithm_oid
    try:
        if isinstance(key, rsa.RSAPublicKey):
            if oid != SignatureAlgorithmOID.RSASSA_PSS or not isinstance(
                cert.signature_hash_algorithm, hashes.SHA384
            ):
                raise VerifyError(
                    f"{what}: signatureAlgorithm {oid.dotted_string}, AMD signs with RSASSA-PSS SHA-384",
                    field="signatureAlgorithm",
                )
            pss = padding.PSS(padding.MGF1(hashes.SHA384()), PSS_SALT)
            key.verify(cert.signature, cert.tbs_certificate_bytes, pss, hashes.SHA384())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if oid != SignatureAlgorithmOID.ECDSA_WITH_SHA384:
                raise VerifyError(
                    f"{what}: signatureAlgorithm {oid.dotted_string}, an EC issuer must use ECDSA-SHA384",
                    field="signatureAlgorithm",
                )
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA384()))
        else:
            raise VerifyError(f"{what}: the issuer's key is neither RSA nor EC", field="subjectPublicKeyInfo")
    except InvalidSignature:
        raise VerifyError(
            f"{what}: the signature does not verify with {_cn(issuer.subject)}'s key", field="signature"
        ) from None


def _check_validity(cert: x509.Certificate, what: str, at: datetime.datetime) -> None:
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise VerifyError(
            f"{what}: valid {cert.not_valid_before_utc:%Y-%m-%d} .. {cert.not_valid_after_utc:%Y-%m-%d}, "
            f"not at {at:%Y-%m-%d}",
            field="validity",
        )


@dataclass(frozen=True)
class SnpChainVerdict:
    """A verified chain: its root, the VEK's key and what the VEK certifies."""

    root: RootVerdict
    vek_key: ec.EllipticCurvePublicKey
    vek: VekInfo


def verify_snp_chain(
    vek_raw: bytes,
    ark_raw: bytes | None = None,
    ask_raw: bytes | None = None,
    *,
    pins: list[str] | None = None,
    trust_emulated: bool = False,
    at: datetime.datetime | None = None,
) -> SnpChainVerdict:
    """Verify ARK -> ASK (ASVK) -> VCEK (VLEK), like ``snpguest verify certs``, and the root's trust.

    ``*_raw`` are PEM or DER. Without ``ark_raw``/``ask_raw`` AMD's built-in ones for the VEK's product
    line are used. ``at`` (default now) must lie in every certificate's validity."""
    at = at or datetime.datetime.now(datetime.UTC)
    vek = anchors.load_x509(vek_raw, "VEK")
    product = _product_of(vek.issuer)
    if ark_raw is None or ask_raw is None:
        if product not in anchors.SNP_PRODUCTS:
            raise VerifyError(
                f"VEK issuer '{vek.issuer.rfc4514_string()}' names no product line with built-in anchors "
                f"({', '.join(anchors.SNP_PRODUCTS)})",
                field="issuer",
                hint="pass the ARK and ASK (cert_chain from AMD KDS) explicitly",
            )
        builtin_ark, builtin_ask = anchors.snp_ca(product)
    ark = anchors.load_x509(ark_raw, "ARK") if ark_raw is not None else builtin_ark
    ask = anchors.load_x509(ask_raw, "ASK") if ask_raw is not None else builtin_ask
    signer = "ASVK" if "VLEK" in _cn(vek.subject).upper() else "ASK"
    verify_link(ark, ark, "ARK (self-signed)")
    verify_link(ask, ark, f"{signer} (signed by the ARK)")
    verify_link(vek, ask, f"{_cn(vek.subject) or 'VEK'} (signed by the {signer})")
    for cert, what in ((ark, "ARK"), (ask, signer), (vek, "VEK")):
        _check_validity(cert, what, at)
    fingerprint = anchors.der_fingerprint(ark)
    root = anchors.check_root(
        fingerprint, anchors.snp_ark_product(fingerprint), pins=pins or [], trust_emulated=trust_emulated
    )
    key = vek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise VerifyError("the VEK's key is not ECDSA P-384", field="subjectPublicKeyInfo")
    return SnpChainVerdict(root, key, VekInfo.of(vek))


def split_pem_chain(raw: bytes) -> list[bytes]:
    """The PEM certificates of a bundle (AMD KDS ``cert_chain``: ASK then ARK), in file order."""
    marker = b"-----END CERTIFICATE-----"
    parts = [p + marker for p in raw.split(marker) if b"-----BEGIN CERTIFICATE-----" in p]
    return [p[p.index(b"-----BEGIN") :] for p in parts]
