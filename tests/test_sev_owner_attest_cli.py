"""confplan owner measure, verify-chain, verify-report: summaries, JSON, exit 2 naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from confplan.cli import main
from confplan.sev import anchors

AMD = Path(__file__).parent / "data" / "amd"
MEASURE = Path(__file__).parent / "data" / "measure"
MILAN_MEASUREMENT = (
    "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f"
)


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_measure_like_sev_snp_measure(capsys: pytest.CaptureFixture[str]) -> None:
    ovmf = MEASURE / "ovmf_AmdSev_suffix.bin"
    args = [
        "owner",
        "measure",
        "--mode",
        "snp",
        "--ovmf",
        ovmf,
        "--kernel",
        "/dev/null",
        "--initrd",
        "/dev/null",
    ]
    code, out, _ = run(
        capsys,
        *args,
        "--append",
        "console=ttyS0 loglevel=7",
        "--vcpus",
        "1",
        "--vcpu-type",
        "EPYC-v4",
        "--guest-features",
        "0x21",
    )
    assert code == 0 and out.splitlines()[0].startswith("803f691094946e42068aaa3a8f9e26a5")
    code, out, _ = run(capsys, *args, "--vcpus", "4", "--vmm-type", "gce", "--append", "", "-o", "json")
    assert code == 0 and json.loads(out)["measurement"].startswith("5c5debf100fc339f")
    code, out, _ = run(capsys, "owner", "measure", "--mode", "sev", "--ovmf", ovmf, "--kernel", "/dev/null")
    assert code == 0 and out.startswith("77f613d7bbcdf12a")
    code, _, err = run(capsys, *args, "--vcpus", "1")
    assert code == 2 and "--vcpu-type" in err and "hint:" in err
    code, _, err = run(
        capsys,
        "owner",
        "measure",
        "--mode",
        "snp",
        "--ovmf",
        MEASURE / "ovmf_OvmfX64_suffix.bin",
        "--kernel",
        "/dev/null",
        "--vcpus",
        "1",
        "--vcpu-type",
        "EPYC-v4",
    )
    assert code == 2 and "SNP_KERNEL_HASHES" in err and "Traceback" not in err


def test_verify_chain_sev_and_snp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = anchors.sev_ca("rome")
    chain = (
        b"".join((AMD / f"rome_{c}.cert").read_bytes() for c in ("pdh", "pek", "oca", "cek"))
        + ca.ask.raw
        + ca.ark.raw
    )
    (tmp_path / "rome.chain").write_bytes(chain)
    code, out, _ = run(capsys, "owner", "verify-chain", "--platform-chain", tmp_path / "rome.chain")
    assert code == 0 and "AMD Rome ARK" in out
    bad = bytearray(chain)
    bad[0x824 + 6] ^= 1  # PEK reserved byte
    (tmp_path / "bad.chain").write_bytes(bytes(bad))
    code, out, err = run(
        capsys, "owner", "verify-chain", "--platform-chain", tmp_path / "bad.chain", "-o", "json"
    )
    assert code == 2 and json.loads(out)["verified"] is False and "PEK is not signed by the" in err
    code, out, _ = run(
        capsys,
        "owner",
        "verify-chain",
        "--vek",
        AMD / "vcek_turin.der",
        "--cert-chain",
        AMD / "cert_chain_turin",
        "-o",
        "json",
    )
    assert code == 0 and json.loads(out)["ark_sha256"] == anchors.SNP_PINS["turin"][0]


def test_verify_report(capsys: pytest.CaptureFixture[str]) -> None:
    report, vcek = AMD / "report_milan.hex", AMD / "vcek_milan.der"
    code, out, _ = run(
        capsys,
        "owner",
        "verify-report",
        report,
        "--vek",
        vcek,
        "--expect-measurement",
        MILAN_MEASUREMENT,
        "--policy",
        "0x30000",
        "--min-tcb",
        "snp=8",
    )
    assert code == 0 and "report verified" in out and "measurement" in out
    code, out, err = run(
        capsys,
        "owner",
        "verify-report",
        report,
        "--vek",
        vcek,
        "--expect-measurement",
        "00" * 48,
        "-o",
        "json",
    )
    assert code == 2 and json.loads(out)["field"] == "measurement" and "hint" in json.loads(out)
    assert "report measurement:" in err
    code, _, err = run(capsys, "owner", "verify-report", report, "--vek", vcek, "--min-tcb", "microcode=200")
    assert code == 2 and "reported_tcb.microcode: 115, below the minimum 200" in err


def test_emulated_platform_needs_the_flag_and_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from confplan.sev.memory import BytearrayGuestMemory
    from confplan.sev.policy import encode_snp_policy
    from confplan.sev.psp import EmulatedSecureProcessor

    psp = EmulatedSecureProcessor.open(tmp_path / "psp")
    guest = psp.new_snp_guest(BytearrayGuestMemory(0x4000))
    guest.launch_start(encode_snp_policy())
    guest.launch_finish()
    (tmp_path / "report.bin").write_bytes(guest.attestation_report(b"r"))
    for name, pem in zip(("ark", "ask", "vcek"), psp.snp_cert_chain(), strict=True):
        (tmp_path / f"{name}.pem").write_bytes(pem)
    args = [
        "owner",
        "verify-report",
        tmp_path / "report.bin",
        "--vek",
        tmp_path / "vcek.pem",
        "--ark",
        tmp_path / "ark.pem",
        "--ask",
        tmp_path / "ask.pem",
    ]
    code, _, err = run(capsys, *args)
    assert code == 2 and "not one of AMD's built-in ARKs" in err and "--trust-emulated-platform" in err
    code, out, err = run(
        capsys, *args, "--trust-emulated-platform", "--expect-measurement", guest.launch_digest.hex()
    )
    assert code == 0 and "EMULATED" in out and "WARNING" in err
