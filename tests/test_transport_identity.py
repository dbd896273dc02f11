"""Identities and the trust store on real files: modes, stable fingerprints, refusals (confplan.transport)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from confplan.errors import ConfplanError
from confplan.transport import Identity, Role, TrustStore, default_home, parse_fingerprint, short_fingerprint
from confplan.transport.identity import NO_EXPIRY, fingerprint


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- identity ----------------------------------------------------------------------------------------


def test_identity_is_made_on_first_use_with_private_modes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    identity = Identity.load_or_create(home, "agent")
    assert identity.role is Role.AGENT
    assert identity.folder == home / "identity" / "agent"
    assert mode(identity.key_path) == 0o600
    assert mode(identity.cert_path) == 0o600
    for folder in (home, home / "identity", identity.folder):
        assert mode(folder) == 0o700, folder
    assert identity.subject.startswith("CN=confplan-agent@")
    assert identity.fingerprint == fingerprint(identity.der)
    assert identity.fingerprint.startswith("sha256:") and len(identity.fingerprint) == 7 + 64
    assert identity.short == identity.fingerprint[:19]


def test_identity_certificate_is_a_self_signed_end_entity_that_never_expires(tmp_path: Path) -> None:
    cert = Identity.load_or_create(tmp_path, Role.ORCHESTRATOR).cert
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.not_valid_after_utc == NO_EXPIRY


def test_fingerprint_is_stable_across_reloads_and_roles_differ(tmp_path: Path) -> None:
    first = Identity.load_or_create(tmp_path, Role.AGENT)
    again = Identity.load_or_create(tmp_path, Role.AGENT)
    other = Identity.load_or_create(tmp_path, Role.ORCHESTRATOR)
    assert again.fingerprint == first.fingerprint
    assert again.key_path.read_bytes() == first.key_path.read_bytes()
    assert other.fingerprint != first.fingerprint


def test_key_readable_by_group_is_refused_with_the_chmod_hint(tmp_path: Path) -> None:
    identity = Identity.load_or_create(tmp_path, Role.AGENT)
    os.chmod(identity.key_path, 0o640)
    with pytest.raises(ConfplanError) as caught:
        Identity.load_or_create(tmp_path, Role.AGENT)
    assert str(identity.key_path) in caught.value.message
    assert "0640" in caught.value.message
    assert caught.value.hint is not None and f"chmod 600 {identity.key_path}" in caught.value.hint


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("key.pem", b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n", "private key"),
        ("cert.pem", b"garbage", "not a PEM certificate"),
    ],
)
def test_corrupt_identity_files_are_refused(tmp_path: Path, name: str, content: bytes, words: str) -> None:
    identity = Identity.load_or_create(tmp_path, Role.AGENT)
    (identity.folder / name).write_bytes(content)
    with pytest.raises(ConfplanError) as caught:
        Identity.load_or_create(tmp_path, Role.AGENT)
    assert "damaged" in caught.value.message and words in caught.value.message
    assert caught.value.hint is not None and "move" in caught.value.hint


def test_a_certificate_for_another_key_is_refused(tmp_path: Path) -> None:
    mine = Identity.load_or_create(tmp_path / "a", Role.AGENT)
    theirs = Identity.load_or_create(tmp_path / "b", Role.AGENT)
    mine.cert_path.write_bytes(theirs.cert_path.read_bytes())
    with pytest.raises(ConfplanError, match="not for the key"):
        Identity.load_or_create(tmp_path / "a", Role.AGENT)


def test_an_incomplete_identity_is_refused_not_replaced(tmp_path: Path) -> None:
    identity = Identity.load_or_create(tmp_path, Role.AGENT)
    identity.cert_path.unlink()
    with pytest.raises(ConfplanError, match=r"incomplete: cert\.pem is missing"):
        Identity.load_or_create(tmp_path, Role.AGENT)
    assert identity.key_path.exists()


def test_an_unusable_home_is_refused_with_a_hint(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfplanError) as caught:
        Identity.load_or_create(blocker / "home", Role.AGENT)
    assert "cannot use" in caught.value.message
    assert caught.value.hint is not None and "--home" in caught.value.hint


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_read_only_home_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o500)
    with pytest.raises(ConfplanError, match="cannot use"):
        Identity.load_or_create(home, Role.AGENT)


def test_default_home_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONFPLAN_HOME", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "x"))
    assert default_home() == tmp_path / "c"
    monkeypatch.delenv("CONFPLAN_HOME")
    assert default_home() == tmp_path / "x" / "confplan"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert default_home() == tmp_path / "h" / ".local" / "state" / "confplan"


def test_parse_fingerprint() -> None:
    value = "sha256:" + "ab" * 32
    assert parse_fingerprint("  SHA256:" + "AB" * 32 + "\n") == value
    assert short_fingerprint(value) == "sha256:" + "ab" * 6
    for bad in ("ab" * 32, "sha256:abc", "sha1:" + "ab" * 32, "sha256:" + "zz" * 32):
        with pytest.raises(ValueError, match="not a fingerprint"):
            parse_fingerprint(bad)


# -- trust store -------------------------------------------------------------------------------------


def test_trust_add_list_remove(tmp_path: Path) -> None:
    store = TrustStore.at_home(tmp_path / "home")
    orch = Identity.load_or_create(tmp_path / "o", Role.ORCHESTRATOR)
    agent = Identity.load_or_create(tmp_path / "a", Role.AGENT)
    entry, new = store.add(Role.ORCHESTRATOR, orch.pem)
    assert new and entry.fingerprint == orch.fingerprint and entry.subject == orch.subject
    assert entry.path == tmp_path / "home" / "trust" / "orchestrators" / f"{orch.fingerprint[7:]}.pem"
    assert mode(entry.path) == 0o600 and mode(entry.path.parent) == 0o700 and mode(store.folder) == 0o700
    again, new = store.add(Role.ORCHESTRATOR, orch.pem.encode())
    assert not new and again.added_at == entry.added_at
    store.add_file(Role.AGENT, agent.cert_path)

    listed = {(e.fingerprint, e.role) for e in store.list()}
    assert listed == {(orch.fingerprint, Role.ORCHESTRATOR), (agent.fingerprint, Role.AGENT)}
    assert [e.fingerprint for e in store.list(Role.AGENT)] == [agent.fingerprint]
    assert store.fingerprints(Role.ORCHESTRATOR) == {orch.fingerprint}
    assert store.list()[0].to_json()["added_at"].endswith("Z")

    removed = store.remove(orch.fingerprint[:15])  # "sha256:" and 8 hex digits
    assert removed.fingerprint == orch.fingerprint and not removed.path.exists()
    store.remove(agent.fingerprint[7:])  # hex only, no "sha256:"
    assert store.list() == []


def test_pem_bundle_holds_each_enrolled_certificate(tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "trust")
    assert store.pem_bundle(Role.ORCHESTRATOR) == ""
    orchs = [Identity.load_or_create(tmp_path / str(i), Role.ORCHESTRATOR) for i in range(2)]
    for orch in orchs:
        store.add(Role.ORCHESTRATOR, orch.pem)
    bundle = store.pem_bundle(Role.ORCHESTRATOR)
    certs = x509.load_pem_x509_certificates(bundle.encode())
    assert {fingerprint(c.public_bytes(serialization.Encoding.DER)) for c in certs} == {
        o.fingerprint for o in orchs
    }
    assert "confplan trusted" not in bundle  # only the PEM blocks, not the header lines


def test_trust_remove_refuses_unknown_and_ambiguous_prefixes(tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "trust")
    added = []
    while True:  # two certificates whose fingerprints share the first hex digit
        identity = Identity.load_or_create(tmp_path / str(len(added)), Role.AGENT)
        store.add(Role.AGENT, identity.pem)
        added.append(identity.fingerprint)
        firsts = [value[7] for value in added]
        shared = next((digit for digit in firsts if firsts.count(digit) > 1), None)
        if shared is not None:
            break
    with pytest.raises(ConfplanError, match="matches 2 certificates"):
        store.remove(shared)
    unused = next(digit for digit in "0123456789abcdef" if digit not in firsts)
    with pytest.raises(ConfplanError, match="no trusted certificate"):
        store.remove("sha256:" + unused)
    with pytest.raises(ConfplanError, match="no fingerprint given"):
        store.remove("sha256:")


def test_trust_add_refuses_what_cannot_be_pinned(tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "trust")
    agent = Identity.load_or_create(tmp_path / "a", Role.AGENT)
    orch = Identity.load_or_create(tmp_path / "o", Role.ORCHESTRATOR)
    with pytest.raises(ConfplanError, match="confplan agent identity") as caught:
        store.add(Role.ORCHESTRATOR, agent.pem)
    assert caught.value.hint is not None and "--agent" in caught.value.hint
    with pytest.raises(ConfplanError, match="found 2 certificates"):
        store.add(Role.AGENT, agent.pem + orch.pem)
    with pytest.raises(ConfplanError, match="found no PEM certificate"):
        store.add(Role.AGENT, "hello")
    with pytest.raises(ConfplanError, match="not self-signed"):
        store.add(Role.AGENT, _issued_by_another(tmp_path))
    assert store.list() == []


def test_a_tampered_trust_file_is_reported(tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "trust")
    agent = Identity.load_or_create(tmp_path / "a", Role.AGENT)
    other = Identity.load_or_create(tmp_path / "b", Role.AGENT)
    entry, _ = store.add(Role.AGENT, agent.pem)
    entry.path.write_text(other.pem)  # the name says one certificate, the content is another
    with pytest.raises(ConfplanError, match="not the one its name says"):
        store.list()


def test_trust_state_changes_on_add_and_remove(tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "trust")
    orch = Identity.load_or_create(tmp_path / "o", Role.ORCHESTRATOR)
    empty = store.state(Role.ORCHESTRATOR)
    store.add(Role.ORCHESTRATOR, orch.pem)
    enrolled = store.state(Role.ORCHESTRATOR)
    assert enrolled != empty
    assert store.state(Role.AGENT) == ()
    store.remove(orch.fingerprint)
    assert store.state(Role.ORCHESTRATOR) == empty


def _issued_by_another(tmp_path: Path) -> str:
    """A certificate signed by some CA key: not its own issuer, so not a pin OpenSSL can anchor on."""
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "some CA")]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NO_EXPIRY.replace(year=2020))
        .not_valid_after(NO_EXPIRY)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()
