"""A host's identity on the control channel: a private key and a self-signed certificate (docs/channel.md).

Each host holds one identity per role it plays: "agent" (serves a VMM, `confplan agent`) and
"orchestrator" (`confplan apply`). Peers know each other by the certificate's fingerprint, SHA-256 of its
DER, as ssh knows hosts by their key: there is no CA. The identity is made on first use under
``<home>/identity/<role>/`` (key.pem 0600, cert.pem, folders 0700).

The certificate is a plain end-entity one (CA:FALSE, digitalSignature, serverAuth+clientAuth) that
OpenSSL accepts as its own trust anchor because it is self-signed (tests/test_transport_tls.py checks it
also under X509_STRICT). ECDSA P-256: TLS 1.3 signs with it both ways in every OpenSSL and GnuTLS.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import fcntl
import hashlib
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from confplan.errors import ConfplanError
from confplan.transport.files import check_private, private_dir, read_text, write_private

FINGERPRINT_PREFIX = "sha256:"
SHORT_HEX = 12  # hex digits in the short form: enough to tell a handful of hosts apart, not to pin
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
# RFC 5280 4.1.2.5: the notAfter of a certificate that has no well-defined expiration date. A pinned
# identity is replaced by enrolling another, never by expiry (ssh keys do not expire either).
NO_EXPIRY = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)
CLOCK_SKEW = datetime.timedelta(hours=1)  # the peer's clock may be behind ours


class Role(enum.StrEnum):
    """The part a host plays on the control channel."""

    AGENT = "agent"
    ORCHESTRATOR = "orchestrator"

    @property
    def plural(self) -> str:
        return f"{self.value}s"


def default_home() -> Path:
    """Where confplan keeps identities and the trust store: $CONFPLAN_HOME, else $XDG_STATE_HOME/confplan,
    else ~/.local/state/confplan (the XDG base directory spec ignores a relative $XDG_STATE_HOME)."""
    if home := os.environ.get("CONFPLAN_HOME"):
        return Path(home)
    state = os.environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(state):
        return Path(state) / "confplan"
    return Path.home() / ".local" / "state" / "confplan"


def fingerprint(der: bytes) -> str:
    """``sha256:`` and the hex SHA-256 of a certificate's DER: the name peers pin."""
    return FINGERPRINT_PREFIX + hashlib.sha256(der).hexdigest()


def short_fingerprint(value: str) -> str:
    """The first hex digits of a fingerprint, for lists and log lines (never for pinning)."""
    return value[: len(FINGERPRINT_PREFIX) + SHORT_HEX]


def parse_fingerprint(text: str) -> str:
    """A fingerprint as written by a user or a plan, normalised; ValueError says what is wrong."""
    value = text.strip().lower()
    if not value.startswith(FINGERPRINT_PREFIX):
        raise ValueError(f"{text!r} is not a fingerprint: it must start with {FINGERPRINT_PREFIX!r}")
    if not _FINGERPRINT.fullmatch(value):
        raise ValueError(f"{text!r} is not a fingerprint: expected sha256: and 64 hex digits")
    return value


def cert_fingerprint(cert: x509.Certificate) -> str:
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))


def common_name(role: Role, host: str | None = None) -> str:
    """The CN of a confplan identity: ``confplan-agent@host``."""
    return f"confplan-{role.value}@{host or socket.gethostname()}"


def role_in_subject(cert: x509.Certificate) -> Role | None:
    """The role a confplan identity names in its CN; None for any other certificate."""
    for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attribute.value if isinstance(attribute.value, str) else ""
        for role in Role:
            if value.startswith(f"confplan-{role.value}@"):
                return role
    return None


@dataclass(frozen=True)
class Identity:
    """One role's key and certificate on this host. The key stays in its file: ssl loads it from there."""

    role: Role
    folder: Path
    cert: x509.Certificate

    @property
    def key_path(self) -> Path:
        return self.folder / "key.pem"

    @property
    def cert_path(self) -> Path:
        return self.folder / "cert.pem"

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode("ascii")

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.der)

    @property
    def short(self) -> str:
        return short_fingerprint(self.fingerprint)

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()

    @staticmethod
    def folder_for(home: Path, role: Role | str) -> Path:
        return home / "identity" / Role(role).value

    @classmethod
    def load_or_create(cls, home: Path, role: Role | str) -> Identity:
        """The ``role`` identity under ``home`` (see ``default_home``), made on first use."""
        role = Role(role)
        folder = private_dir(cls.folder_for(home, role), use=f"the {role} identity")
        with _locked(folder / ".lock"):
            key_path, cert_path = folder / "key.pem", folder / "cert.pem"
            if not key_path.exists() and not cert_path.exists():
                _create(folder, role)
            return cls._load(folder, role)

    @classmethod
    def _load(cls, folder: Path, role: Role) -> Identity:
        key_path, cert_path = folder / "key.pem", folder / "cert.pem"
        for path in (key_path, cert_path):
            if not path.exists():
                raise ConfplanError(
                    f"the {role} identity in {folder} is incomplete: {path.name} is missing",
                    hint=f"restore it from a backup, or move {folder} away so a new identity is made "
                    "(peers that trusted the old one must then enrol the new one)",
                )
        check_private(key_path, what=f"the {role} private key")
        key = _load_key(key_path, role)
        cert = _load_cert(cert_path, role)
        if cert.public_key() != key.public_key():
            raise _corrupt(cert_path, role, "the certificate is not for the key in key.pem")
        if error := self_signed_problem(cert):
            raise _corrupt(cert_path, role, error)
        return cls(role, folder, cert)


def self_signed_problem(cert: x509.Certificate) -> str | None:
    """Why ``cert`` cannot be a trust anchor of its own (OpenSSL needs issuer == subject, a valid
    self-signature), or None."""
    if cert.issuer != cert.subject:
        return "it is not self-signed (issuer differs from subject)"
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature) as err:
        return f"its self-signature does not verify ({err or type(err).__name__})"
    return None


def _create(folder: Path, role: Role) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _self_signed(key, common_name(role))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    use = f"the {role} identity"
    # The key first: a crash in between leaves a key without a certificate, which loading reports.
    write_private(folder / "key.pem", key_pem, use=use)
    write_private(folder / "cert.pem", cert.public_bytes(serialization.Encoding.PEM), use=use)


def _self_signed(key: ec.EllipticCurvePrivateKey, cn: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(NO_EXPIRY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(eku, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return builder.sign(key, hashes.SHA256())


def _load_key(path: Path, role: Role) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(read_text(path, what="key").encode(), password=None)
    except (ValueError, TypeError) as err:
        raise _corrupt(path, role, f"not an unencrypted PEM private key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise _corrupt(path, role, f"a {type(key).__name__} key, confplan identities are ECDSA P-256")
    return key


def _load_cert(path: Path, role: Role) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(read_text(path, what="certificate").encode())
    except ValueError as err:
        raise _corrupt(path, role, f"not a PEM certificate ({err})") from None


def _corrupt(path: Path, role: Role, why: str) -> ConfplanError:
    return ConfplanError(
        f"the {role} identity file {path} is damaged: {why}",
        hint=f"restore it from a backup, or move {path.parent} away so a new identity is made "
        "(peers that trusted the old one must then enrol the new one)",
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Two commands starting at once must not make two identities (one would win the rename)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
