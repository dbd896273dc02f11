"""The mailbox contract pinned on both sides, and the MH's pure pieces checked against independent code.

- Every offset and constant in confplan/migration/mailbox_layout.py against firmware/include/cp_mailbox.h, and
  the host harness's ``cp_mh_config`` mirror against firmware/mh/mailbox.h (a gcc-compiled offsetof program).
- The MH sources compiled with the firmware's flags need nothing from libc.
- The C secret-table walk against confplan/sev/secret_table.py (good tables and each kind of damage).
- Key derivation and DIGEST recomputed in Python with ``cryptography``'s AES-GCM.
"""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from confplan.migration import mailbox_layout as mbx
from confplan.migration.host_mh import FIRMWARE_DIR, HOST_BUILD_DIR, HostGuest, MhConfigC, build_host_library
from confplan.migration.mailbox import MailboxError
from confplan.sev.secret_table import (
    CONFPLAN_TRANSPORT_KEY_GUID,
    SecretTableError,
    build_secret_table,
    parse_secret_table,
)
from confplan.vmm import abi

MIGRATION_ID_GUID = uuid.UUID("6b519384-fec4-4e17-9bbd-4fccc92f780f")
PAGE = 4096

OFFSETS_C = r"""
#include <stddef.h>
#include <stdio.h>
#include "cp_mailbox.h"
#include "mailbox.h"
#define F(s, f) printf(#s "." #f " %zu\n", offsetof(struct s, f));
#define C(name) printf(#name " %llu\n", (unsigned long long)(name));
int main(void) {
    F(cp_mb_proto, magic) F(cp_mb_proto, version) F(cp_mb_proto, flags) F(cp_mb_proto, batch_pages)
    F(cp_mb_proto, sender_id) F(cp_mb_proto, seq) F(cp_mb_proto, done) F(cp_mb_proto, ring)
    F(cp_mb_proto, key_id) F(cp_mb_proto, migration_id) F(cp_mb_proto, digest) F(cp_mb_proto, digest_pages)
    F(cp_mb_proto, digest_skipped) F(cp_mb_proto, pages_sealed) F(cp_mb_proto, pages_opened)
    F(cp_mb_proto, pages_refused) F(cp_mb_proto, ops) F(cp_mb_proto, drains)
    F(cp_mb_cmd, op) F(cp_mb_cmd, count) F(cp_mb_cmd, generation) F(cp_mb_cmd, first) F(cp_mb_cmd, arg0)
    F(cp_mb_cmd, arg1) F(cp_mb_cmd, status) F(cp_mb_cmd, n_ok) F(cp_mb_cmd, n_refused) F(cp_mb_cmd, first_bad)
    F(cp_mb_cmd, tsc_start) F(cp_mb_cmd, tsc_end)
    printf("sizeof.cp_mb_cmd %zu\n", sizeof(struct cp_mb_cmd));
    printf("sizeof.cp_mb_proto %zu\n", sizeof(struct cp_mb_proto));
    F(cp_mh_config, ram) F(cp_mh_config, ram_size) F(cp_mh_config, mh_base) F(cp_mh_config, mh_size)
    F(cp_mh_config, shared) F(cp_mh_config, gen_table) F(cp_mh_config, gen_entries) F(cp_mh_config, secret)
    F(cp_mh_config, secret_size) F(cp_mh_config, doorbell) F(cp_mh_config, cpu_features) F(cp_mh_config, side)
    F(cp_mh_config, mh_index) F(cp_mh_config, batch_pages) F(cp_mh_config, snp) F(cp_mh_config, mac_table)
    F(cp_mh_config, mac_entries) F(cp_mh_config, vmsa) F(cp_mh_config, vmsa_slots) F(cp_mh_config, own_low)
    F(cp_mh_config, owner_key)
    printf("sizeof.cp_mh_config %zu\n", sizeof(struct cp_mh_config));
    C(CP_MB_PROTO_MAGIC) C(CP_MB_PROTO_VERSION) C(CP_MB_PROTO_OFFSET) C(CP_MB_SLOTS_OFFSET) C(CP_MB_SLOT_SIZE)
    C(CP_MB_SLOT_HEADER) C(CP_MB_DIGEST_BYTES) C(CP_MB_NO_INDEX) C(CP_MB_RING_OFFSET) C(CP_MB_RING)
    C(CP_MB_CMD_SIZE) C(CP_MB_WARM_HUGE) C(CP_MB_WARM_WRITE)
    C(CP_MB_OP_INIT) C(CP_MB_OP_SAVE) C(CP_MB_OP_LOAD) C(CP_MB_OP_DIGEST) C(CP_MB_OP_RESET)
    C(CP_MB_OP_MAC_RANGE) C(CP_MB_OP_MAC_LIST) C(CP_MB_OP_FOLD) C(CP_MB_MAC_BYTES)
    C(CP_MB_OP_SEAL_MANIFEST) C(CP_MB_OP_CHECK_MANIFEST) C(CP_MB_OP_SEAL_STATE) C(CP_MB_OP_OPEN_STATE)
    C(CP_MB_OP_VERIFIED) C(CP_MB_OP_KEY_REQUEST) C(CP_MB_OP_KEY_REPORT) C(CP_MB_OP_KEY_RELEASE)
    C(CP_MB_OP_PREPARE_MANIFEST) C(CP_MB_OP_WARM)
    C(CP_MBS_OK) C(CP_MBS_BAD_OP) C(CP_MBS_NO_KEY) C(CP_MBS_COUNT) C(CP_MBS_PARTIAL) C(CP_MBS_GPA_ALIGN)
    C(CP_MBS_GPA_RANGE) C(CP_MBS_GPA_MH) C(CP_MBS_GEN_INVALID) C(CP_MBS_GEN_STALE) C(CP_MBS_AUTH)
    C(CP_MBS_KEY_ID) C(CP_MBS_RESERVED) C(CP_MBS_NONCE) C(CP_MBS_SECRET_HEADER) C(CP_MBS_SECRET_LENGTH)
    C(CP_MBS_SECRET_ENTRY) C(CP_MBS_SECRET_NO_KEY) C(CP_MBS_SECRET_KEY_LEN) C(CP_MBS_SECRET_ID_LEN)
    C(CP_MBS_CONFIG) C(CP_MBS_MAC_MISSING) C(CP_MBS_SIDE) C(CP_MBS_MANIFEST_AUTH) C(CP_MBS_MANIFEST_ID)
    C(CP_MBS_MANIFEST_RANGE) C(CP_MBS_MANIFEST_BITMAP) C(CP_MBS_MANIFEST_STATE) C(CP_MBS_MANIFEST_ROUNDS)
    C(CP_MBS_MANIFEST_VMSA) C(CP_MBS_MANIFEST_GENERATIONS) C(CP_MBS_MANIFEST_MAC) C(CP_MBS_MANIFEST_BUSY)
    C(CP_MBS_STATE_LABEL) C(CP_MBS_NOT_SNP) C(CP_MBS_ENTROPY) C(CP_MBS_KEY_STATE) C(CP_MBS_KEY_MSG)
    C(CP_MBS_KEY_MSG_AUTH) C(CP_MBS_KEY_PSP) C(CP_MBS_KEY_WRAP) C(CP_MBS_KEY_AUTH) C(CP_MBS_KEY_HELPER)
    C(CP_MBS_LAST)
    C(CP_KR_NONCE) C(CP_SNP_MSG_HDR) C(CP_SNP_REPORT_REQ_SZ) C(CP_SNP_REPORT_RSP_SZ) C(CP_SNP_REPORT_SIZE)
    C(CP_SNP_REPORT_SIGNED) C(CP_KR_WRAP_MIN) C(CP_KR_WRAP_MAX) C(CP_KR_TABLE_MAX)
    printf("label.kr_magic %s\n", CP_KR_MAGIC);
    printf("label.kr_info %s\n", CP_KR_INFO);
    F(cp_sealed_blob, magic) F(cp_sealed_blob, version) F(cp_sealed_blob, flags) F(cp_sealed_blob, length)
    F(cp_sealed_blob, key_id) F(cp_sealed_blob, migration_id) F(cp_sealed_blob, nonce)
    F(cp_sealed_blob, label) F(cp_sealed_blob, tag)
    F(cp_manifest_request, state_hash) F(cp_manifest_request, rounds) F(cp_manifest_request, bitmap_bytes)
    F(cp_manifest_request, sealed_bytes)
    F(cp_manifest_body, start) F(cp_manifest_body, npages) F(cp_manifest_body, chunk_pages)
    F(cp_manifest_body, chunks) F(cp_manifest_body, rounds) F(cp_manifest_body, max_generation)
    F(cp_manifest_body, vcpus) F(cp_manifest_body, bitmap_digest) F(cp_manifest_body, state_hash)
    printf("sizeof.cp_sealed_blob %zu\n", sizeof(struct cp_sealed_blob));
    printf("sizeof.cp_manifest_request %zu\n", sizeof(struct cp_manifest_request));
    printf("sizeof.cp_manifest_body %zu\n", sizeof(struct cp_manifest_body));
    C(CP_MB_MANIFEST_MAGIC) C(CP_MB_STATE_MAGIC) C(CP_MB_SEALED_VERSION) C(CP_MB_SEALED_HEAD)
    C(CP_MB_SEALED_AAD) C(CP_MB_SEALED_MAX) C(CP_MB_LABEL_BYTES) C(CP_MB_REQUEST_BYTES)
    C(CP_MB_MANIFEST_CHUNK_ALIGN) C(CP_MB_MANIFEST_CHUNK_MAX) C(CP_MB_MANIFEST_ENTRY) C(CP_MB_VMSA_TAG)
    C(CP_MB_OP_LAST)
    C(CP_VMSA_SLOT_SIZE) C(CP_VMSA_DATA_BYTES)
    printf("label.manifest %s\n", CP_MB_LABEL_MANIFEST);
    printf("label.state %s\n", CP_MB_LABEL_STATE);
    return 0;
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    return build_host_library(tmp_path_factory.mktemp("mh-layout"))


@pytest.fixture(scope="module")
def c_output(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    out = tmp_path_factory.mktemp("mh-offsets")
    src, exe = out / "offsets.c", out / "offsets"
    src.write_text(OFFSETS_C)
    subprocess.run(
        ["gcc", "-std=c11", "-Wall", "-Werror", f"-I{FIRMWARE_DIR / 'include'}", f"-I{FIRMWARE_DIR / 'mh'}",
         "-o", str(exe), str(src)],
        check=True,
    )  # fmt: skip
    stdout = subprocess.run([str(exe)], check=True, capture_output=True).stdout
    return [line for line in stdout.split(b"\n") if line]


@pytest.fixture(scope="module")
def c_values(c_output: list[bytes]) -> dict[str, int]:
    pairs = (line.decode().split() for line in c_output if not line.startswith(b"label."))
    return {name: int(value) for name, value in pairs}


@pytest.fixture(scope="module")
def c_labels(c_output: list[bytes]) -> dict[str, bytes]:
    pairs = (line.removeprefix(b"label.").split(b" ", 1) for line in c_output if line.startswith(b"label."))
    return {name.decode(): value for name, value in pairs}


def test_control_page_offsets_match_the_c_header(c_values: dict[str, int]) -> None:
    proto = {k.split(".", 1)[1]: v for k, v in c_values.items() if k.startswith("cp_mb_proto.")}
    assert {k: mbx.PROTO_OFFSET + v for k, v in proto.items()} == mbx.FIELD_OFFSETS
    assert c_values["sizeof.cp_mb_proto"] == mbx.PROTO_SIZE
    cmd = {k.split(".", 1)[1]: v for k, v in c_values.items() if k.startswith("cp_mb_cmd.")}
    assert cmd == mbx.CMD_OFFSETS
    assert c_values["sizeof.cp_mb_cmd"] == mbx.CMD_SIZE
    assert (c_values["CP_MB_RING_OFFSET"], c_values["CP_MB_RING"]) == (mbx.RING_OFFSET, mbx.RING)
    assert mbx.PROTO_OFFSET + mbx.PROTO_SIZE <= mbx.RING_OFFSET < mbx.RING_OFFSET + mbx.RING * mbx.CMD_SIZE
    assert mbx.RING_OFFSET + mbx.RING * mbx.CMD_SIZE <= mbx.SLOTS_OFFSET
    assert c_values["CP_MB_PROTO_MAGIC"] == mbx.PROTO_MAGIC
    assert c_values["CP_MB_PROTO_VERSION"] == mbx.PROTO_VERSION
    assert c_values["CP_MB_PROTO_OFFSET"] == mbx.PROTO_OFFSET
    assert c_values["CP_MB_SLOTS_OFFSET"] == mbx.SLOTS_OFFSET == PAGE
    assert c_values["CP_MB_SLOT_SIZE"] == mbx.SLOT_SIZE == PAGE + abi.MAILBOX_SLOT_TAG
    assert c_values["CP_MB_SLOT_HEADER"] == mbx.SLOT_HEADER
    assert c_values["CP_MB_DIGEST_BYTES"] == mbx.DIGEST_BYTES
    assert c_values["CP_MB_MAC_BYTES"] == mbx.MAC_BYTES == abi.MH_MAC_ENTRY
    assert c_values["CP_MB_NO_INDEX"] == mbx.NO_INDEX
    assert (c_values["CP_MB_WARM_HUGE"], c_values["CP_MB_WARM_WRITE"]) == (mbx.WARM_HUGE, mbx.WARM_WRITE)
    # the VMM engineer's header must end before the protocol block
    assert ctypes.sizeof(abi.MailboxHeader) <= mbx.PROTO_OFFSET


def test_ops_and_statuses_match_the_c_header(c_values: dict[str, int]) -> None:
    c_ops = {k.removeprefix("CP_MB_OP_"): v for k, v in c_values.items() if k.startswith("CP_MB_OP_")}
    assert c_ops.pop("LAST") == max(mbx.Op)
    assert {op.name: op.value for op in mbx.Op} == c_ops
    c_status = {k.removeprefix("CP_MBS_"): v for k, v in c_values.items() if k.startswith("CP_MBS_")}
    assert c_values["CP_MB_PROTO_VERSION"] == mbx.PROTO_VERSION == 9
    assert c_status.pop("LAST") == max(mbx.MhStatus)
    assert {st.name: st.value for st in mbx.MhStatus} == c_status
    assert all(st.meaning for st in mbx.MhStatus)


def test_v5_records_match_the_c_header(c_values: dict[str, int], c_labels: dict[str, bytes]) -> None:
    """The sealed record head, the manifest request and body (docs/mailbox.md, "The manifest")."""

    def fields(struct_name: str) -> dict[str, int]:
        prefix = f"{struct_name}."
        return {k.removeprefix(prefix): v for k, v in c_values.items() if k.startswith(prefix)}

    assert fields("cp_sealed_blob") == mbx.SEALED_OFFSETS
    assert fields("cp_manifest_request") == mbx.REQUEST_OFFSETS
    body = fields("cp_manifest_body")
    assert body == mbx.BODY_OFFSETS
    sizes = (c_values["sizeof.cp_sealed_blob"], c_values["sizeof.cp_manifest_request"],
             c_values["sizeof.cp_manifest_body"])  # fmt: skip
    assert sizes == (mbx.SEALED_HEAD, mbx.REQUEST_BYTES, mbx.BODY_BYTES)
    assert mbx.SEALED_HEAD_STRUCT.size == mbx.SEALED_HEAD and mbx.REQUEST_STRUCT.size == mbx.REQUEST_BYTES
    # the struct formats put each field where the C header does
    head = mbx.SEALED_HEAD_STRUCT.pack(1, 2, 3, 4, 5, b"\x06" * 16, b"\x07" * 12, 8, b"\x09" * 16)
    assert head[mbx.SEALED_OFFSETS["nonce"]] == 7 and head[mbx.SEALED_OFFSETS["label"]] == 8
    assert head[mbx.SEALED_OFFSETS["tag"] :] == b"\x09" * 16 == head[mbx.SEALED_AAD :]
    request = mbx.REQUEST_STRUCT.pack(b"\x01" * 32, 2, 3, 4)
    assert [request[mbx.REQUEST_OFFSETS[k]] for k in ("rounds", "bitmap_bytes", "sealed_bytes")] == [2, 3, 4]
    constants = {
        "CP_MB_MANIFEST_MAGIC": mbx.MANIFEST_MAGIC, "CP_MB_STATE_MAGIC": mbx.STATE_MAGIC,
        "CP_MB_SEALED_VERSION": mbx.SEALED_VERSION, "CP_MB_SEALED_HEAD": mbx.SEALED_HEAD,
        "CP_MB_SEALED_AAD": mbx.SEALED_AAD, "CP_MB_SEALED_MAX": mbx.SEALED_MAX, "CP_MB_LABEL_BYTES": 16,
        "CP_MB_REQUEST_BYTES": mbx.REQUEST_BYTES, "CP_MB_MANIFEST_CHUNK_ALIGN": mbx.MANIFEST_CHUNK_ALIGN,
        "CP_MB_MANIFEST_CHUNK_MAX": mbx.MANIFEST_CHUNK_MAX, "CP_MB_MANIFEST_ENTRY": mbx.MANIFEST_ENTRY,
        "CP_MB_VMSA_TAG": mbx.VMSA_TAG, "CP_VMSA_SLOT_SIZE": abi.VMSA_SLOT_SIZE,
        "CP_VMSA_DATA_BYTES": abi.VMSA_DATA_BYTES,
    }  # fmt: skip
    assert {k: c_values[k] for k in constants} == constants
    assert c_labels["manifest"] == mbx.LABEL_MANIFEST.rstrip(b"\0") and c_labels["state"] == mbx.LABEL_STATE
    assert len(mbx.LABEL_MANIFEST) == len(mbx.LABEL_STATE) == 16
    from confplan.migration.manifest import FIELDS

    assert set(FIELDS) == mbx.MANIFEST_REFUSALS  # every refusal names its field
    # the default chunk is verify's, so a refused chunk names the range verify would
    from confplan.migration.verify import CHUNK_PAGES

    assert mbx.MANIFEST_CHUNK_PAGES == CHUNK_PAGES and CHUNK_PAGES % mbx.MANIFEST_CHUNK_ALIGN == 0


def test_v6_key_release_formats_match_the_c_header(
    c_values: dict[str, int], c_labels: dict[str, bytes]
) -> None:
    """The key release's sizes and labels (docs/key-release.md) on both sides."""
    sizes = {
        "CP_KR_NONCE": mbx.KEY_NONCE_BYTES, "CP_SNP_REPORT_SIZE": mbx.KEY_REPORT_BYTES,
        "CP_SNP_REPORT_SIGNED": mbx.KEY_REPORT_SIGNED, "CP_KR_WRAP_MIN": mbx.KEY_WRAP_MIN,
        "CP_KR_WRAP_MAX": mbx.KEY_WRAP_MAX, "CP_KR_TABLE_MAX": mbx.KEY_TABLE_MAX,
    }  # fmt: skip
    assert {k: c_values[k] for k in sizes} == sizes
    assert c_values["CP_SNP_MSG_HDR"] + c_values["CP_SNP_REPORT_REQ_SZ"] == mbx.KEY_REQUEST_BYTES
    assert c_values["CP_SNP_MSG_HDR"] + c_values["CP_SNP_REPORT_RSP_SZ"] == mbx.KEY_RESPONSE_BYTES
    assert (c_labels["kr_magic"], c_labels["kr_info"]) == (mbx.KEY_WRAP_MAGIC, mbx.KEY_KDF_INFO)
    assert mbx.KEY_RESPONSE_BYTES <= mbx.SLOT_SIZE  # one data slot holds any key op
    assert min(mbx.KEY_REFUSALS) == mbx.MhStatus.NOT_SNP and max(mbx.KEY_REFUSALS) == max(mbx.MhStatus)


