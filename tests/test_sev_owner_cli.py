"""``confplan owner``: the offline broker driven through files, against the emulated secure processor."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import pytest

from confplan.cli import main
from confplan.sev.memory import BytearrayGuestMemory
from confplan.sev.policy import encode_sev_policy
from confplan.sev.psp import EmulatedSecureProcessor, SevGuest
from confplan.sev.secret_table import find_transport_key

FIRMWARE = hashlib.shake_256(b"cli firmware").digest(0x3000)
BOOT = b"boot".ljust(4096, b"\x00")
POLICY = encode_sev_policy(nodbg=True, noks=True, api_major=1, api_minor=40)
SECRET_GPA = 0x8000


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def world(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Path]:
    """A platform, the files its host exports, and an initialised owner directory."""
    psp_dir, owner = tmp_path / "psp", tmp_path / "owner"
    psp = EmulatedSecureProcessor.open(psp_dir)
    files = {"psp": psp_dir, "owner": owner, "chain": tmp_path / "chain.cert", "ark": tmp_path / "ark.cert"}
    files["chain"].write_bytes(psp.platform_chain().pack())
    files["ark"].write_bytes(psp.platform_chain().ark.pack())
    (tmp_path / "fw.bin").write_bytes(FIRMWARE)
    (tmp_path / "boot.bin").write_bytes(BOOT)
    code, digest, _ = run(capsys, "owner", "digest", tmp_path / "fw.bin", tmp_path / "boot.bin")
    assert code == 0
    init = ["owner", "init", "--owner-dir", owner, "--allow-digest", digest.strip()]
    code, out, _ = run(
        capsys, *init, "--allow-policy", hex(POLICY), "--min-api", "1.40", "--trust-ark", files["ark"]
    )
    assert code == 0, out
    return files


def host_launch(
    psp_dir: Path, session_dir: Path, firmware: bytes
) -> tuple[SevGuest, BytearrayGuestMemory, bytes]:
    """The host side: LAUNCH_START with the owner's files, measure the firmware and boot page."""
    psp = EmulatedSecureProcessor.open(psp_dir)
    memory = BytearrayGuestMemory(0x40000)
    guest = psp.new_guest(memory)
    godh = base64.b64decode((session_dir / "godh.b64").read_text())
    session = base64.b64decode((session_dir / "session.b64").read_text())
    guest.launch_start(POLICY, godh, session)
    guest.launch_update_data(0x10000, firmware)
    guest.launch_update_data(0x7000, BOOT)
    return guest, memory, guest.launch_measure()


