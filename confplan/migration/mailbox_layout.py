"""The migration helper's mailbox layout and statuses (docs/mailbox.md): offsets, op codes, status codes.

The one Python module that knows where each field of ``firmware/include/cp_mailbox.h`` lies;
``tests/test_mailbox_layout.py`` pins every offset and constant here against that header compiled with gcc.
One helper's protocol over this layout is ``mailbox.Mailbox``; the scheduling across helpers is
``mailbox_set.MailboxSet``.
"""

from __future__ import annotations

import array
import enum
import struct

from confplan.errors import ConfplanError
from confplan.guest.abi import MAX_VCPUS

PAGE_SIZE = 4096
PROTO_MAGIC = 0x504D4243  # "CBMP"
PROTO_VERSION = 9
PROTO_OFFSET = 0x40
SLOTS_OFFSET = 0x1000
RING_OFFSET = 0x400
RING = 16  # op entries: op number seq lives in entry seq % RING
CMD_SIZE = 64
SLOT_SIZE = 4160
SLOT_HEADER = 64
DIGEST_BYTES = 32
MAC_BYTES = 16  # one MAC table entry (CP_MB_MAC_BYTES)
NO_INDEX = 0xFFFFFFFF
WARM_HUGE = 1  # (v9) WARM's count flag: one read per 2 MiB page of the view (CP_MB_WARM_HUGE)
WARM_WRITE = 2  # (v9) WARM's count flag, a target's helper only: touch for writing (CP_MB_WARM_WRITE)
MAX_GENERATION = 0xFFFFFFFE

# Byte offsets inside the control page (CP_MB_PROTO_OFFSET + offsetof(struct cp_mb_proto, field)).
FIELD_OFFSETS: dict[str, int] = {
    name: PROTO_OFFSET + off
    for name, off in {
        "magic": 0, "version": 4, "flags": 6, "batch_pages": 8, "sender_id": 12, "seq": 16, "done": 24,
        "ring": 32, "key_id": 36, "migration_id": 40, "digest": 56, "digest_pages": 88, "digest_skipped": 96,
        "pages_sealed": 104, "pages_opened": 112, "pages_refused": 120, "ops": 128, "drains": 136,
    }.items()
}  # fmt: skip
# Inside a ring entry (offsetof(struct cp_mb_cmd, field)).
CMD_OFFSETS: dict[str, int] = {
    "op": 0, "count": 4, "generation": 8, "first": 12, "arg0": 16, "arg1": 24, "status": 32, "n_ok": 36,
    "n_refused": 40, "first_bad": 44, "tsc_start": 48, "tsc_end": 56,
}  # fmt: skip
CMD_ARGS = struct.Struct("<IIIIQQ")  # op, count, generation, first, arg0, arg1: the VMM's half
CMD_RESULT = struct.Struct("<IIII")  # status, n_ok, n_refused, first_bad: the MH's
CMD_TSC = struct.Struct("<QQ")
PROTO_SIZE = 256
# Inside a slot (struct cp_sealed_page).
SLOT_GPA, SLOT_GENERATION, SLOT_STATUS, SLOT_NONCE, SLOT_KEY_ID, SLOT_TAG, SLOT_CT = 0, 8, 12, 16, 28, 32, 64

# v5: sealed manifests and vCPU states (struct cp_sealed_blob: a 64-byte head, then the ciphertext).
MANIFEST_MAGIC = 0x464D5043  # "CPMF"
STATE_MAGIC = 0x53565043  # "CPVS"
SEALED_VERSION = 1
SEALED_HEAD = 64
SEALED_AAD = 48  # head bytes the tag covers
SEALED_MAX = 0x9000  # largest sealed record, head included (the MH's private seal buffer)
LABEL_MANIFEST = b"CP-MANIFEST-V1\0\0"  # AAD domain labels
LABEL_STATE = b"CP-VCPU-STATE-V1"
SEALED_OFFSETS: dict[str, int] = {
    "magic": 0, "version": 4, "flags": 6, "length": 8, "key_id": 12, "migration_id": 16, "nonce": 32,
    "label": 44, "tag": 48,
}  # fmt: skip
SEALED_HEAD_STRUCT = struct.Struct("<IHHII16s12sI16s")
# The request SEAL_MANIFEST / CHECK_MANIFEST read at slot `first` (struct cp_manifest_request), then the
# range's bitmap bits (padded to 16), then (CHECK) the sealed manifest.
REQUEST_BYTES = 64
REQUEST_OFFSETS: dict[str, int] = {"state_hash": 0, "rounds": 32, "bitmap_bytes": 36, "sealed_bytes": 40}
REQUEST_STRUCT = struct.Struct("<32sIII20x")
# The manifest's plaintext (struct cp_manifest_body), then per vCPU a VMSA tag, then per chunk two digests.
BODY_BYTES = 112
BODY_OFFSETS: dict[str, int] = {
    "start": 0, "npages": 8, "chunk_pages": 16, "chunks": 20, "rounds": 24, "max_generation": 28, "vcpus": 32,
    "bitmap_digest": 48, "state_hash": 80,
}  # fmt: skip
MANIFEST_CHUNK_ALIGN = 128  # chunk pages: a multiple of this ...
MANIFEST_CHUNK_MAX = 32768  # ... and at most this
MANIFEST_CHUNK_PAGES = 2048  # the default: verify's CHUNK_PAGES (8 MiB), so a mismatch names the same range
MANIFEST_ENTRY = 64  # per chunk: generation digest || MAC digest
VMSA_TAG = 16