def test_host_config_mirror_matches_the_c_struct(c_values: dict[str, int]) -> None:
    for name, _ in MhConfigC._fields_:
        assert getattr(MhConfigC, name).offset == c_values[f"cp_mh_config.{name}"], name
    assert ctypes.sizeof(MhConfigC) == c_values["sizeof.cp_mh_config"]


def test_sealed_slot_matches_the_page_core_record() -> None:
    from confplan.core._lib import SealedPageC

    assert ctypes.sizeof(SealedPageC) == mbx.SLOT_SIZE
    for name, off in (("gpa", mbx.SLOT_GPA), ("generation", mbx.SLOT_GENERATION), ("status", mbx.SLOT_STATUS),
                      ("nonce", mbx.SLOT_NONCE), ("key_id", mbx.SLOT_KEY_ID), ("tag", mbx.SLOT_TAG),
                      ("ct", mbx.SLOT_CT)):  # fmt: skip
        assert getattr(SealedPageC, name).offset == off, name


def test_firmware_build_of_the_mh_needs_nothing_from_libc(tmp_path: Path) -> None:
    subprocess.run(["make", "-s", "-C", str(HOST_BUILD_DIR), f"O={tmp_path}", "objs"], check=True)
    undefined = subprocess.run(
        ["nm", "-u", str(tmp_path / "mh-fw.o")], check=True, capture_output=True, text=True
    ).stdout.split()
    assert undefined == []


