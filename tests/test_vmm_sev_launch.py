"""The measured SEV launch of the VMM's guests on the EMULATED secure processor, with the real broker:
digest prediction, secret injection into the secret page, refusals (changed firmware, NODBG, early start).
Small guests (32 MiB)."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import pytest

from confplan.errors import ConfplanError
from confplan.sev import EmulatedSecureProcessor, KeyBroker, OwnerPolicy, find_transport_key, launch_crypto
from confplan.sev.broker import AttestationRefused
from confplan.sev.policy import encode_sev_policy
from confplan.sev.psp import GuestState, SecureProcessorError, SevStatus
from confplan.vmm import Machine, MachineConfig, abi
from confplan.vmm.bootparams import HostCpu
from confplan.vmm.exits import GuestFault
from confplan.vmm.firmware import Firmware
from confplan.vmm.launch_blobs import expected_launch_digest, launch_blobs
from confplan.vmm.sev_launch import MeasuredLaunch, launch_with_broker

MEM = 32 * abi.MIB
NODBG = encode_sev_policy(nodbg=True, noks=True, api_major=1, api_minor=40)
DEBUGGABLE = encode_sev_policy(noks=True, api_major=1, api_minor=40)
HOST = HostCpu(tsc_khz=2_000_000, features=abi.FEATURE_BITS["aes-ni"], vendor_amd=True)
SOURCE = MachineConfig(memory=MEM, workload_kind="probe-mh", aux_vcpus=1, measured_launch=True)
TARGET = MachineConfig(
    memory=MEM, workload_kind="probe-mh", helper_mode="mirror-vm", mh_only=True, measured_launch=True
)
KEY = bytes(range(32))


def secret_page(m: Machine) -> bytes:
    """Through the raw host mapping, as only a test may: the VMM's own API refuses this page."""
    return m.ram.read(abi.SECRET_GPA, abi.PAGE)


def owner(tmp: Path, digests: list[str], policy: int = NODBG) -> KeyBroker:
    policy_file = OwnerPolicy(
        allowed_digests=digests, allowed_policies=[policy], min_api="1.40", trust_emulated_platform=True
    )
    return KeyBroker.init(tmp, policy_file)


# ---- pure: no KVM ----
def test_blobs_are_the_firmware_then_the_boot_page_padded_then_the_cpu_tables() -> None:
    fw = Firmware.load()
    blobs = launch_blobs(SOURCE, fw, HOST)
    assert [b.name for b in blobs[:2]] == ["firmware", "boot-params"]
    assert [b.gpa for b in blobs[:2]] == [abi.FW_BASE, abi.BOOT_PARAMS_GPA]
    tables = blobs[2:]
    assert tables and {b.name for b in tables} == {"cpu-tables"}
    assert all(b.gpa % abi.PAGE == 0 and len(b.data) % abi.PAGE == 0 for b in tables)
    assert [b.gpa for b in tables] == sorted(b.gpa for b in tables)  # GPA order, runs merged
    covered = [(b.gpa, b.gpa + len(b.data)) for b in tables]
    for gpa in (abi.GDT_GPA, abi.IDT_GPA, abi.TSS_GPA, abi.PT_WL_GPA, abi.PT_MH_GPA):
        assert any(lo <= gpa < hi for lo, hi in covered), hex(gpa)
    image, padding = blobs[0].data[: len(fw.image)], blobs[0].data[len(fw.image) :]
    assert image == fw.image and padding == bytes(-len(fw.image) % 16)
    assert len(blobs[1].data) == abi.PAGE
    bp = abi.BootParams.from_buffer_copy(blobs[1].data)
    assert (bp.magic, bp.tsc_khz, bp.cpu_features) == (abi.BP_MAGIC, 2_000_000, abi.FEATURE_BITS["aes-ni"])
    assert bp.flags == abi.BP_FLAG_VENDOR_AMD and bp.nr_vcpus == 1 and bp.mh_vcpus == 1


