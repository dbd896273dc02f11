"""The SEV hashes table: SHA-256 of the kernel, initrd and command line, placed in guest memory so that
a measured direct boot covers them (QEMU ``sev_add_kernel_loader_hashes``, sev-snp-measure ``sev_hashes.py``).

Layout: header GUID 9438d606-..., u16 length (0xA8), then three entries GUID + u16 length (0x32) + hash:
cmdline (97d02dd8-...), initrd (44baf731-...), kernel (4de79437-...); padded with zeros to 16 bytes. The
command line is hashed with its terminating NUL ("" hashes one NUL byte); a missing initrd hashes as empty.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from dataclasses import dataclass

TABLE_GUID = uuid.UUID("9438d606-4f22-4cc9-b479-a793d411fd21")
KERNEL_GUID = uuid.UUID("4de79437-abd2-427f-b835-d5b172d2045b")
INITRD_GUID = uuid.UUID("44baf731-3a2f-4bd7-9af1-41e29169781d")
CMDLINE_GUID = uuid.UUID("97d02dd8-bd20-4c94-aa78-e7714d36ab2a")
ENTRY_LEN = 16 + 2 + 32
TABLE_LEN = 16 + 2 + 3 * ENTRY_LEN
PAGE = 4096


@dataclass(frozen=True)
class SevHashes:
    """The three hashes a measured direct boot binds."""

    kernel: bytes
    initrd: bytes
    cmdline: bytes

    @classmethod
    def of(cls, kernel: bytes, initrd: bytes | None = None, append: str | None = None) -> SevHashes:
        cmdline = (append or "").encode() + b"\x00"
        sha = hashlib.sha256
        return cls(sha(kernel).digest(), sha(initrd or b"").digest(), sha(cmdline).digest())

    def table(self) -> bytes:
        """The table, zero-padded to a multiple of 16 bytes."""
        out = TABLE_GUID.bytes_le + struct.pack("<H", TABLE_LEN)
        for guid, digest in (
            (CMDLINE_GUID, self.cmdline),
            (INITRD_GUID, self.initrd),
            (KERNEL_GUID, self.kernel),
        ):
            out += guid.bytes_le + struct.pack("<H", ENTRY_LEN) + digest
        return out + bytes(-len(out) % 16)

    def page(self, offset: int) -> bytes:
        """A 4 KiB page holding the table at ``offset`` (SNP measures the whole page)."""
        table = self.table()
        if not 0 <= offset <= PAGE - len(table):
            raise ValueError(f"the SEV hashes table does not fit in a page at offset {offset:#x}")
        return bytes(offset) + table + bytes(PAGE - offset - len(table))