# ---- the secret table: C walk vs the sev engineer's Python ----


def _c_parse(lib: ctypes.CDLL, raw: bytes, size: int | None = None) -> tuple[int, bytes, bytes | None]:
    page = ctypes.create_string_buffer(raw, max(len(raw), 1))
    key, mig, have = ctypes.create_string_buffer(32), ctypes.create_string_buffer(16), ctypes.c_uint32()
    rc = lib.cp_mh_parse_secret(page, len(raw) if size is None else size, key, mig, ctypes.byref(have))
    return int(rc), key.raw, mig.raw if have.value else None


def test_tables_built_by_the_sev_code_parse_in_c(lib: ctypes.CDLL) -> None:
    key, mig = os.urandom(32), os.urandom(16)
    other = {uuid.uuid4(): os.urandom(n) for n in (0, 5, 100)}
    for entries in ({CONFPLAN_TRANSPORT_KEY_GUID: key}, {**other, CONFPLAN_TRANSPORT_KEY_GUID: key},
                    {CONFPLAN_TRANSPORT_KEY_GUID: key, MIGRATION_ID_GUID: mig, **other}):  # fmt: skip
        raw = build_secret_table(entries)
        rc, got_key, got_mig = _c_parse(lib, raw + bytes(PAGE - len(raw)), PAGE)
        assert rc == mbx.MhStatus.OK
        assert got_key == parse_secret_table(raw)[CONFPLAN_TRANSPORT_KEY_GUID] == key
        assert got_mig == entries.get(MIGRATION_ID_GUID)


