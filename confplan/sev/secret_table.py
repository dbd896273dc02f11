"""The guest's secret table in the layout Linux's efi_secret driver and OVMF use (the SEV secret area).

Layout (all GUIDs in EFI byte order, i.e. ``uuid.UUID.bytes_le``; integers little-endian):
  header: GUID 1e74f542-71dd-4d66-963e-ef4287ff173b (16 B), u32 total length of header + entries
  entry:  GUID (16 B), u32 length of this entry = 20 + len(data), data
At most 64 entries. The table is zero-padded to a multiple of 16 bytes so LAUNCH_SECRET can carry it.
The in-guest migration helper finds the transport key by ``CONFPLAN_TRANSPORT_KEY_GUID``.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Mapping

SECRET_TABLE_HEADER_GUID = uuid.UUID("1e74f542-71dd-4d66-963e-ef4287ff173b")
# OVMF's GUID-table entry that tells the host where the secret area is ({u32 base, u32 size}).
SEV_SECRET_AREA_GUID = uuid.UUID("4c2eb361-7d9b-4cc3-8081-127c90d3d294")
# confplan's own entry: the AES-256 key that seals pages in transit for one migration. Random, fixed.
CONFPLAN_TRANSPORT_KEY_GUID = uuid.UUID("6b3f2a9e-51c4-4d7e-9a0b-c2f18e7d4a35")
# Optional: the owner's 16-byte migration id, bound into every sealed page's AAD (firmware/mh/secret.c).
CONFPLAN_MIGRATION_ID_GUID = uuid.UUID("6b519384-fec4-4e17-9bbd-4fccc92f780f")
MIGRATION_ID_LEN = 16

HEADER_LEN = 20
ENTRY_HEADER_LEN = 20
MAX_ENTRIES = 64


class SecretTableError(ValueError):
    """A secret table that does not parse."""


def build_secret_table(entries: Mapping[uuid.UUID, bytes]) -> bytes:
    """Lay ``entries`` out as an efi_secret table, padded to 16 bytes."""
    if len(entries) > MAX_ENTRIES:
        raise SecretTableError(f"a secret table holds at most {MAX_ENTRIES} entries, got {len(entries)}")
    body = b"".join(
        guid.bytes_le + struct.pack("<I", ENTRY_HEADER_LEN + len(data)) + data
        for guid, data in entries.items()
    )
    table = SECRET_TABLE_HEADER_GUID.bytes_le + struct.pack("<I", HEADER_LEN + len(body)) + body
    return table + b"\x00" * (-len(table) % 16)


def parse_secret_table(raw: bytes) -> dict[uuid.UUID, bytes]:
    """Parse an efi_secret table (the same walk the in-guest helper does in C). Pure; raises on damage."""
    if len(raw) < HEADER_LEN or uuid.UUID(bytes_le=raw[:16]) != SECRET_TABLE_HEADER_GUID:
        raise SecretTableError("no secret table header GUID at the start of the secret area")
    (total,) = struct.unpack_from("<I", raw, 16)
    if not HEADER_LEN <= total <= len(raw):
        raise SecretTableError(f"secret table length {total} is outside [{HEADER_LEN}, {len(raw)}]")
    entries: dict[uuid.UUID, bytes] = {}
    pos = HEADER_LEN
    while pos < total:
        if len(entries) == MAX_ENTRIES or pos + ENTRY_HEADER_LEN > total:
            raise SecretTableError(f"secret table entry at offset {pos} overruns the table")
        guid = uuid.UUID(bytes_le=raw[pos : pos + 16])
        (length,) = struct.unpack_from("<I", raw, pos + 16)
        if length < ENTRY_HEADER_LEN or pos + length > total:
            raise SecretTableError(f"secret table entry {guid} at offset {pos} has bad length {length}")
        entries[guid] = raw[pos + ENTRY_HEADER_LEN : pos + length]
        pos += length
    return entries


def find_transport_key(raw: bytes) -> bytes:
    """The migration transport key from a secret area, looked up by ``CONFPLAN_TRANSPORT_KEY_GUID``."""
    entries = parse_secret_table(raw)
    try:
        return entries[CONFPLAN_TRANSPORT_KEY_GUID]
    except KeyError:
        raise SecretTableError(f"the secret table has no entry {CONFPLAN_TRANSPORT_KEY_GUID}") from None
