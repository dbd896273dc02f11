"""The firmware build: reproducible bytes, symbols the VMM needs, and the ABI header mirrored exactly
by confplan/vmm/abi.py (checked against the ABI_* symbols the built image exports)."""

from __future__ import annotations

import ctypes
import hashlib
import subprocess
from pathlib import Path

import pytest

from confplan.errors import EnvironmentProblem
from confplan.vmm import abi
from confplan.vmm.firmware import Firmware, parse_symbols

FIRMWARE_DIR = Path(__file__).resolve().parents[1] / "firmware"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh build in a temporary directory (also proves the Makefile builds from scratch)."""
    out = tmp_path_factory.mktemp("fw")
    subprocess.run(["make", "-s", "-C", str(FIRMWARE_DIR), f"BUILD={out}"], check=True, capture_output=True)
    return out


def test_build_is_reproducible(built: Path, tmp_path: Path) -> None:
    subprocess.run(
        ["make", "-s", "-C", str(FIRMWARE_DIR), f"BUILD={tmp_path}"], check=True, capture_output=True
    )
    for name in ("confplan-fw.bin", "confplan-fw.elf", "confplan-fw.sym"):
        a, b = (built / name).read_bytes(), (tmp_path / name).read_bytes()
        assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest(), name


def test_abi_constants_match_header(built: Path) -> None:
    symbols = parse_symbols((built / "confplan-fw.sym").read_text())
    for name, value in abi.ABI.items():
        assert symbols[f"ABI_{name}"] == value, name


def test_feature_bits_and_flags_match_header(built: Path) -> None:
    """FEATURE_BITS (boot-params cpu_features) against the header's CP_FEAT_*, and the SNP flag."""
    symbols = parse_symbols((built / "confplan-fw.sym").read_text())
    exported = {k.removeprefix("ABI_feat_"): v for k, v in symbols.items() if k.startswith("ABI_feat_")}
    ours = {name.replace(".", "").replace("-", ""): bit for name, bit in abi.FEATURE_BITS.items()}
    assert ours == exported
    assert abi.FEATURE_BITS["rdrand"] == 1 << 11
    assert symbols["ABI_flag_snp"] == abi.BP_FLAG_SNP == 0x8
    flags = (abi.BP_FLAG_MH_ONLY, abi.BP_FLAG_ENC_HYPERCALL, abi.BP_FLAG_VENDOR_AMD, abi.BP_FLAG_SNP)
    assert sum(flags) == 0xF  # one bit each


@pytest.mark.parametrize("prefix", sorted(abi.ABI_STRUCTS))
def test_abi_struct_layouts_match_header(built: Path, prefix: str) -> None:
    symbols = parse_symbols((built / "confplan-fw.sym").read_text())
    struct = abi.ABI_STRUCTS[prefix]
    assert symbols[f"ABI_{prefix}_size"] == ctypes.sizeof(struct)
    exported = {
        k.removeprefix(f"ABI_{prefix}_"): v for k, v in symbols.items() if k.startswith(f"ABI_{prefix}_")
    }
    assert len(exported) > 3
    for field, offset in exported.items():
        if field != "size":
            assert getattr(struct, field).offset == offset, field


def test_image_layout(built: Path) -> None:
    fw = Firmware.load(built)
    assert fw.sym("__fw_start") == abi.FW_BASE
    assert fw.sym("isr_stubs_end") - fw.sym("isr_stubs") == 256 * 16
    assert fw.sym("__boot_end") <= fw.sym("__utext_start") <= fw.sym("wl_entry") < fw.sym("__utext_end")
    assert abi.MH_BASE <= fw.sym("mh_entry") < fw.sym("__mh_end") <= abi.MH_BASE + abi.MH_IMAGE_SIZE
    assert len(fw.sha256) == 64


def test_missing_firmware_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentProblem) as err:
        Firmware.load(tmp_path)
    assert "not built" in err.value.message and "make -C firmware" in err.value.render()


def test_foreign_abi_version_is_refused(built: Path, tmp_path: Path) -> None:
    (tmp_path / "confplan-fw.bin").write_bytes((built / "confplan-fw.bin").read_bytes())
    sym = (built / "confplan-fw.sym").read_text()
    version_line = next(line for line in sym.splitlines() if line.endswith(" ABI_version"))
    (tmp_path / "confplan-fw.sym").write_text(sym.replace(version_line, f"{99:016x} A ABI_version"))
    with pytest.raises(EnvironmentProblem, match="ABI v99"):
        Firmware.load(tmp_path)


def _symbols(objects: list[Path], *flags: str) -> set[str]:
    run = subprocess.run(["nm", *flags, *map(str, objects)], capture_output=True, text=True, check=True)
    out = run.stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip() and not line.endswith(":")}


def test_workload_code_never_calls_into_the_helpers_vector_code(built: Path) -> None:
    """The workload keeps a pattern in ymm15 (its code is built with -ffixed-xmm15); the helper's crypto
    uses every vector register and runs only on the helper's own vCPUs, whose register state KVM keeps
    apart. That holds only while no workload code calls helper code: no symbol the workload's objects need
    comes from the helper's objects."""
    user = sorted((built / "obj" / "user").glob("*.o"))
    helper = sorted((built / "obj" / "mh").glob("*.o"))
    assert user and helper
    assert _symbols(user, "-u") & _symbols(helper, "--defined-only", "-g") == set()