def _damaged_tables() -> list[tuple[str, bytes, mbx.MhStatus]]:
    good = bytearray(build_secret_table({CONFPLAN_TRANSPORT_KEY_GUID: bytes(range(32))}))
    bad_guid = bytearray(good)
    bad_guid[0] ^= 1
    too_long, too_short = bytearray(good), bytearray(good)
    struct.pack_into("<I", too_long, 16, len(good) + 1)
    struct.pack_into("<I", too_short, 16, 19)
    entry_overrun, entry_tiny = bytearray(good), bytearray(good)
    struct.pack_into("<I", entry_overrun, 36, 20 + 33)
    struct.pack_into("<I", entry_tiny, 36, 19)
    many = build_secret_table({uuid.UUID(int=i + 1): b"" for i in range(64)})
    many_plus = bytearray(many[:-4] if len(many) % 16 else many)
    total = struct.unpack_from("<I", many_plus, 16)[0]
    many_plus = many_plus[:total] + uuid.uuid4().bytes_le + struct.pack("<I", 20)
    struct.pack_into("<I", many_plus, 16, total + 20)
    return [
        ("empty", b"", mbx.MhStatus.SECRET_HEADER),
        ("header GUID", bytes(bad_guid), mbx.MhStatus.SECRET_HEADER),
        ("total beyond the page", bytes(too_long), mbx.MhStatus.SECRET_LENGTH),
        ("total below the header", bytes(too_short), mbx.MhStatus.SECRET_LENGTH),
        ("entry overruns", bytes(entry_overrun), mbx.MhStatus.SECRET_ENTRY),
        ("entry shorter than its header", bytes(entry_tiny), mbx.MhStatus.SECRET_ENTRY),
        ("65 entries", bytes(many_plus), mbx.MhStatus.SECRET_ENTRY),
        ("no key", build_secret_table({uuid.uuid4(): b"x"}), mbx.MhStatus.SECRET_NO_KEY),
        ("short key", build_secret_table({CONFPLAN_TRANSPORT_KEY_GUID: b"k" * 31}),
         mbx.MhStatus.SECRET_KEY_LEN),
        ("short id", build_secret_table({CONFPLAN_TRANSPORT_KEY_GUID: bytes(32), MIGRATION_ID_GUID: b"i"}),
         mbx.MhStatus.SECRET_ID_LEN),
    ]  # fmt: skip


