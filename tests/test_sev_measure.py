# ruff: noqa: E501  (known-answer tables: digests are kept whole, as the upstream tests print them)
"""Launch digests, VMSAs and ID blocks against the known answers of virtee/sev-snp-measure, virtee/sev
and virtee/sevctl (tests/data/README.md), and sev-snp-measure itself as an oracle where installed."""

from __future__ import annotations

import base64
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from confplan.sev import id_block, measure
from confplan.sev.launch_crypto import PlatformVersion
from confplan.sev.ovmf import Ovmf, OvmfError
from confplan.sev.signing import VerifyError
from confplan.sev.vmsa import CPU_SIGS, VmmType, cpu_sig, vmsa_pages

DATA = Path(__file__).parent / "data" / "measure"
AMDSEV = (DATA / "ovmf_AmdSev_suffix.bin").read_bytes()
X64 = (DATA / "ovmf_OvmfX64_suffix.bin").read_bytes()
V4 = CPU_SIGS["EPYC-v4"]
APPEND = "console=ttyS0 loglevel=7"
OVMF_HASH = bytes.fromhex(
    "086e2e9149ebf45abdc3445fba5b2da8270bdbb04094d7a2c37faaa4b24af3aa16aff8c374c2a55c467a50da6d466b74"
)

# (vcpus, vcpu_sig, features, ovmf, kernel?, append, vmm, from ovmf hash?, expected) from the two projects.
SNP_VECTORS = [
    (1, V4, 0x21, AMDSEV, True, None, VmmType.QEMU, True, "329c8ce0972ae52343b64d34a434a86f245dfd74f5ed7aae15d22efc78fb9683632b9b50e4e1d7fa41179ef98a7ef198"),
    (1, V4, 0x1, AMDSEV, True, None, VmmType.QEMU, True, "ddc5224521617a536ee7ce9dd6224d1b58a8d4fda1c741f3ac99fc4bfa04ba6e9fc98646d4a07a9079397fa3852819b5"),
    (1, V4, 0x21, AMDSEV, True, APPEND, VmmType.QEMU, False, "803f691094946e42068aaa3a8f9e26a5c89f36f7b73ecfb28c653360fe4b3aba7e534442e7e1e17895dfe778d0228977"),
    (1, V4, 0x1, AMDSEV, True, APPEND, VmmType.QEMU, True, "6d287813eb5222d770f75005c664e34c204f385ce832cc2ce7d0d6f354454362f390ef83a92046c042e706363b4b08fa"),
    (1, V4, 0x21, AMDSEV, True, "", VmmType.EC2, False, "0ce9ccc06bab55eebe8abc234f3df6514883977a68a591b71052498ab52b2f1aa415db338033946ef93aa8278c0d67fb"),
    (1, V4, 0x1, AMDSEV, True, "", VmmType.EC2, False, "0883bd0eeb716e65b7b977a321c278d1e51b33b5c655fab985443bbcc65c086b9c15e8a0bd8811050dec7e24964e5056"),
    (1, V4, 0x1, AMDSEV, True, None, VmmType.EC2_RDX0, False, "7d3756157c805bf6adf617064c8552e8c1688fa1c8756f11cbf56ba5d25c9270fb69c0505c1cbe1c5c66c0e34c6ed3be"),
    (1, V4, 0x21, AMDSEV, True, None, VmmType.EC2_RDX0, False, "6ae80856486b1396af8c82a40351d6ed76a20c785e9c7fa4ffa27c22d5d6313b4b3b458cd3c9968e6f89fb5d8450d7a6"),
    (1, 0, 0x1, AMDSEV, True, "", VmmType.GCE, False, "5da7106cf14cf46b1725ebab123eb9e53bd46a1e9f400cd0c08e7827b04b688ea8b4e403c8404efed4397ea5d5d0722e"),
    (4, 0, 0x1, AMDSEV, True, "", VmmType.GCE, False, "5c5debf100fc339f90276e761ee1f1658d08922c3b20e2a2e6c7a6c3370b2452a15a00eae11886a93d6fd1e7ab81e29d"),
    (1, V4, 0x21, AMDSEV, False, None, VmmType.QEMU, False, "e1e1ca029dd7973ab9513295be68198472dcd4fc834bd9af9b63f6e8a1674dbf281a9278a4a2ebe0eed9f22adbcd0e2b"),
    (1, V4, 0x1, AMDSEV, False, None, VmmType.QEMU, False, "19358ba9a7615534a9a1e2f0dfc29384dcd4dcb7062ff9c6013b26869a5fc6ecabe033c48dd6f6db5d6d76e7c5df632d"),
    (4, V4, 0x21, AMDSEV, True, "", VmmType.QEMU, False, "4953b1fb416fa874980e8442b3706d345926d5f38879134e00813c5d7abcbe78eafe7b422907be0b4698e2414a631942"),
    (4, V4, 0x1, AMDSEV, True, "", VmmType.QEMU, False, "5061fffb019493a903613d56d54b94912a1a2f9e4502385f5c194616753720a92441310ba6c4933de877c36e23046ad5"),
    (1, V4, 0x21, X64, False, None, VmmType.QEMU, False, "28797ae0afaba4005a81e629acebfb59e6687949d6be44007cd5506823b0dd66f146aaae26ff291eed7b493d8a64c385"),
    (1, V4, 0x1, X64, False, None, VmmType.QEMU, False, "da0296de8193586a5512078dcd719eccecbd87e2b825ad4148c44f665dc87df21e5b49e21523a9ad993afdb6a30b4005"),
]  # fmt: skip


