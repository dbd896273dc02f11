"""The EMULATED AMD secure processor (PSP): platform identity, the legacy SEV launch, the SNP report.

No SEV hardware is here, so this class plays the part of the PSP firmware: it owns the platform keys, runs
the launch state machine and enforces the guest policy where the real PSP would. Everything it accepts and
produces is in the real formats, so the guest owner's side (``confplan.sev.broker``) is the code a real
deployment would run unchanged. What differs from hardware is listed in docs/attestation.md.

Legacy SEV guest states: UNINIT -LAUNCH_START-> LUPDATE -LAUNCH_MEASURE-> LSECRET -LAUNCH_FINISH-> RUNNING.
SNP guest states: UNINIT -SNP_LAUNCH_START-> LUPDATE -SNP_LAUNCH_FINISH-> RUNNING.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from confplan.errors import ConfplanError
from confplan.sev import certs, launch_crypto, snp, snp_guest_msg
from confplan.sev.certs import CertError, PlatformChain, SevCert, Usage
from confplan.sev.launch_crypto import PlatformVersion, SecretPacket, SessionBlob, TransportKeys
from confplan.sev.memory import GuestMemory
from confplan.sev.policy import (
    SNP_RESERVED_ONE,
    SevPolicyFlag,
    SnpPolicyFlag,
    decode_snp_policy,
    sev_api_version,
)
from confplan.sev.statefile import pack_state, unpack_state, write_private

KEY_FILE_NAME = "emulated-psp-keys.bin"
_KEY_FILE_MAGIC = b"CPEMUPSP"
_KEY_FILE_VERSION = 1
DEFAULT_VERSION = PlatformVersion(api_major=1, api_minor=55, build=21)
ALIGN = 16  # LAUNCH_UPDATE_DATA and LAUNCH_SECRET work on 16-byte aligned, 16-byte multiple regions

Rng = Callable[[int], bytes]


class SevStatus(enum.IntEnum):
    """SEV firmware status codes (AMD SEV API, chapter 4.4) this emulation returns."""

    INVALID_GUEST_STATE = 0x02
    INVALID_LENGTH = 0x04
    INVALID_CERTIFICATE = 0x06
    POLICY_FAILURE = 0x07
    INVALID_ADDRESS = 0x09
    BAD_MEASUREMENT = 0x0B
    UNSUPPORTED = 0x15
    INVALID_PARAM = 0x16


class SecureProcessorError(ConfplanError):
    """A command the emulated secure processor refused, with the status the real PSP would return."""

    def __init__(self, command: str, status: SevStatus, detail: str, *, hint: str | None = None) -> None:
        super().__init__(f"emulated secure processor: {command} refused ({status.name}): {detail}", hint=hint)
        self.command = command
        self.status = status


class GuestState(enum.Enum):
    UNINIT = "UNINIT"
    LUPDATE = "LUPDATE"
    LSECRET = "LSECRET"
    RUNNING = "RUNNING"


_KEY_NAMES = ("ark", "ask", "cek", "oca", "pek", "pdh", "vcek")


@dataclass(frozen=True)
class _PlatformKeys:
    private: dict[str, ec.EllipticCurvePrivateKey]
    chain: PlatformChain
    version: PlatformVersion
    snp_chain: tuple[bytes, bytes, bytes]  # ARK, ASK, VCEK as X.509 PEM (emulated_x509)


def _issue_snp_chain(keys: dict[str, ec.EllipticCurvePrivateKey]) -> tuple[bytes, bytes, bytes]:
    from confplan.sev.emulated_x509 import issue_snp_chain  # X.509 only when keys are made, not per VMM

    return issue_snp_chain(keys["ark"], keys["ask"], keys["vcek"], snp.EMULATED_CHIP_ID)


def _issue_chain(keys: dict[str, ec.EllipticCurvePrivateKey], version: PlatformVersion) -> PlatformChain:
    api = (version.api_major, version.api_minor)

    def pub(name: str) -> ec.EllipticCurvePublicKey:
        return keys[name].public_key()

    return PlatformChain(
        pdh=certs.issue(pub("pdh"), Usage.PDH, [(keys["pek"], Usage.PEK)], api),
        pek=certs.issue(pub("pek"), Usage.PEK, [(keys["cek"], Usage.CEK), (keys["oca"], Usage.OCA)], api),
        oca=certs.issue(pub("oca"), Usage.OCA, [(keys["oca"], Usage.OCA)], api),
        cek=certs.issue(pub("cek"), Usage.CEK, [(keys["ask"], Usage.ASK)], api),
        ask=certs.issue(pub("ask"), Usage.ASK, [(keys["ark"], Usage.ARK)]),
        ark=certs.issue(pub("ark"), Usage.ARK, [(keys["ark"], Usage.ARK)]),
    )


def _pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _dump_keys(platform: _PlatformKeys) -> bytes:
    v = platform.version
    doc = {
        "what": "confplan EMULATED secure processor keys (not AMD hardware)",
        "version": [v.api_major, v.api_minor, v.build],
        "keys": {name: _pem(platform.private[name]) for name in _KEY_NAMES},
        "chain": platform.chain.pack().hex(),
        "snp_chain": [pem.decode() for pem in platform.snp_chain],
    }
    return json.dumps(doc, indent=1).encode()


def _load_keys(path: Path) -> _PlatformKeys:
    payload = unpack_state(path, path.read_bytes(), _KEY_FILE_MAGIC, _KEY_FILE_VERSION)
    doc = json.loads(payload)
    private: dict[str, ec.EllipticCurvePrivateKey] = {}
    for name in _KEY_NAMES:
        key = serialization.load_pem_private_key(doc["keys"][name].encode(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfplanError(f"{path}: key {name} is not an EC key", hint="delete the file to recreate it")
        private[name] = key
    major, minor, build = doc["version"]
    chain = PlatformChain.unpack(bytes.fromhex(doc["chain"]))
    version = PlatformVersion(major, minor, build)
    if "snp_chain" not in doc:  # a key file from before the SNP certificates: issue them once, keep them
        platform = _PlatformKeys(private, chain, version, _issue_snp_chain(private))
        write_private(path, pack_state(_KEY_FILE_MAGIC, _KEY_FILE_VERSION, _dump_keys(platform)))
        return platform
    ark, ask, vcek = (pem.encode() for pem in doc["snp_chain"])
    return _PlatformKeys(private, chain, version, (ark, ask, vcek))


class EmulatedSecureProcessor:
    """An emulated PSP whose keys live in ``<state_dir>/emulated-psp-keys.bin`` (mode 0600)."""

    def __init__(self, platform: _PlatformKeys, key_file: Path, rng: Rng) -> None:
        self._platform = platform
        self.key_file = key_file
        self._rng = rng

    @classmethod
    def open(
        cls, state_dir: Path, *, version: PlatformVersion = DEFAULT_VERSION, rng: Rng = os.urandom
    ) -> EmulatedSecureProcessor:
        """Load the platform keys from ``state_dir``, creating them (and the directory) on first use.

        ``version`` only applies when the keys are created. ``rng`` is for known-answer tests only.
        """
        path = Path(state_dir) / KEY_FILE_NAME
        if path.exists():
            return cls(_load_keys(path), path, rng)
        keys = {name: certs.new_key() for name in _KEY_NAMES}
        platform = _PlatformKeys(keys, _issue_chain(keys, version), version, _issue_snp_chain(keys))
        Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(path, pack_state(_KEY_FILE_MAGIC, _KEY_FILE_VERSION, _dump_keys(platform)))
        return cls(platform, path, rng)

    @property
    def version(self) -> PlatformVersion:
        """PLATFORM_STATUS: the firmware API version and build."""
        return self._platform.version

    def platform_chain(self) -> PlatformChain:
        """PDH_CERT_EXPORT plus the ARK and ASK: what the host hands the guest owner."""
        return self._platform.chain

    def snp_cert_chain(self) -> tuple[bytes, bytes, bytes]:
        """The SNP ARK, ASK and VCEK certificates (PEM), as a host fetches them from AMD KDS. They are
        ECDSA and name the emulation: only an owner who trusts the emulated platform accepts them."""
        return self._platform.snp_chain

    def vcek_public_key(self) -> ec.EllipticCurvePublicKey:
        """The emulated VCEK's public key (real hardware: fetched from AMD's KDS for this chip and TCB)."""
        return self._platform.private["vcek"].public_key()

    def new_guest(self, memory: GuestMemory) -> SevGuest:
        """A legacy SEV / SEV-ES guest context in state UNINIT, bound to ``memory``."""
        return SevGuest(self, memory)

    def new_snp_guest(self, memory: GuestMemory) -> SnpGuest:
        """An SEV-SNP guest context in state UNINIT, bound to ``memory``."""
        return SnpGuest(self, memory)

    # -- for the guest contexts --
    def _random(self, n: int) -> bytes:
        return self._rng(n)

    def _pdh_secret(self, godh: ec.EllipticCurvePublicKey) -> bytes:
        return certs.ecdh_secret(self._platform.private["pdh"], godh)

    def _sign_report(self, report: snp.SnpReport) -> bytes:
        return snp.sign_report(report, self._platform.private["vcek"])


def _check_api(command: str, wanted: tuple[int, int], have: PlatformVersion) -> None:
    if wanted > (have.api_major, have.api_minor):
        raise SecureProcessorError(
            command,
            SevStatus.POLICY_FAILURE,
            f"the guest policy needs firmware API >= {wanted[0]}.{wanted[1]}, "
            f"this platform runs {have.api_major}.{have.api_minor}",
            hint="lower api_min in the plan's sev.policy, or launch on a platform with newer firmware",
        )


def _check_region(command: str, gpa: int, length: int) -> None:
    if gpa % ALIGN:
        raise SecureProcessorError(command, SevStatus.INVALID_ADDRESS, f"GPA {gpa:#x} is not 16-byte aligned")
    if length == 0 or length % ALIGN:
        raise SecureProcessorError(
            command,
            SevStatus.INVALID_LENGTH,
            f"length {length} is not a non-zero multiple of 16",
            hint="the VMM pads what it measures to 16 bytes",
        )


class _Guest:
    """What both guest kinds share: the state machine and debug reads."""

    kind = "SEV"

    def __init__(self, psp: EmulatedSecureProcessor, memory: GuestMemory) -> None:
        self._psp = psp
        self._memory = memory
        self.state = GuestState.UNINIT

    def _require(self, command: str, *states: GuestState) -> None:
        if self.state not in states:
            wanted = " or ".join(s.value for s in states)
            raise SecureProcessorError(
                command,
                SevStatus.INVALID_GUEST_STATE,
                f"{self.kind} guest is in state {self.state.value}, {command} needs {wanted}",
                hint="the VMM must issue the launch commands in order",
            )

    def _debug_allowed(self) -> bool:
        raise NotImplementedError

    def debug_read(self, gpa: int, n: int) -> bytes:
        """DBG_DECRYPT: the VMM reads guest memory through the PSP; the guest policy may forbid it."""
        self._require("DBG_DECRYPT", GuestState.LUPDATE, GuestState.LSECRET, GuestState.RUNNING)
        if not self._debug_allowed():
            raise SecureProcessorError(
                "DBG_DECRYPT",
                SevStatus.POLICY_FAILURE,
                f"the guest policy forbids debugging, refusing to read {n} bytes at GPA {gpa:#x}",
            )
        return self._memory.read(gpa, n)


class SevGuest(_Guest):
    """One legacy SEV (or SEV-ES) guest's launch on the emulated secure processor."""

    def __init__(self, psp: EmulatedSecureProcessor, memory: GuestMemory) -> None:
        super().__init__(psp, memory)
        self.policy = 0
        self._keys: TransportKeys | None = None
        self._digest = hashlib.sha256()
        self._measure: bytes | None = None

    def _debug_allowed(self) -> bool:
        return not self.policy & SevPolicyFlag.NODBG

    def launch_start(self, policy: int, godh_cert: bytes, session: bytes) -> None:
        """LAUNCH_START: unwrap TEK/TIK from the owner's session blob; check WRAP_MAC, POLICY_MAC, API."""
        cmd = "LAUNCH_START"
        self._require(cmd, GuestState.UNINIT)
        _check_api(cmd, sev_api_version(policy), self._psp.version)
        try:
            godh = SevCert.unpack(godh_cert)
            blob = SessionBlob.unpack(session)
        except (CertError, ValueError) as err:
            raise SecureProcessorError(cmd, SevStatus.INVALID_CERTIFICATE, str(err)) from err
        if godh.usage != Usage.PDH or not isinstance(godh.pubkey, ec.EllipticCurvePublicKey):
            raise SecureProcessorError(
                cmd, SevStatus.INVALID_CERTIFICATE, f"GODH certificate has usage {godh.usage:#x}, not PDH"
            )
        try:
            keys = launch_crypto.unwrap_session(self._psp._pdh_secret(godh.pubkey), blob, policy)
        except launch_crypto.SessionRejected as err:
            status = SevStatus.POLICY_FAILURE if err.field == "POLICY_MAC" else SevStatus.BAD_MEASUREMENT
            raise SecureProcessorError(
                cmd,
                status,
                f"session blob {err}",
                hint="the session must come from 'confplan owner session' for this platform's PDH and this "
                "exact policy word",
            ) from None
        self._keys, self.policy = keys, policy
        self.state = GuestState.LUPDATE

    def launch_update_data(self, gpa: int, data: bytes) -> None:
        """LAUNCH_UPDATE_DATA: place ``data`` at ``gpa`` and extend the launch digest with it."""
        cmd = "LAUNCH_UPDATE_DATA"
        self._require(cmd, GuestState.LUPDATE)
        _check_region(cmd, gpa, len(data))
        self._memory.write(gpa, data)
        self._digest.update(data)

    def launch_update_vmsa(self, vmsa: bytes) -> None:
        """LAUNCH_UPDATE_VMSA (SEV-ES only): measure a vCPU's initial register state."""
        cmd = "LAUNCH_UPDATE_VMSA"
        self._require(cmd, GuestState.LUPDATE)
        if not self.policy & SevPolicyFlag.ES:
            raise SecureProcessorError(cmd, SevStatus.POLICY_FAILURE, "the guest policy is not SEV-ES")
        _check_region(cmd, 0, len(vmsa))
        self._digest.update(vmsa)

    def launch_measure(self) -> bytes:
        """LAUNCH_MEASURE: MEASURE[32] || MNONCE[16]; the digest is final from here on."""
        cmd = "LAUNCH_MEASURE"
        self._require(cmd, GuestState.LUPDATE)
        assert self._keys is not None  # set by LAUNCH_START
        mnonce = self._psp._random(16)
        measure = launch_crypto.measure_mac(
            self._keys.tik, self._psp.version, self.policy, self._digest.digest(), mnonce
        )
        self._measure = measure
        self.state = GuestState.LSECRET
        return measure + mnonce

    def launch_secret(self, header: bytes, ciphertext: bytes, gpa: int) -> None:
        """LAUNCH_SECRET: check the packet's MAC, then decrypt it into guest memory at ``gpa``.

        Nothing is written unless the MAC verifies, and the MAC binds the packet to this launch's MEASURE.
        """
        cmd = "LAUNCH_SECRET"
        self._require(cmd, GuestState.LSECRET)
        assert self._keys is not None and self._measure is not None
        try:
            packet = SecretPacket.from_parts(header, ciphertext)
        except ValueError as err:
            raise SecureProcessorError(cmd, SevStatus.INVALID_LENGTH, str(err)) from err
        if packet.flags & launch_crypto.SECRET_FLAG_COMPRESSED:
            raise SecureProcessorError(cmd, SevStatus.UNSUPPORTED, "compressed secrets are not supported")
        _check_region(cmd, gpa, len(ciphertext))
        want = launch_crypto.secret_mac(
            self._keys.tik, packet.flags, packet.iv, len(ciphertext), ciphertext, self._measure
        )
        if not hmac.compare_digest(want, packet.mac):
            raise SecureProcessorError(
                cmd,
                SevStatus.BAD_MEASUREMENT,
                "the secret packet's MAC does not verify: it was altered, or made for another launch",
                hint="ask the key broker to release a packet for this launch's measurement",
            )
        self._memory.write(gpa, launch_crypto.aes128_ctr(self._keys.tek, packet.iv, ciphertext))

    def launch_finish(self) -> None:
        """LAUNCH_FINISH: the guest may run; no more launch commands are accepted."""
        self._require("LAUNCH_FINISH", GuestState.LSECRET)
        self.state = GuestState.RUNNING