@pytest.mark.parametrize(("what", "raw", "status"), _damaged_tables(), ids=[t[0] for t in _damaged_tables()])
def test_damaged_tables_are_refused_by_status(
    lib: ctypes.CDLL, what: str, raw: bytes, status: mbx.MhStatus
) -> None:
    rc, _, _ = _c_parse(lib, raw, len(raw))  # size = exactly the bytes: a read past them would be a bug
    assert rc == status, what
    if status in (mbx.MhStatus.SECRET_HEADER, mbx.MhStatus.SECRET_LENGTH, mbx.MhStatus.SECRET_ENTRY):
        with pytest.raises(SecretTableError):  # the Python walk refuses the same tables
            parse_secret_table(raw)


# ---- derivation and DIGEST, recomputed independently ----


def _keystream(key: bytes, iv: bytes, n: int) -> bytes:
    return AESGCM(key).encrypt(iv, bytes(n), None)[:n]


def _reference_digest(key: bytes, ram: bytes, start: int, npages: int, mh: range) -> bytes:
    ks = _keystream(key, b"\xff\xff\xff\xffCPKDF v1", 96)
    kd, kf = AESGCM(ks[:32]), ks[32:64]
    chain = struct.pack("<QQ", start, npages)
    hashes: list[bytes] = []
    step = 0
    for gpa in range(start, start + npages * PAGE, PAGE):
        if gpa in mh:
            continue
        hashes.append(kd.encrypt(b"\xff\xff\xff\xfe" + struct.pack(">Q", gpa), b"", ram[gpa : gpa + PAGE]))
        if len(hashes) == 256:
            chain = kd.encrypt(b"\xff\xff\xff\xfd" + struct.pack(">Q", step), b"", chain + b"".join(hashes))
            hashes, step = [], step + 1
    if hashes:
        chain = kd.encrypt(b"\xff\xff\xff\xfd" + struct.pack(">Q", step), b"", chain + b"".join(hashes))
    return _keystream(kf, chain[:12], 32)