@pytest.mark.parametrize("vector", SNP_VECTORS, ids=[v[-1][:8] for v in SNP_VECTORS])
def test_snp_known_answers(vector: tuple) -> None:  # type: ignore[type-arg]
    vcpus, sig, features, ovmf, kernel, append, vmm, from_hash, want = vector
    digest = measure.snp_launch_digest(
        ovmf, vcpus=vcpus, vcpu_sig=sig, sev_features=features, kernel=b"" if kernel else None,
        initrd=b"" if kernel else None, append=append, vmm_type=vmm, ovmf_hash=OVMF_HASH if from_hash else None,
    )  # fmt: skip
    assert digest.hex() == want


def test_snp_ovmf_hash_and_refusals() -> None:
    assert measure.snp_ovmf_hash(AMDSEV) == OVMF_HASH
    with pytest.raises(OvmfError, match="doesn't include SNP_KERNEL_HASHES"):
        measure.snp_launch_digest(X64, vcpus=1, vcpu_sig=V4, kernel=b"", initrd=b"")
    with pytest.raises(OvmfError, match="doesn't support kernel/initrd/cmdline"):
        measure.sev_launch_digest(X64, kernel=b"", initrd=b"")
    with pytest.raises(OvmfError, match="doesn't support kernel/initrd/cmdline"):
        measure.seves_launch_digest(X64, vcpus=1, vcpu_sig=0, kernel=b"")


@pytest.mark.parametrize(
    ("kwargs", "want"),
    [
        ({"kernel": b"", "initrd": b"", "append": APPEND}, "82a3ee5d537c3620628270c292ae30cb40c3c878666a7890ee7ef2a08fb535ff"),
        ({"kernel": b""}, "77f613d7bbcdf12a73782ea9e88b0172aeda50d1a54201cb903594ff52846898"),
    ],
)  # fmt: skip
def test_sev_known_answers(kwargs: dict[str, object], want: str) -> None:
    assert measure.sev_launch_digest(AMDSEV, **kwargs).hex() == want  # type: ignore[arg-type]
    assert (
        measure.sev_launch_digest(X64).hex()
        == "b4c021e085fb83ceffe6571a3d357b4a98773c83c474e47f76c876708fe316da"
    )