# v6: the SNP key release (docs/key-release.md); the formats the ops read and write in the data area.
KEY_NONCE_BYTES = 32  # KEY_REQUEST's input: the owner's nonce
KEY_REQUEST_BYTES = 0xC0  # ... its output: the sealed MSG_REPORT_REQ (0x60 header + 0x60 payload)
KEY_RESPONSE_BYTES = 0x520  # KEY_REPORT's input: the PSP's MSG_REPORT_RSP (0x60 header + 0x4C0 payload)
KEY_REPORT_BYTES = 0x4A0  # ... its output: the attestation report
KEY_REPORT_SIGNED = 0x2A0  # the report's signed bytes: the wrap's AAD
KEY_WRAP_MAGIC = b"CPSNPKR2"
KEY_WRAP_MIN = 8 + 32 + 12 + 16  # KEY_RELEASE's input: magic || O || IV || ciphertext || tag
KEY_TABLE_MAX = 1024  # the released efi_secret table, at most
KEY_WRAP_MAX = KEY_WRAP_MIN + KEY_TABLE_MAX
KEY_KDF_INFO = b"confplan-snp-key-release/v2"  # || MEASUREMENT[48] || REPORT_ID[32]


def manifest_chunk_pages(npages: int, vcpus: int = MAX_VCPUS) -> int:
    """The chunk both sides use for a manifest of ``npages``: 8 MiB (verify's chunk, so a mismatch names
    the same range), doubled until the sealed manifest fits the helper's seal buffer (``SEALED_MAX``):
    a 1 GiB guest keeps 8 MiB chunks, 64 GiB of guest-physical space takes 128 MiB ones. Both sides
    compute it from ``npages`` alone (the VMSA tags counted for the most vCPUs a guest may have)."""
    chunk = MANIFEST_CHUNK_PAGES
    room = SEALED_MAX - SEALED_HEAD - BODY_BYTES - vcpus * VMSA_TAG
    while -(-npages // chunk) * MANIFEST_ENTRY > room and chunk < MANIFEST_CHUNK_MAX:
        chunk *= 2
    return chunk


class Op(enum.IntEnum):
    """CP_MB_OP_*."""

    INIT = 1
    SAVE = 2
    LOAD = 3
    DIGEST = 4
    RESET = 5
    MAC_RANGE = 6
    MAC_LIST = 7
    FOLD = 8
    SEAL_MANIFEST = 9
    CHECK_MANIFEST = 10
    SEAL_STATE = 11
    OPEN_STATE = 12
    VERIFIED = 13
    KEY_REQUEST = 14
    KEY_REPORT = 15
    KEY_RELEASE = 16
    PREPARE_MANIFEST = 17
    WARM = 18


class MhStatus(enum.IntEnum):
    """CP_MBS_*: the op status and the per-slot status."""

    OK = 0
    BAD_OP = 1
    NO_KEY = 2
    COUNT = 3
    PARTIAL = 4
    GPA_ALIGN = 5
    GPA_RANGE = 6
    GPA_MH = 7
    GEN_INVALID = 8
    GEN_STALE = 9
    AUTH = 10
    KEY_ID = 11
    RESERVED = 12
    NONCE = 13
    SECRET_HEADER = 14
    SECRET_LENGTH = 15
    SECRET_ENTRY = 16
    SECRET_NO_KEY = 17
    SECRET_KEY_LEN = 18
    SECRET_ID_LEN = 19
    CONFIG = 20
    MAC_MISSING = 21
    SIDE = 22
    MANIFEST_AUTH = 23
    MANIFEST_ID = 24
    MANIFEST_RANGE = 25
    MANIFEST_BITMAP = 26
    MANIFEST_STATE = 27
    MANIFEST_ROUNDS = 28
    MANIFEST_VMSA = 29
    MANIFEST_GENERATIONS = 30
    MANIFEST_MAC = 31
    MANIFEST_BUSY = 32
    STATE_LABEL = 33
    NOT_SNP = 34
    ENTROPY = 35
    KEY_STATE = 36
    KEY_MSG = 37
    KEY_MSG_AUTH = 38
    KEY_PSP = 39
    KEY_WRAP = 40
    KEY_AUTH = 41
    KEY_HELPER = 42

    @property
    def meaning(self) -> str:
        return _MEANING[self]


_MEANING: dict[MhStatus, str] = {
    MhStatus.OK: "done",
    MhStatus.BAD_OP: "unknown op",
    MhStatus.NO_KEY: "the helper has no transport key (INIT first; RESET forgets it)",
    MhStatus.COUNT: "page count is 0 or above the mailbox's slots",
    MhStatus.PARTIAL: "some pages were refused",
    MhStatus.GPA_ALIGN: "GPA is not page-aligned",
    MhStatus.GPA_RANGE: "GPA lies outside guest RAM",
    MhStatus.GPA_MH: "GPA lies inside the migration helper's own area",
    MhStatus.GEN_INVALID: "generation 0 or 0xffffffff is not allowed",
    MhStatus.GEN_STALE: "generation is not newer than the one already sealed or placed for this GPA (replay)",
    MhStatus.AUTH: "the GCM tag does not verify (ciphertext, tag, nonce, GPA or generation changed)",
    MhStatus.KEY_ID: "the record was sealed under another transport key",
    MhStatus.RESERVED: "the record's reserved bytes or status are not zero",
    MhStatus.NONCE: "the helper's nonce sequence is used up: a new transport key is needed",
    MhStatus.SECRET_HEADER: "no efi_secret table header GUID at the secret page",
    MhStatus.SECRET_LENGTH: "the secret table's total length is out of range",
    MhStatus.SECRET_ENTRY: "a secret table entry overruns the table (or more than 64 entries)",
    MhStatus.SECRET_NO_KEY: "the secret table has no transport key entry",
    MhStatus.SECRET_KEY_LEN: "the transport key entry is not 32 bytes",
    MhStatus.SECRET_ID_LEN: "the migration id entry is not 16 bytes",
    MhStatus.CONFIG: "the helper's context is inconsistent (firmware bug)",
    MhStatus.MAC_MISSING: "a page of the range has no MAC in the helper's table yet (MAC_RANGE it first)",
    MhStatus.SIDE: "the op is not allowed on this side (seal on the source, check and open on the target)",
    MhStatus.MANIFEST_AUTH: "the sealed manifest does not open (changed, malformed, another key, or not "
    "sealed by a source helper)",
    MhStatus.MANIFEST_ID: "the manifest belongs to another migration id",
    MhStatus.MANIFEST_RANGE: "the manifest covers another range, chunk size or number of vCPUs",
    MhStatus.MANIFEST_BITMAP: "the encryption bitmap differs from the source's",
    MhStatus.MANIFEST_STATE: "the hash of the vCPU and device state differs from the source's",
    MhStatus.MANIFEST_ROUNDS: "the number of rounds differs from the source's",
    MhStatus.MANIFEST_VMSA: "a vCPU's opened register state is not the one the source sealed last",
    MhStatus.MANIFEST_GENERATIONS: "a page's final generation differs from the source's (its last sealed "
    "copy did not arrive)",
    MhStatus.MANIFEST_MAC: "a page's MAC differs from the source's (its content differs)",
    MhStatus.MANIFEST_BUSY: "the helper's tables changed while the manifest was checked: check again",
    MhStatus.STATE_LABEL: "the sealed vCPU state is authentic but was sealed for another vCPU or migration",
    MhStatus.NOT_SNP: "a key-release op in a guest not booted as SEV-SNP",
    MhStatus.ENTROPY: "the helper has no RDRAND, or RDRAND kept failing: no key pair can be drawn",
    MhStatus.KEY_STATE: "the key-release op came out of order (request, report, release; one release a key)",
    MhStatus.KEY_MSG: "the secure processor's response has a wrong header, size or sequence number "
    "(replayed or changed)",
    MhStatus.KEY_MSG_AUTH: "the secure processor's response does not open under VMPCK0 (changed)",
    MhStatus.KEY_PSP: "the secure processor refused the request, or its report is not about what was asked "
    "(REPORT_DATA, VMPL, size)",
    MhStatus.KEY_WRAP: "the wrapped key is malformed (magic or length)",
    MhStatus.KEY_AUTH: "the wrapped key does not open for this helper's key and report (or a low-order "
    "owner key)",
    MhStatus.KEY_HELPER: "key-release ops run on helper 0 only",
}

# The key release's refusals (docs/key-release.md).
KEY_REFUSALS = frozenset(MhStatus(c) for c in range(MhStatus.NOT_SNP, MhStatus.KEY_HELPER + 1))


# CHECK_MANIFEST's statuses that refuse a manifest (each names a field); any other is the op's own failure.
MANIFEST_REFUSALS = frozenset(MhStatus(c) for c in range(MhStatus.MANIFEST_AUTH, MhStatus.MANIFEST_BUSY + 1))


def status_name(code: int) -> str:
    """``NAME (meaning)`` for a status code, or the raw number for an unknown one."""
    try:
        st = MhStatus(code)
    except ValueError:
        return f"unknown status {code}"
    return f"{st.name} ({st.meaning})"


class MailboxError(ConfplanError):
    """An op the helper refused or did not answer; names the op, the MH vCPU and the status."""

    def __init__(
        self, message: str, *, op: Op, mh_index: int, status: int, statuses: array.array[int] | None = None,
        hint: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message, hint=hint)
        self.op, self.mh_index, self.status = op, mh_index, status
        self.statuses = statuses