def test_init_derivation_and_digest_match_a_python_reference(lib: ctypes.CDLL) -> None:
    key = os.urandom(32)
    secret = build_secret_table({CONFPLAN_TRANSPORT_KEY_GUID: key})
    with HostGuest(lib, ram_size=6 << 20, secret=secret) as guest:
        guest.ram[0x400000:0x600000] = os.urandom(0x200000)
        info = guest.mailboxes.mailboxes[0].init()
        ks = _keystream(key, b"\xff\xff\xff\xffCPKDF v1", 96)
        assert info.migration_id == ks[64:80]  # no id in the table: derived from the key
        assert info.key_id == struct.unpack("<I", ks[80:84])[0]
        mh = range(guest.mh_base, guest.mh_base + guest.mh_size)
        ram = bytes(guest.ram)
        # 600 pages from 0x180000: crosses into the MH area (skipped) and past two chain folds
        for start, npages in ((0x180000, 600), (0x400000, 512), (0x5FF000, 1)):
            got = guest.mailboxes.mailboxes[0].digest(start, npages)
            assert got == _reference_digest(key, ram, start, npages, mh), (start, npages)


def test_warm_reads_every_page_but_the_helpers_own_and_needs_no_key(lib: ctypes.CDLL) -> None:
    """WARM (v8) before INIT: it reads the range's pages (counted), skips the MH area, refuses a range
    past RAM; it changes no page of the guest's."""
    with HostGuest(lib, ram_size=6 << 20, secret=build_secret_table({})) as guest:
        guest.ram[0x400000:0x600000] = os.urandom(0x200000)
        before = bytes(guest.ram)
        mb = guest.mailboxes.mailboxes[0]
        mh_pages = guest.mh_size // PAGE
        assert mb.finish_warm(mb.post_warm(0, (6 << 20) // PAGE)) == (6 << 20) // PAGE - mh_pages
        assert guest.mailboxes.warm(0x400000, 512) == 512
        with pytest.raises(MailboxError, match="GPA_RANGE"):
            mb.finish_warm(mb.post_warm(0x400000, 513))
        mh = guest.mh_base
        after = bytes(guest.ram)  # the mailbox's own counters change; the guest's pages do not
        assert after[:mh] == before[:mh] and after[mh + guest.mh_size :] == before[mh + guest.mh_size :]


def test_owner_supplied_migration_id_is_used(lib: ctypes.CDLL) -> None:
    mig = os.urandom(16)
    secret = build_secret_table({CONFPLAN_TRANSPORT_KEY_GUID: os.urandom(32), MIGRATION_ID_GUID: mig})
    with HostGuest(lib, ram_size=6 << 20, secret=secret) as guest:
        assert guest.mailboxes.init().migration_id == mig