class SnpGuest(_Guest):
    """One SEV-SNP guest's launch on the emulated secure processor."""

    kind = "SNP"

    def __init__(self, psp: EmulatedSecureProcessor, memory: GuestMemory) -> None:
        super().__init__(psp, memory)
        self.policy = 0
        self.host_data = bytes(32)
        self._gctx = snp.SnpLaunchDigest()
        self._vmpck0: bytes | None = None  # set by the SECRETS page; the guest's messages are sealed with it
        self._last_seqno = 0
        self.report_id = self._psp._random(32)

    def _debug_allowed(self) -> bool:
        return bool(self.policy & SnpPolicyFlag.DEBUG)

    @property
    def launch_digest(self) -> bytes:
        return self._gctx.digest

    def launch_start(self, policy: int, host_data: bytes = b"") -> None:
        """SNP_LAUNCH_START: check the policy word; remember HOST_DATA for every report."""
        cmd = "SNP_LAUNCH_START"
        self._require(cmd, GuestState.UNINIT)
        if not policy & SNP_RESERVED_ONE:
            raise SecureProcessorError(cmd, SevStatus.POLICY_FAILURE, "SNP policy bit 17 must be one")
        fields = decode_snp_policy(policy)
        _check_api(cmd, (fields["api_major"], fields["api_minor"]), self._psp.version)
        if len(host_data) > 32:
            raise SecureProcessorError(cmd, SevStatus.INVALID_LENGTH, "HOST_DATA is at most 32 bytes")
        self.policy, self.host_data = policy, host_data.ljust(32, b"\x00")
        self.state = GuestState.LUPDATE

    def launch_update(self, gpa: int, data: bytes, page_type: snp.PageType = snp.PageType.NORMAL) -> None:
        """SNP_LAUNCH_UPDATE: place pages at ``gpa`` and extend the SHA-384 page-info chain."""
        cmd = "SNP_LAUNCH_UPDATE"
        self._require(cmd, GuestState.LUPDATE)
        if gpa % snp.PAGE_SIZE:
            raise SecureProcessorError(cmd, SevStatus.INVALID_ADDRESS, f"GPA {gpa:#x} is not page-aligned")
        if page_type == snp.PageType.NORMAL:
            self._memory.write(gpa, data)  # first, so a bad GPA leaves the digest untouched
        elif page_type == snp.PageType.SECRETS:
            if self._vmpck0 is not None or data:
                raise SecureProcessorError(cmd, SevStatus.INVALID_PARAM, "one SECRETS page, given no data")
            vmpcks = [self._psp._random(snp_guest_msg.VMPCK_LEN) for _ in range(4)]
            self._memory.write(gpa, snp_guest_msg.secrets_page(vmpcks))
            self._vmpck0 = vmpcks[0]
        self._gctx.update_region(gpa, data, page_type)

    def launch_finish(self) -> None:
        self._require("SNP_LAUNCH_FINISH", GuestState.LUPDATE)
        self.state = GuestState.RUNNING

    def attestation_report(self, report_data: bytes) -> bytes:
        """A report carrying ``report_data``, signed by the emulated VCEK (what MSG_REPORT_REQ answers)."""
        cmd = "SNP_GUEST_REQUEST(MSG_REPORT_REQ)"
        self._require(cmd, GuestState.RUNNING)
        if len(report_data) > 64:
            raise SecureProcessorError(cmd, SevStatus.INVALID_LENGTH, "REPORT_DATA is at most 64 bytes")
        report = snp.SnpReport(
            policy=self.policy,
            measurement=self._gctx.digest,
            report_data=report_data.ljust(64, b"\x00"),
            host_data=self.host_data,
            chip_id=snp.EMULATED_CHIP_ID,
            report_id=self.report_id,
        )
        return self._psp._sign_report(report)

    def guest_request(self, request: bytes) -> bytes:
        """SNP_GUEST_REQUEST: open the guest's MSG_REPORT_REQ under VMPCK0 (its sequence number must be the
        next one), answer MSG_REPORT_RSP sealed under VMPCK0 with the following number."""
        cmd = "SNP_GUEST_REQUEST"
        self._require(cmd, GuestState.RUNNING)
        if self._vmpck0 is None:
            raise SecureProcessorError(cmd, SevStatus.INVALID_GUEST_STATE, "the launch had no SECRETS page")
        try:
            msg = snp_guest_msg.open_msg(request, self._vmpck0)
        except snp_guest_msg.GuestMsgError as err:
            raise SecureProcessorError(cmd, SevStatus.INVALID_PARAM, str(err)) from None
        if msg.seqno != self._last_seqno + 1 or msg.vmpck != 0:
            raise SecureProcessorError(
                cmd, SevStatus.INVALID_PARAM,
                f"message number {msg.seqno} (VMPCK{msg.vmpck}), expected {self._last_seqno + 1} (VMPCK0)",
            )  # fmt: skip
        if msg.msg_type != snp_guest_msg.MsgType.REPORT_REQ or len(msg.payload) != 0x60:
            raise SecureProcessorError(cmd, SevStatus.INVALID_PARAM, f"unexpected {msg.msg_type.name}")
        self._last_seqno = msg.seqno + 1  # the answer's number; an IV is never used twice under VMPCK0
        vmpl = int.from_bytes(msg.payload[64:68], "little")
        status, report = (0, self.attestation_report(msg.payload[:64])) if vmpl == 0 else (0x16, b"")
        answer = snp_guest_msg.GuestMsg(
            msg.seqno + 1, snp_guest_msg.MsgType.REPORT_RSP,
            snp_guest_msg.report_response(report.ljust(snp_guest_msg.REPORT_LEN, b"\x00"), status),
        )  # fmt: skip
        return snp_guest_msg.seal(answer, self._vmpck0)
