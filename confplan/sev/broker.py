"""The guest owner's key broker: decides, from a launch measurement, whether a guest gets its secrets.

It runs on the owner's side (their machine, or the attest-target stage acting for them) and never trusts
the host: it verifies the platform certificate chain, makes a fresh TEK/TIK per launch wrapped to the
platform's PDH, and releases the migration transport key only as a LAUNCH_SECRET packet that the secure
processor accepts for exactly the launch whose measurement matched the owner's policy file.

Owner directory: ``owner.key`` (the key sealing per-launch session state, mode 0600) and ``policy.json``.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import pydantic
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from confplan.errors import ConfplanError
from confplan.sev import anchors, certs, launch_crypto
from confplan.sev.certs import CertError, PlatformChain, Usage
from confplan.sev.launch_crypto import PlatformVersion, SecretPacket, TransportKeys
from confplan.sev.policy import sev_api_version
from confplan.sev.secret_table import (
    CONFPLAN_MIGRATION_ID_GUID,
    CONFPLAN_TRANSPORT_KEY_GUID,
    MIGRATION_ID_LEN,
    build_secret_table,
)
from confplan.sev.signing import VerifyError
from confplan.sev.statefile import pack_state, unpack_state, write_private

OWNER_KEY_NAME = "owner.key"
POLICY_NAME = "policy.json"
POLICY_FORMAT = "confplan-owner-policy/v1"
_OWNER_KEY_MAGIC = b"CPOWNKEY"
_SESSION_MAGIC = b"CPOWNSES"
_FORMAT_VERSION = 1
_SESSION_AAD = b"confplan owner session state v1"
TRANSPORT_KEY_LEN = 32


class AttestationRefused(ConfplanError):
    """The broker will not hand out a session or a secret: something did not match the owner's policy."""