def test_owner_flow_through_files(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert stat.S_IMODE((world["owner"] / "owner.key").stat().st_mode) == 0o600
    policy = json.loads((world["owner"] / "policy.json").read_text())
    assert policy["allowed_policies"] == [hex(POLICY)] and policy["min_api"] == "1.40"
    sess = tmp_path / "launch1"
    code, out, err = run(
        capsys, "owner", "session", "--owner-dir", world["owner"], "--platform-chain", world["chain"],
        "--policy", hex(POLICY), "--out", sess,
    )  # fmt: skip
    assert code == 0, err
    assert "give the host" in out and "godh.b64" in out
    assert stat.S_IMODE((sess / "session.state").stat().st_mode) == 0o600
    guest, memory, measurement = host_launch(world["psp"], sess, FIRMWARE)
    (tmp_path / "measure.b64").write_text(base64.b64encode(measurement).decode())  # as QMP returns it
    (tmp_path / "tk.hex").write_text(bytes(range(32)).hex() + "\n")
    code, _, err = run(
        capsys, "owner", "release", "--owner-dir", world["owner"], "--session-state", sess / "session.state",
        "--measurement", tmp_path / "measure.b64", "--api", "1.55", "--build", "21",
        "--transport-key", tmp_path / "tk.hex", "--out", tmp_path / "secret",
    )  # fmt: skip
    assert code == 0, err
    header = base64.b64decode((tmp_path / "secret" / "secret_header.b64").read_text())
    secret = base64.b64decode((tmp_path / "secret" / "secret.b64").read_text())
    guest.launch_secret(header, secret, SECRET_GPA)
    assert find_transport_key(memory.read(SECRET_GPA, 4096)) == bytes(range(32))


def test_release_refuses_a_changed_firmware(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sess = tmp_path / "launch"
    args = ["--owner-dir", world["owner"], "--platform-chain", world["chain"], "--policy", hex(POLICY)]
    assert run(capsys, "owner", "session", *args, "--out", sess)[0] == 0
    firmware = bytearray(FIRMWARE)
    firmware[100] ^= 0x40
    _, _, measurement = host_launch(world["psp"], sess, bytes(firmware))
    (tmp_path / "m.bin").write_bytes(measurement)
    (tmp_path / "tk.bin").write_bytes(bytes(32))
    code, _, err = run(
        capsys, "owner", "release", "--owner-dir", world["owner"], "--session-state", sess / "session.state",
        "--measurement", tmp_path / "m.bin", "--api", "1.55", "--build", "21",
        "--transport-key", tmp_path / "tk.bin", "--out", tmp_path / "secret",
    )  # fmt: skip
    assert code == 2
    assert "matches none of the 1 allowed_digests" in err and "hint:" in err and "Traceback" not in err
    assert not (tmp_path / "secret").exists()


def test_session_refuses_a_policy_not_allowed(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--owner-dir", world["owner"], "--platform-chain", world["chain"], "--out", tmp_path / "s"]
    code, _, err = run(capsys, "owner", "session", *args, "--policy", "0x0")
    assert code == 2 and "guest policy 0x0 is not in allowed_policies" in err
    other = EmulatedSecureProcessor.open(tmp_path / "other-platform").platform_chain()
    (tmp_path / "other.cert").write_bytes(other.pack())
    args[3] = str(tmp_path / "other.cert")
    code, _, err = run(capsys, "owner", "session", *args, "--policy", hex(POLICY))
    assert code == 2 and "not in trusted_ark_sha256" in err


def test_bad_inputs_are_named(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "short.cert").write_bytes(b"\x01" * 100)
    args = ["--owner-dir", world["owner"], "--policy", hex(POLICY), "--out", tmp_path / "s"]
    code, _, err = run(capsys, "owner", "session", *args, "--platform-chain", tmp_path / "short.cert")
    assert code == 2 and "short.cert" in err and "6 certificates" in err
    code, _, err = run(
        capsys, "owner", "init", "--owner-dir", world["owner"], "--allow-digest", "ab", "--allow-policy", "1"
    )
    assert code == 2 and "'ab' is not a SHA-256 digest" in err and "Value error" not in err
    code, _, err = run(
        capsys,
        "owner",
        "init",
        "--owner-dir",
        world["owner"],
        "--allow-digest",
        "ab" * 32,
        "--allow-policy",
        "1",
    )
    assert code == 2 and "already exists" in err and "--force" in err
    code, _, err = run(
        capsys,
        "owner",
        "session",
        "--owner-dir",
        tmp_path / "nobody",
        *args[2:],
        "--platform-chain",
        world["chain"],
    )
    assert code == 2 and "owner init" in err


def test_help_describes_the_flow(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "owner", "--help")
    assert code == 0 and "session" in out and "release" in out


def test_hand_edited_policy_errors_name_the_field(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = world["owner"] / "policy.json"
    doc = json.loads(path.read_text())
    doc["allowed_policies"] = ["0x28010003", "0x28010001"]  # hex strings are how owners write them
    path.write_text(json.dumps(doc))
    args = ["--owner-dir", world["owner"], "--platform-chain", world["chain"], "--out", tmp_path / "s"]
    assert run(capsys, "owner", "session", *args, "--policy", "0x28010001")[0] == 0
    doc["allowed_digests"] = ["not-a-digest"]
    path.write_text(json.dumps(doc))
    code, _, err = run(capsys, "owner", "session", *args, "--policy", "0x28010001")
    assert code == 2 and "policy.json: allowed_digests: 'not-a-digest' is not a SHA-256 digest" in err


def test_blobs_of_a_plan_give_the_digest_the_orchestrator_predicts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An owner computes the digest to allow from the plan, confplan's firmware and the host's facts."""
    from confplan.plan import load_plan
    from confplan.stages.machines import machine_config
    from confplan.vmm import abi
    from confplan.vmm.bootparams import HostCpu
    from confplan.vmm.firmware import Firmware
    from confplan.vmm.launch_blobs import expected_launch_digest

    plan = Path(__file__).resolve().parent.parent / "plans" / "quickstart.yaml"
    facts = ["--tsc-khz", "2445406", "--features", "aes-ni,pclmulqdq"]
    code, out, err = run(capsys, "owner", "blobs", plan, "--out", tmp_path / "src", *facts)
    assert code == 0, err
    host = HostCpu(tsc_khz=2445406, features=abi.FEATURE_BITS["aes-ni"] | abi.FEATURE_BITS["pclmulqdq"],
                   vendor_amd=True)  # fmt: skip
    config = machine_config(load_plan(plan), measured=True)
    assert out.strip() == expected_launch_digest(config, Firmware.load(), host).hex()
    files = sorted((tmp_path / "src").iterdir())
    assert [f.name.split("-")[1] for f in files[:2]] == ["firmware", "boot"] and len(files) > 2
    assert run(capsys, "owner", "digest", *files)[1] == out  # the files hash to the same digest
    code, target, _ = run(capsys, "owner", "blobs", plan, "--out", tmp_path / "dst", *facts, "--target")
    assert code == 0 and target != out  # the MH-only target has its own digest
    bad = ["--tsc-khz", "1", "--features", "aes"]
    code, _, err = run(capsys, "owner", "blobs", plan, "--out", tmp_path / "x", *bad)
    assert code == 2 and "unknown feature 'aes'" in err and "aes-ni" in err
