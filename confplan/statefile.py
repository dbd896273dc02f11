"""Small files that must never be half-written or silently damaged: magic, version, length, SHA-256.

Used by the secure processor's and the key broker's state (sev/) and the handover's durable records
(migration/handover.py); it sits beside ``errors`` so any layer may use it.

Layout: MAGIC[8] | u32 version | u32 payload length | payload | SHA-256(header + payload)[32].
Written atomically (temp file in the same directory, fsync, rename, fsync the directory), mode 0600.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from pathlib import Path

from confplan.errors import ConfplanError

_HEAD = struct.Struct("<8sII")


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def pack_state(magic: bytes, version: int, payload: bytes) -> bytes:
    head = _HEAD.pack(magic, version, len(payload))
    return head + payload + hashlib.sha256(head + payload).digest()


def unpack_state(path: Path, raw: bytes, magic: bytes, version: int) -> bytes:
    """Check magic, version, length and checksum of a state file; return its payload."""
    what = f"{path}"
    if len(raw) < _HEAD.size + 32 or raw[:8] != magic:
        raise ConfplanError(
            f"{what}: not a {magic.decode(errors='replace')} file (bad magic)",
            hint="point at the right file, or move this one away so a new one is created",
        )
    _, got_version, length = _HEAD.unpack_from(raw)
    if got_version != version:
        raise ConfplanError(
            f"{what}: format version {got_version}, this confplan reads version {version}",
            hint="use the confplan version that wrote it",
        )
    end = _HEAD.size + length
    if len(raw) != end + 32 or hashlib.sha256(raw[:end]).digest() != raw[end:]:
        raise ConfplanError(
            f"{what}: checksum mismatch (the file is truncated or damaged)",
            hint="restore it from a backup; it cannot be repaired",
        )
    return raw[_HEAD.size : end]
