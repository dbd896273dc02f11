"""An OVMF image as the launch digest sees it: its GUIDed footer table and SEV metadata sections.

The table ends 32 bytes before the end of the image: walking back from there, each entry is data, then
a u16 length (of the whole entry) and a GUID; the last entry read is the footer (96b582de-...), whose length
spans the table. The SEV metadata (dc886566-...) points, as an offset from the end, at "ASEV", u32 size,
u32 version = 1, u32 count, then count x (gpa u32, size u32, type u32). Layout as edk2's
OvmfPkg/ResetVector and sev-snp-measure ``ovmf.py`` read it. The image sits just below 4 GiB.
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass

from confplan.errors import ConfplanError

FOUR_GB = 0x1_0000_0000
FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
SEV_HASH_TABLE_RV_GUID = uuid.UUID("7255371f-3a3b-4b04-927b-1da6efa8d454")
SEV_ES_RESET_BLOCK_GUID = uuid.UUID("00f771de-1a7e-4fcb-890e-68c77e2fb44e")
SEV_METADATA_GUID = uuid.UUID("dc886566-984a-4798-a75e-5585a7bf67cc")
ENTRY_HEADER_LEN = 18  # u16 length + GUID


class SectionType(enum.IntEnum):
    """OVMF SEV metadata section types (edk2 OvmfSevMetadata.asm)."""

    SNP_SEC_MEM = 1
    SNP_SECRETS = 2
    CPUID = 3
    SVSM_CAA = 4
    SNP_KERNEL_HASHES = 0x10


@dataclass(frozen=True)
class MetadataSection:
    gpa: int
    size: int
    kind: SectionType


class OvmfError(ConfplanError):
    """An OVMF image that lacks what the requested measurement needs."""


@dataclass(frozen=True)
class Ovmf:
    """An OVMF image: its bytes, where it is loaded, its footer table and its SEV metadata sections."""

    data: bytes
    table: dict[uuid.UUID, bytes]
    sections: tuple[MetadataSection, ...]
    end: int = FOUR_GB

    @classmethod
    def parse(cls, data: bytes, end: int = FOUR_GB, where: str = "OVMF") -> Ovmf:
        table = _footer_table(data, where)
        return cls(data, table, _metadata(data, table, where), end)

    @property
    def gpa(self) -> int:
        return self.end - len(self.data)

    def has_section(self, kind: SectionType) -> bool:
        return any(s.kind == kind for s in self.sections)

    def _entry_u32(self, guid: uuid.UUID, what: str) -> int:
        if guid not in self.table:
            raise OvmfError(
                f"the OVMF footer table has no {what} entry ({guid})", hint="use an SEV build of OVMF"
            )
        return int(struct.unpack_from("<I", self.table[guid])[0])

    def sev_es_reset_eip(self) -> int:
        """Where the APs start (SEV-ES reset block)."""
        return self._entry_u32(SEV_ES_RESET_BLOCK_GUID, "SEV-ES reset block")

    def sev_hashes_table_gpa(self) -> int:
        return self._entry_u32(SEV_HASH_TABLE_RV_GUID, "SEV hashes table")

    @property
    def supports_kernel_hashes(self) -> bool:
        return SEV_HASH_TABLE_RV_GUID in self.table and self.sev_hashes_table_gpa() != 0


def _footer_table(data: bytes, where: str) -> dict[uuid.UUID, bytes]:
    start = len(data) - 32 - ENTRY_HEADER_LEN
    if start < 0:
        raise OvmfError(f"{where}: {len(data)} bytes is too short for an OVMF image")
    size, guid = struct.unpack_from("<H", data, start)[0], uuid.UUID(bytes_le=data[start + 2 : start + 18])
    table: dict[uuid.UUID, bytes] = {}
    if guid != FOOTER_GUID or size < ENTRY_HEADER_LEN:
        return table  # not an SEV-aware OVMF: no table
    body = data[start - (size - ENTRY_HEADER_LEN) : start]
    while len(body) >= ENTRY_HEADER_LEN:
        length = struct.unpack_from("<H", body, len(body) - ENTRY_HEADER_LEN)[0]
        if length < ENTRY_HEADER_LEN or length > len(body):
            raise OvmfError(f"{where}: an OVMF footer table entry has a bad length {length}")
        guid = uuid.UUID(bytes_le=body[len(body) - 16 :])
        table[guid] = body[len(body) - length : len(body) - ENTRY_HEADER_LEN]
        body = body[: len(body) - length]
    return table


def _metadata(data: bytes, table: dict[uuid.UUID, bytes], where: str) -> tuple[MetadataSection, ...]:
    if SEV_METADATA_GUID not in table:
        return ()
    start = len(data) - struct.unpack_from("<I", table[SEV_METADATA_GUID])[0]
    if not 0 <= start <= len(data) - 16:
        raise OvmfError(f"{where}: the SEV metadata offset points outside the image")
    sig, size, version, count = struct.unpack_from("<4sIII", data, start)
    if sig != b"ASEV" or version != 1:
        raise OvmfError(f"{where}: SEV metadata signature {sig!r} version {version}, expected 'ASEV' 1")
    if 16 + 12 * count > size or start + size > len(data):
        raise OvmfError(f"{where}: SEV metadata of {size} bytes cannot hold {count} sections")
    sections = []
    for i in range(count):
        gpa, length, kind = struct.unpack_from("<III", data, start + 16 + 12 * i)
        try:
            sections.append(MetadataSection(gpa, length, SectionType(kind)))
        except ValueError:
            raise OvmfError(f"{where}: SEV metadata section {i} has unknown type {kind}") from None
    return tuple(sections)