def test_seves_known_answers() -> None:
    one = measure.seves_launch_digest(AMDSEV, vcpus=1, vcpu_sig=V4, kernel=b"", initrd=b"")
    four = measure.seves_launch_digest(AMDSEV, vcpus=4, vcpu_sig=V4, kernel=b"", initrd=b"")
    assert one.hex() == "13810ae661ea11e2bb205621f582fee268f0367c8f97bc297b7fadef3e12002c"
    assert four.hex() == "0dccbcaba8e90b261bd0d2e1863a2f9da714768b7b2a19363cd6ae35aa90de91"


SEVCTL_OVMF = (DATA / "sevctl_ovmf_amdsev_trimmed.fd").read_bytes()
TIK = (DATA / "tik1.bin").read_bytes()
NONCE = base64.b64decode("wxP6tRHCFrFQWxsuqZA8QA==")


def test_sevctl_measurement_build_vectors() -> None:
    version = PlatformVersion(1, 40, 40)
    given = base64.b64decode("xkvRAfyaSizgonxAjZIAkR8TmolUabBKQKb6KJCDDSM=")
    kernel, initrd = (DATA / "vmlinuz-fake").read_bytes(), (DATA / "initrd-fake").read_bytes()
    cases = [
        (given, "lswbxWxI9gckya16JQvdFtpYmNO4b+3inAPpqsgoBI7DE/q1EcIWsVBbGy6pkDxA"),
        (measure.sev_launch_digest(SEVCTL_OVMF), "oMDewIouJSpbpNRHj7Mk3p08H2dPZQdsZMU14qIymBnDE/q1EcIWsVBbGy6pkDxA"),
        (
            measure.sev_launch_digest(SEVCTL_OVMF, kernel=kernel, initrd=initrd, append="foo bar baz fake kernel=cmdline"),
            "h3auYbWQnVW7EGLWN4Hf9SN0oEYMPU2sK4bLnefWPwvDE/q1EcIWsVBbGy6pkDxA",
        ),
    ]  # fmt: skip
    for digest, want in cases:
        assert base64.b64encode(measure.launch_measure(digest, TIK, 3, version, NONCE)).decode() == want
    want = base64.b64decode("/o0nzDKE5XgtVnUZWPhUea/WZYrTKLExR7KCwuMdbActvpWfXTFk21KMZIAAhQny")
    es = measure.seves_launch_digest(SEVCTL_OVMF, vcpus=4, vcpu_sig=cpu_sig(25, 1, 1), fpu_reset=False)
    assert measure.launch_measure(es, TIK, 5, PlatformVersion(1, 49, 6), want[32:]) == want


def test_vmsa_builder_matches_sevctl_vmsa_files() -> None:
    ap_eip = Ovmf.parse(SEVCTL_OVMF).sev_es_reset_eip()
    pages = list(vmsa_pages(2, ap_eip, 0, cpu_sig(25, 1, 1), fpu_reset=False))
    assert pages[0] == (DATA / "sevctl_vmsa0.bin").read_bytes()
    assert pages[1] == (DATA / "sevctl_vmsa1.bin").read_bytes()
    assert cpu_sig(14, 1, 2) == 0x0E12 and cpu_sig(23, 1, 2) == 0x800F12


def test_against_sev_snp_measure_when_installed() -> None:
    guest = pytest.importorskip(
        "sevsnpmeasure.guest", reason="sev-snp-measure is not installed (oracle only)"
    )
    from sevsnpmeasure.sev_mode import SevMode
    from sevsnpmeasure.vmm_types import VMMType

    path = str(DATA / "ovmf_AmdSev_suffix.bin")
    vmm = {VmmType.QEMU: VMMType.QEMU, VmmType.EC2: VMMType.ec2, VmmType.GCE: VMMType.gce}
    for (ours, theirs), vcpus, features, sig in [
        (item, n, f, s) for item in vmm.items() for n in (1, 3) for f in (0x1, 0x21) for s in (V4, CPU_SIGS["EPYC-Milan"])
    ]:  # fmt: skip
        want = guest.calc_launch_digest(
            SevMode.SEV_SNP, vcpus, sig, path, "/dev/null", None, "x y", features, vmm_type=theirs
        )
        got = measure.snp_launch_digest(
            AMDSEV, vcpus=vcpus, vcpu_sig=sig, sev_features=features, kernel=b"", append="x y", vmm_type=ours
        )
        assert got == want
    want = guest.calc_launch_digest(
        SevMode.SEV_ES, 2, V4, path, "/dev/null", None, "a", 0, vmm_type=VMMType.ec2
    )
    assert (
        measure.seves_launch_digest(
            AMDSEV, vcpus=2, vcpu_sig=V4, kernel=b"", append="a", vmm_type=VmmType.EC2
        )
        == want
    )


