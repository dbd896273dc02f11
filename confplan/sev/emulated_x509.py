"""The EMULATED secure processor's SNP certificates: ARK -> ASK -> VCEK as X.509, like AMD KDS serves them.

Same names, extensions (TCB OIDs, hwID) and shape as AMD's, but ECDSA P-384/SHA-384 instead of RSA-PSS
and subjects that say what they are, so no verifier can take them for AMD's: they pass only where the
owner explicitly trusts the emulated platform (``anchors.check_root``).
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from confplan.sev.snp_chain import HWID_OID, PRODUCT_NAME_OID, TCB_OIDS

ORG = "confplan EMULATED secure processor - NOT AMD"
PRODUCT = "Emulated"
_EPOCH = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
_END = datetime.datetime(2099, 12, 31, tzinfo=datetime.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG)]
    )


def _der_int(value: int) -> bytes:
    return bytes([0x02, 0x01, value])


def _cert(
    subject: str,
    issuer: str,
    key: ec.EllipticCurvePublicKey,
    signer: ec.EllipticCurvePrivateKey,
    serial: int,
    extensions: list[x509.UnrecognizedExtension] | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key)
        .serial_number(serial)
        .not_valid_before(_EPOCH)
        .not_valid_after(_END)
    )
    for ext in extensions or []:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(signer, hashes.SHA384())


def issue_snp_chain(
    ark: ec.EllipticCurvePrivateKey, ask: ec.EllipticCurvePrivateKey, vcek: ec.EllipticCurvePrivateKey,
    chip_id: bytes, tcb: dict[str, int] | None = None,
) -> tuple[bytes, bytes, bytes]:  # fmt: skip
    """(ARK, ASK, VCEK) as PEM; the VCEK certifies ``tcb`` (all zero by default) and ``chip_id``."""
    tcb = tcb or {"boot_loader": 0, "tee": 0, "snp": 0, "microcode": 0}
    exts = [
        x509.UnrecognizedExtension(x509.ObjectIdentifier(TCB_OIDS[n]), _der_int(v)) for n, v in tcb.items()
    ]
    exts.append(x509.UnrecognizedExtension(x509.ObjectIdentifier(HWID_OID), bytes([0x04, 64]) + chip_id))
    exts.append(
        x509.UnrecognizedExtension(
            x509.ObjectIdentifier(PRODUCT_NAME_OID), bytes([0x16, len(PRODUCT)]) + PRODUCT.encode()
        )
    )
    certs = (
        _cert(f"ARK-{PRODUCT}", f"ARK-{PRODUCT}", ark.public_key(), ark, 1),
        _cert(f"SEV-{PRODUCT}", f"ARK-{PRODUCT}", ask.public_key(), ark, 2),
        _cert("SEV-VCEK", f"SEV-{PRODUCT}", vcek.public_key(), ask, 3, exts),
    )
    pem = serialization.Encoding.PEM
    return certs[0].public_bytes(pem), certs[1].public_bytes(pem), certs[2].public_bytes(pem)