def _hex_digest(value: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ValueError(f"{value!r} is not a SHA-256 digest (64 hex digits)")
    return value.lower()


def parse_api(text: str) -> tuple[int, int]:
    """'1.40' -> (1, 40)."""
    m = re.fullmatch(r"(\d{1,3})\.(\d{1,3})", text.strip())
    if not m or int(m[1]) > 255 or int(m[2]) > 255:
        raise ValueError(f"{text!r} is not an API version MAJOR.MINOR (each 0-255)")
    return int(m[1]), int(m[2])


class OwnerPolicy(pydantic.BaseModel):
    """policy.json: what the owner accepts. Every list is an allow-list; nothing else passes."""

    model_config = pydantic.ConfigDict(extra="forbid")

    format: str = pydantic.Field(POLICY_FORMAT, description="always confplan-owner-policy/v1")
    allowed_digests: list[str] = pydantic.Field(
        description="SEV launch digests (SHA-256 hex) of the firmware + boot parameters the owner trusts"
    )
    allowed_policies: list[int] = pydantic.Field(description="guest policy words the owner accepts")
    min_api: str = pydantic.Field("0.0", description="lowest secure-processor firmware API, MAJOR.MINOR")
    min_build: int = pydantic.Field(0, ge=0, le=255, description="lowest firmware build at that API")
    trusted_ark_sha256: list[str] = pydantic.Field(
        default_factory=list,
        description="SHA-256 of the ARK certificates to trust (as received); empty: AMD's built-in ARKs",
    )
    trust_emulated_platform: bool = pydantic.Field(
        False,
        description="DANGER: also trust an ARK that is not AMD's (confplan's EMULATED secure processor); "
        "a host that holds such keys can make up any measurement",
    )

    @pydantic.field_validator("allowed_digests", "trusted_ark_sha256")
    @classmethod
    def _digests(cls, values: list[str]) -> list[str]:
        return [_hex_digest(v) for v in values]

    @pydantic.field_validator("allowed_policies", mode="before")
    @classmethod
    def _policies(cls, values: object) -> object:
        # Owners write policy words in hex ("0x28010003"); JSON has no hex integers.
        if isinstance(values, list):
            return [int(v, 0) if isinstance(v, str) else v for v in values]
        return values

    @pydantic.field_serializer("allowed_policies")
    def _policies_hex(self, values: list[int]) -> list[str]:
        return [f"{v:#x}" for v in values]

    @pydantic.field_validator("min_api")
    @classmethod
    def _api(cls, value: str) -> str:
        parse_api(value)
        return value

    @pydantic.field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value != POLICY_FORMAT:
            raise ValueError(f"unsupported format {value!r}, expected {POLICY_FORMAT!r}")
        return value


@dataclass(frozen=True)
class LaunchBundle:
    """What ``new_session`` gives the host (godh_cert, session_blob) and keeps for itself (state)."""

    godh_cert: bytes
    session_blob: bytes
    state: bytes  # sealed with the owner key; only this broker can open it
    launch_id: str


@dataclass(frozen=True)
class _SessionState:
    keys: TransportKeys
    policy: int
    launch_id: str


def _load_policy(path: Path) -> OwnerPolicy:
    try:
        return OwnerPolicy.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        hint = "create it with 'confplan owner init'"
        raise ConfplanError(f"{path}: no such policy file", hint=hint) from None
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        msg = f"{path}: {where}: {str(first['msg']).removeprefix('Value error, ')}"
        raise ConfplanError(msg, hint="fix the policy file and retry") from None


class KeyBroker:
    """The owner's broker over an owner directory (see the module docstring)."""

    def __init__(self, owner_dir: Path, owner_key: bytes, policy: OwnerPolicy) -> None:
        self.owner_dir = owner_dir
        self._owner_key = owner_key
        self.policy = policy

    @classmethod
    def init(cls, owner_dir: Path, policy: OwnerPolicy, *, force: bool = False) -> KeyBroker:
        """Create the owner key and the policy file. Refuses to overwrite an owner key unless ``force``."""
        key_path = owner_dir / OWNER_KEY_NAME
        if key_path.exists() and not force:
            raise ConfplanError(
                f"{key_path} already exists",
                hint="pass --force to replace it (sessions sealed with the old key can then not be released)",
            )
        owner_key = AESGCM.generate_key(bit_length=256)
        owner_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(key_path, pack_state(_OWNER_KEY_MAGIC, _FORMAT_VERSION, owner_key))
        write_private(owner_dir / POLICY_NAME, (policy.model_dump_json(indent=2) + "\n").encode())
        return cls(owner_dir, owner_key, policy)

    @classmethod
    def open(cls, owner_dir: Path) -> KeyBroker:
        key_path = owner_dir / OWNER_KEY_NAME
        if not key_path.exists():
            raise ConfplanError(f"{key_path}: no owner key", hint="create one with 'confplan owner init'")
        owner_key = unpack_state(key_path, key_path.read_bytes(), _OWNER_KEY_MAGIC, _FORMAT_VERSION)
        return cls(owner_dir, owner_key, _load_policy(owner_dir / POLICY_NAME))

    def with_policy(self, policy: OwnerPolicy) -> KeyBroker:
        """The same owner key under another policy (in memory; policy.json is not rewritten)."""
        return KeyBroker(self.owner_dir, self._owner_key, policy)

    # -- checks against the policy file --
    def _policy_where(self) -> str:
        return str(self.owner_dir / POLICY_NAME)

    def _check_policy_word(self, policy: int) -> None:
        if policy not in self.policy.allowed_policies:
            allowed = ", ".join(f"{p:#x}" for p in self.policy.allowed_policies) or "none"
            raise AttestationRefused(
                f"guest policy {policy:#x} is not in allowed_policies ({allowed}) of {self._policy_where()}",
                hint="launch with an allowed policy, or add it to the policy file",
            )
        need = parse_api(self.policy.min_api)
        if sev_api_version(policy) < need:
            major, minor = sev_api_version(policy)
            raise AttestationRefused(
                f"guest policy {policy:#x} lets the guest run on firmware API {major}.{minor}, below min_api "
                f"{self.policy.min_api} of {self._policy_where()}",
                hint=f"set the policy's api_min to at least {self.policy.min_api}",
            )

    def _check_chain(self, chain: PlatformChain) -> None:
        try:
            chain.verify()
        except CertError as err:
            raise AttestationRefused(
                f"platform certificate chain does not verify: {err}",
                hint="export the chain again from the platform; a broken chain is never trusted",
            ) from None
        fingerprint = chain.ark.fingerprint()
        product = None if chain.emulated else anchors.sev_ark_product(fingerprint)
        try:
            anchors.check_root(
                fingerprint,
                product,
                pins=self.policy.trusted_ark_sha256,
                trust_emulated=self.policy.trust_emulated_platform,
                where=self._policy_where(),
            )
        except VerifyError as err:
            raise AttestationRefused(err.message, hint=err.hint) from None

    def _check_version(self, version: PlatformVersion) -> None:
        need = parse_api(self.policy.min_api)
        if (version.api_major, version.api_minor) < need or (
            (version.api_major, version.api_minor) == need and version.build < self.policy.min_build
        ):
            raise AttestationRefused(
                f"platform firmware {version} is below the minimum {self.policy.min_api} build "
                f"{self.policy.min_build} of {self._policy_where()}",
                hint="update the platform's SEV firmware, or lower min_api/min_build",
            )

    # -- session state sealing --
    def _seal(self, state: _SessionState) -> bytes:
        doc = {
            "tek": state.keys.tek.hex(),
            "tik": state.keys.tik.hex(),
            "policy": state.policy,
            "launch_id": state.launch_id,
        }
        nonce = os.urandom(12)
        sealed = nonce + AESGCM(self._owner_key).encrypt(nonce, json.dumps(doc).encode(), _SESSION_AAD)
        return pack_state(_SESSION_MAGIC, _FORMAT_VERSION, sealed)

    def _unseal(self, raw: bytes, where: Path) -> _SessionState:
        sealed = unpack_state(where, raw, _SESSION_MAGIC, _FORMAT_VERSION)
        try:
            doc = json.loads(AESGCM(self._owner_key).decrypt(sealed[:12], sealed[12:], _SESSION_AAD))
        except Exception:
            raise ConfplanError(
                f"{where}: session state does not open with the owner key in {self.owner_dir}",
                hint="use the owner directory that made this session",
            ) from None
        keys = TransportKeys(bytes.fromhex(doc["tek"]), bytes.fromhex(doc["tik"]))
        return _SessionState(keys, int(doc["policy"]), str(doc["launch_id"]))

    # -- the two broker operations --
    def new_session(self, chain: PlatformChain, policy: int) -> LaunchBundle:
        """GetBundle: verify the platform, then make a GODH cert and a session blob bound to ``policy``."""
        self._check_policy_word(policy)
        self._check_chain(chain)
        keys = TransportKeys(os.urandom(16), os.urandom(16))
        godh = certs.new_key()
        z = certs.ecdh_secret(godh, chain.pdh.pubkey)
        blob = launch_crypto.wrap_session(z, keys, policy, os.urandom(16), os.urandom(16))
        # The GODH is ephemeral and unsigned: the MACs, not a signature, authenticate the owner.
        godh_cert = certs.issue(godh.public_key(), Usage.PDH, [])
        launch_id = str(uuid.uuid4())
        state = self._seal(_SessionState(keys, policy, launch_id))
        return LaunchBundle(godh_cert.pack(), blob.pack(), state, launch_id)

    def verify_measurement(
        self, state: bytes, measurement: bytes, version: PlatformVersion, *, where: Path = Path("<session>")
    ) -> tuple[_SessionState, str]:
        """Recompute MEASURE for each allowed digest; return the session and the digest that matched."""
        session = self._unseal(state, where)
        self._check_policy_word(session.policy)
        self._check_version(version)
        if len(measurement) != launch_crypto.MEASURE_LEN:
            raise AttestationRefused(
                f"a launch measurement is {launch_crypto.MEASURE_LEN} bytes, got {len(measurement)}",
                hint="pass LAUNCH_MEASURE's output (MEASURE || MNONCE)",
            )
        measure, mnonce = measurement[:32], measurement[32:]
        for digest in self.policy.allowed_digests:
            want = launch_crypto.measure_mac(
                session.keys.tik, version, session.policy, bytes.fromhex(digest), mnonce
            )
            if hmac.compare_digest(want, measure):
                return session, digest
        raise AttestationRefused(
            f"launch {session.launch_id}: the measurement matches none of the "
            f"{len(self.policy.allowed_digests)} allowed_digests of {self._policy_where()} for policy "
            f"{session.policy:#x} on firmware {version}",
            hint="the guest's firmware or boot parameters differ from what the owner allowed (or the host "
            "reported a different API version/build); compute the digest with 'confplan owner digest'",
        )

    def release(
        self,
        state: bytes,
        measurement: bytes,
        version: PlatformVersion,
        secrets: dict[uuid.UUID, bytes],
        *,
        where: Path = Path("<session>"),
    ) -> SecretPacket:
        """GetSecret: after ``verify_measurement`` passes, wrap ``secrets`` as one LAUNCH_SECRET packet."""
        session, _ = self.verify_measurement(state, measurement, version, where=where)
        table = build_secret_table(secrets)
        return launch_crypto.seal_secret(session.keys, measurement[:32], table, os.urandom(16))

    def release_transport_key(
        self, state: bytes, measurement: bytes, version: PlatformVersion, transport_key: bytes,
        migration_id: bytes | None = None,
    ) -> SecretPacket:  # fmt: skip
        """Release the migration transport key (and, if given, the owner's migration id) to one measured
        migration helper (source or target)."""
        return self.release(state, measurement, version, confplan_secrets(transport_key, migration_id))


def confplan_secrets(transport_key: bytes, migration_id: bytes | None = None) -> dict[uuid.UUID, bytes]:
    """The secrets confplan releases to a migration helper: the transport key and the migration id."""
    if len(transport_key) != TRANSPORT_KEY_LEN:
        raise ConfplanError(f"a transport key is {TRANSPORT_KEY_LEN} bytes, got {len(transport_key)}")
    secrets = {CONFPLAN_TRANSPORT_KEY_GUID: transport_key}
    if migration_id is not None:
        if len(migration_id) != MIGRATION_ID_LEN:
            raise ConfplanError(f"a migration id is {MIGRATION_ID_LEN} bytes, got {len(migration_id)}")
        secrets[CONFPLAN_MIGRATION_ID_GUID] = migration_id
    return secrets