def _key(name: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key((DATA / name).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def test_id_block_known_answers() -> None:
    # virtee/sev tests/id-block.rs
    ld = bytes.fromhex(
        "a14d638341e5674628fe1e02fbedebe5e5ab4faf1dd72d8966068e615bb99efd13d214b35c231715b38e263dc6059745"
    )
    block = id_block.IdBlock(ld).pack()
    assert base64.b64encode(block).decode() == (
        "oU1jg0HlZ0Yo/h4C++3r5eWrT68d1y2JZgaOYVu5nv0T0hSzXCMXFbOOJj3GBZdFAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABAAAAAAAAAAAAAwAAAAAA"
    )  # fmt: skip
    idk, auth = _key("test_id_key.pem"), _key("test_auth_key.pem")
    assert (
        base64.b64encode(id_block.key_digest(idk.public_key())).decode()
        == "WfssaG36T+9J84M5qndckAUcKNVzg93DuvO160sUlt87DbvcuuX+J2d6ZEggdz/i"
    )
    assert (
        base64.b64encode(id_block.key_digest(auth.public_key())).decode()
        == "7tgRafsMteDsNHlPEo/U4MSkb2fGWhrfqB/LJLzAiMJyNpt//D6ytq9qQoShs2xf"
    )
    verdict = id_block.verify_id_auth(block, (DATA / "test_auth_block.bin").read_bytes())
    assert verdict.id_key_digest == id_block.key_digest(idk.public_key())
    # sev-snp-measure tests/test_id_block.py
    ld = base64.b64decode("B28FLQi9p6cAqipgjFyqawDrrSl7bWioWkWx5mmlWLZ+G5HShKMB/mPE+gdQRn7t")
    assert base64.b64encode(id_block.key_digest(_key("id_key_test.pem").public_key())).decode() == (
        "hwt+NcU/inLQ0yL3WrKvgmJ5Kq9leWIs5BMcPyHyied8sFYKXjuQs5MuZ07HCcsU"
    )
    assert base64.b64encode(id_block.key_digest(_key("author_key_test.pem").public_key())).decode() == (
        "YxEcNLv8Ckk4+aAJvQdJgNgXIyPmFZnJ/TNtqGcySOHcqY0L6PdjdqEGuK/UwKBX"
    )
    assert (
        base64.b64encode(id_block.IdBlock(ld).pack())
        .decode()
        .startswith("B28FLQi9p6cAqipgjFyqawDrrSl7bWioWkWx5mmlWLZ+")
    )


def test_every_flipped_byte_of_an_id_block_or_auth_block_is_refused() -> None:
    block = id_block.IdBlock(bytes(range(48)), policy=0x30000).pack()
    auth = id_block.make_id_auth(block, _key("id_key_test.pem"), _key("author_key_test.pem"))
    assert id_block.verify_id_auth(block, auth).author_key_digest is not None
    for pos in range(len(block)):
        raw = bytearray(block)
        raw[pos] ^= 0x04
        with pytest.raises(VerifyError):
            id_block.verify_id_auth(bytes(raw), auth)
    for pos in range(0, len(auth)):
        raw = bytearray(auth)
        raw[pos] ^= 0x04
        with pytest.raises(VerifyError):
            id_block.verify_id_auth(block, bytes(raw))
    assert struct.unpack_from("<II", auth) == (1, 1)