def test_the_cpu_tables_are_measured() -> None:
    """A host that changes a page-table entry (say, to map the secret page for the workload) or the vCPU
    count behind the TSSs launches a guest with another digest, which the owner's broker refuses."""
    fw = Firmware.load()
    blobs = launch_blobs(SOURCE, fw, HOST)
    digest = launch_crypto.sev_launch_digest([b.data for b in blobs])
    assert digest == expected_launch_digest(SOURCE, fw, HOST)
    # the workload's PD entry for the 2 MiB around the secret page: absent, now mapped user-accessible
    pd_entry = abi.PT_WL_GPA + 3 * abi.PAGE + 8 * (abi.SECRET_GPA // abi.HUGE)  # v8: PML4, PDPT, PT, PDs
    table = next(i for i, b in enumerate(blobs) if b.gpa <= pd_entry < b.gpa + len(b.data))
    at = pd_entry - blobs[table].gpa
    assert blobs[table].data[at : at + 8] == bytes(8)
    mapped = (abi.SECRET_GPA // abi.HUGE * abi.HUGE | 0x87).to_bytes(8, "little")
    tampered = [b.data for b in blobs]
    tampered[table] = tampered[table][:at] + mapped + tampered[table][at + 8 :]
    assert launch_crypto.sev_launch_digest(tampered) != digest
    more_vcpus = dataclasses.replace(SOURCE, aux_vcpus=2)
    assert launch_blobs(more_vcpus, fw, HOST)[2:] != blobs[2:]


def test_expected_digest_tells_source_target_and_firmware_apart() -> None:
    fw = Firmware.load()
    source, target = expected_launch_digest(SOURCE, fw, HOST), expected_launch_digest(TARGET, fw, HOST)
    assert source == expected_launch_digest(dataclasses.replace(SOURCE), fw, HOST)  # deterministic
    # what `confplan owner digest fw.bin boot.bin` computes: SHA-256 over the blobs in measured order
    assert source == hashlib.sha256(b"".join(b.data for b in launch_blobs(SOURCE, fw, HOST))).digest()
    assert len({source, target}) == 2
    tampered = dataclasses.replace(fw, image=fw.image[:-1] + bytes([fw.image[-1] ^ 1]))
    assert expected_launch_digest(SOURCE, tampered, HOST) != source
    assert expected_launch_digest(SOURCE, fw, dataclasses.replace(HOST, tsc_khz=1)) != source


# ---- on KVM ----
@pytest.mark.kvm
def test_measured_launch_puts_the_key_in_the_secret_page_and_the_workload_cannot_read_it(
    psp: EmulatedSecureProcessor, host: HostCpu, tmp_path: Path
) -> None:
    fw = Firmware.load()
    broker = owner(tmp_path, [expected_launch_digest(SOURCE, fw, host).hex()])
    with Machine(SOURCE) as m:
        assert m.host == host  # what the owner predicted from is what the machine writes
        assert m.ram.read(abi.FW_BASE, 64) == bytes(64)  # nothing placed before LAUNCH_UPDATE_DATA
        with pytest.raises(ConfplanError, match="measured launch not begun"):
            m.start()
        record = launch_with_broker(m, psp, broker, NODBG, KEY)
        assert m.launch is not None and m.launch.guest.state is GuestState.RUNNING
        assert record.digest == expected_launch_digest(SOURCE, fw, host).hex()
        for blob in m.launch_blobs():  # placed by the secure processor, byte for byte
            assert m.ram.read(blob.gpa, len(blob.data)) == blob.data
        assert find_transport_key(secret_page(m)) == KEY
        with pytest.raises(ConfplanError, match="overlaps the secret page"):
            m.read(abi.SECRET_GPA + 0x800, 16)
        with pytest.raises(ConfplanError, match="overlaps the secret page"):
            m.view(abi.SECRET_GPA - abi.PAGE, 2 * abi.PAGE)
        m.start()
        err = _wait_error(m)
    assert isinstance(err, GuestFault) and err.vector == 14 and err.cr2 == abi.SECRET_GPA and err.cs & 3 == 3


@pytest.mark.kvm
def test_both_source_and_mh_only_target_digests_are_predicted(
    psp: EmulatedSecureProcessor, host: HostCpu, tmp_path: Path
) -> None:
    fw = Firmware.load()
    want = {cfg.mh_only: expected_launch_digest(cfg, fw, host).hex() for cfg in (SOURCE, TARGET)}
    broker = owner(tmp_path, list(want.values()))
    for cfg in (SOURCE, TARGET):
        with Machine(cfg) as m:
            record = launch_with_broker(m, psp, broker, NODBG, KEY)
            assert record.digest == want[cfg.mh_only]  # the digest the emulated PSP measured
            assert find_transport_key(secret_page(m)) == KEY
            if cfg.mh_only:
                m.start()
                m.wait_helpers_ready()
                assert m.helpers[0].mode == "mirror-vm" and m.helpers[0].ping()


@pytest.mark.kvm
def test_one_changed_firmware_byte_changes_the_measurement_and_the_broker_refuses(
    psp: EmulatedSecureProcessor, host: HostCpu, tmp_path: Path
) -> None:
    fw = Firmware.load()
    broker = owner(tmp_path, [expected_launch_digest(SOURCE, fw, host).hex()])
    last = len(fw.image) - 1
    tampered = dataclasses.replace(fw, image=fw.image[:last] + bytes([fw.image[last] ^ 0x80]))
    with Machine(SOURCE, firmware=tampered) as m:
        with pytest.raises(AttestationRefused, match="matches none of the 1 allowed_digests"):
            launch_with_broker(m, psp, broker, NODBG, KEY)
        assert secret_page(m) == bytes(abi.PAGE)  # no secret was released
        assert m.launch is not None and m.launch.guest.state is GuestState.LSECRET
        with pytest.raises(ConfplanError, match="in state LSECRET"):
            m.start()


@pytest.mark.kvm
def test_nodbg_refuses_the_vmms_debug_reads(psp: EmulatedSecureProcessor, tmp_path: Path) -> None:
    with Machine(SOURCE) as m:
        launch = MeasuredLaunch(m, psp)
        bundle = owner(tmp_path / "nodbg", [], NODBG).new_session(psp.platform_chain(), NODBG)
        launch.measure(NODBG, bundle.godh_cert, bundle.session_blob)
        with pytest.raises(SecureProcessorError) as err:
            m.debug_read(abi.BOOT_PARAMS_GPA, 16)
        assert err.value.status is SevStatus.POLICY_FAILURE
    with Machine(SOURCE) as m:
        launch = MeasuredLaunch(m, psp)
        bundle = owner(tmp_path / "dbg", [], DEBUGGABLE).new_session(psp.platform_chain(), DEBUGGABLE)
        launch.measure(DEBUGGABLE, bundle.godh_cert, bundle.session_blob)
        assert m.debug_read(abi.BOOT_PARAMS_GPA, abi.PAGE) == m.launch_blobs()[1].data
        with pytest.raises(ConfplanError, match="overlaps the secret page"):
            m.debug_read(abi.SECRET_GPA, 16)  # even a permitted debug read: the VMM never reads the key


@pytest.mark.kvm
def test_an_unmeasured_machine_refuses_a_launch(psp: EmulatedSecureProcessor) -> None:
    with Machine(dataclasses.replace(SOURCE, measured_launch=False)) as m:
        with pytest.raises(ConfplanError, match="unmeasured boot"):
            MeasuredLaunch(m, psp)
        assert m.ram.read(abi.FW_BASE, len(m.firmware.image)) == m.firmware.image


def _wait_error(m: Machine, timeout: float = 10.0) -> BaseException | None:
    deadline = time.monotonic() + timeout
    while m.error is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return m.error


PLAN = """\
apiVersion: confplan/v1
kind: MigrationPlan
metadata: {name: measured-launch}
guest:
  memory: 32MiB
  vcpus: 1
  workload: {kind: idle}
helper: {mode: mirror-vm, aux_vcpus: 2, batch_pages: 16}
sev: {generation: GENERATION}
"""


@pytest.mark.kvm
def test_confplan_launch_is_measured_and_says_emulated(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from confplan.cli import app

    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN.replace("GENERATION", "sev"))
    result = CliRunner().invoke(app, ["launch", str(plan), "--duration", "0.3", "--interval", "0.15"])
    assert result.exit_code == 0, result.output
    assert "measured launch on the EMULATED secure processor" in result.output
    assert (tmp_path / ".confplan" / "plan.measured-launch" / "emulated-psp-keys.bin").is_file()  # its own
    assert "mirror VM with 2 vCPUs" in result.output and "mirror VM ready 2/2" in result.output
    plan.write_text(PLAN.replace("GENERATION", "sev-snp"))
    result = CliRunner().invoke(app, ["launch", str(plan), "--duration", "0.3", "--interval", "0.15"])
    assert result.exit_code == 0, result.output
    assert "SEV-SNP launch on the EMULATED secure processor" in result.output
    assert "checked the helper's report and released" in result.output


@pytest.mark.kvm
def test_the_console_will_not_print_the_secret_page() -> None:
    with Machine(dataclasses.replace(SOURCE, measured_launch=False)) as m:
        m.console.mmio_write(m.vcpus[0], 0, 8, abi.SECRET_GPA | 32 << 48)
        assert m.console.wait_for("console line refused", timeout=1) is not None
        assert "overlaps the secret page" in m.console.text()
