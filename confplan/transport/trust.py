"""The peers this host trusts, by role: ssh's known_hosts and authorized_keys in one folder (docs/channel.md).

``<home>/trust/agents/`` holds the agents an orchestrator may drive (it also accepts an agent pinned by
the plan), ``<home>/trust/orchestrators/`` the orchestrators an agent obeys. One PEM file per certificate,
named by its fingerprint's hex, with a few ``key: value`` lines above the PEM block (OpenSSL skips them).
The file name is only an index: every read parses the certificate and recomputes its fingerprint.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from confplan.errors import ConfplanError
from confplan.transport.files import private_dir, read_text, write_private
from confplan.transport.identity import (
    FINGERPRINT_PREFIX,
    Role,
    cert_fingerprint,
    role_in_subject,
    self_signed_problem,
)

_PEM_BEGIN = "-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True)
class TrustedCert:
    """One enrolled peer certificate."""

    role: Role
    fingerprint: str
    subject: str
    added_at: str  # ISO 8601 UTC, as written when enrolled
    path: Path
    cert: x509.Certificate

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode("ascii")

    def to_json(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "role": self.role.value,
            "subject": self.subject,
            "added_at": self.added_at,
            "path": str(self.path),
        }


class TrustStore:
    """Enrolled peer certificates under ``folder`` (``<home>/trust``), one subfolder per role."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @classmethod
    def at_home(cls, home: Path) -> TrustStore:
        return cls(home / "trust")

    def role_folder(self, role: Role | str) -> Path:
        return self.folder / Role(role).plural

    # -- changes -------------------------------------------------------------------------------------

    def add(
        self, role: Role | str, pem: str | bytes, *, source: str = "the input"
    ) -> tuple[TrustedCert, bool]:
        """Enrol the one certificate in ``pem`` for ``role``; returns it and whether it was new.

        ``source`` names where the PEM came from, for messages. Refuses anything that is not exactly one
        self-signed certificate, and a confplan identity whose CN names the other role.
        """
        role = Role(role)
        cert = _parse_one(pem if isinstance(pem, str) else pem.decode("ascii", "replace"), source)
        if problem := self_signed_problem(cert):
            raise ConfplanError(
                f"{source}: the certificate cannot be pinned: {problem}",
                hint="enrol the certificate a peer prints with `confplan identity show --pem`",
            )
        named = role_in_subject(cert)
        if named is not None and named is not role:
            raise ConfplanError(
                f"{source}: this is a confplan {named} identity ({cert.subject.rfc4514_string()}), "
                f"not an {role}",
                hint=f"use `confplan trust add --{named.value} ...` if that is what you meant",
            )
        value = cert_fingerprint(cert)
        path = self._path(role, value)
        if path.exists():
            return self._read(role, path), False
        added = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        header = (
            f"confplan trusted {role}\nfingerprint: {value}\n"
            f"subject: {cert.subject.rfc4514_string()}\nadded-at: {added}\n"
        )
        body = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        private_dir(self.folder, use="the trust store")
        write_private(path, (header + body).encode("ascii"), use="the trust store")
        return self._read(role, path), True

    def add_file(self, role: Role | str, path: Path) -> tuple[TrustedCert, bool]:
        return self.add(role, read_text(path, what="certificate"), source=str(path))

    def remove(self, fingerprint_or_prefix: str, role: Role | str | None = None) -> TrustedCert:
        """Forget the one enrolled certificate whose fingerprint is, or starts with, the argument
        (with or without ``sha256:``)."""
        entry = self.find(fingerprint_or_prefix, role)
        entry.path.unlink()
        return entry

    # -- reads ---------------------------------------------------------------------------------------

    def list(self, role: Role | str | None = None) -> list[TrustedCert]:
        """Enrolled certificates (of ``role``, or all), oldest first."""
        roles = [Role(role)] if role is not None else list(Role)
        found: list[TrustedCert] = []
        for each in roles:
            folder = self.role_folder(each)
            if folder.is_dir():
                found.extend(self._read(each, path) for path in sorted(folder.glob("*.pem")))
        return sorted(found, key=lambda entry: (entry.added_at, entry.role, entry.fingerprint))

    def fingerprints(self, role: Role | str) -> set[str]:
        return {entry.fingerprint for entry in self.list(role)}

    def pem_bundle(self, role: Role | str) -> str:
        """The enrolled certificates of ``role`` as one PEM text, for ``SSLContext.load_verify_locations
        (cadata=...)``; empty when none is enrolled."""
        return "".join(entry.pem for entry in self.list(role))

    def find(self, fingerprint_or_prefix: str, role: Role | str | None = None) -> TrustedCert:
        wanted = fingerprint_or_prefix.strip().lower()
        wanted = wanted if wanted.startswith(FINGERPRINT_PREFIX) else FINGERPRINT_PREFIX + wanted
        if len(wanted) <= len(FINGERPRINT_PREFIX):
            raise ConfplanError("no fingerprint given", hint="see `confplan trust list`")
        matches = [entry for entry in self.list(role) if entry.fingerprint.startswith(wanted)]
        if not matches:
            raise ConfplanError(
                f"no trusted certificate has a fingerprint starting with {wanted}",
                hint="`confplan trust list` shows the enrolled ones",
            )
        if len(matches) > 1:
            names = ", ".join(f"{entry.role} {entry.fingerprint}" for entry in matches)
            raise ConfplanError(
                f"{fingerprint_or_prefix!r} matches {len(matches)} certificates: {names}",
                hint="give more digits of the fingerprint",
            )
        return matches[0]

    def state(self, role: Role | str) -> tuple[tuple[str, int, int], ...]:
        """What changes when a ``role`` certificate is added or removed (names, mtimes, sizes): a server
        compares it to rebuild its TLS context, so `trust add/remove` acts without a restart."""
        folder = self.role_folder(role)
        try:
            names = sorted(os.listdir(folder))
        except FileNotFoundError:
            return ()
        state = []
        for name in names:
            if name.endswith(".pem"):
                try:
                    info = os.stat(folder / name)
                except FileNotFoundError:
                    continue
                state.append((name, info.st_mtime_ns, info.st_size))
        return tuple(state)

    # -- files ---------------------------------------------------------------------------------------

    def _path(self, role: Role, value: str) -> Path:
        return self.role_folder(role) / f"{value.removeprefix(FINGERPRINT_PREFIX)}.pem"

    def _read(self, role: Role, path: Path) -> TrustedCert:
        text = read_text(path, what="trusted certificate")
        cert = _parse_one(text, str(path))
        value = cert_fingerprint(cert)
        if path.name != f"{value.removeprefix(FINGERPRINT_PREFIX)}.pem":
            raise ConfplanError(
                f"{path}: the certificate inside has fingerprint {value}, not the one its name says",
                hint=f"remove {path} and enrol the certificate again with `confplan trust add`",
            )
        fields = dict(
            line.split(": ", 1) for line in text.split(_PEM_BEGIN, 1)[0].splitlines() if ": " in line
        )
        return TrustedCert(
            role, value, cert.subject.rfc4514_string(), fields.get("added-at", "?"), path, cert
        )


def _parse_one(text: str, source: str) -> x509.Certificate:
    """Exactly one PEM certificate in ``text``."""
    count = text.count(_PEM_BEGIN)
    if count != 1:
        found = "no PEM certificate" if count == 0 else f"{count} certificates"
        raise ConfplanError(
            f"{source}: expected one PEM certificate, found {found}",
            hint="pass the output of `confplan identity show --role ROLE --pem` from the peer host",
        )
    try:
        return x509.load_pem_x509_certificate(text[text.index(_PEM_BEGIN) :].encode("ascii", "replace"))
    except ValueError as err:
        raise ConfplanError(
            f"{source}: the PEM certificate is damaged ({err})",
            hint="copy it again from `confplan identity show --pem` on the peer host",
        ) from None
