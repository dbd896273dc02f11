"""Small files that must never be half-written or silently damaged: magic, version, length, SHA-256.

Used by the secure processor's and the key broker's state (sev/) and the handover's durable records
(migration/handover.py), and (``write_output``) for the reports a user asks for; it sits beside
``errors`` so any layer may use it.

Layout: MAGIC[8] | u32 version | u32 payload length | payload | SHA-256(header + payload)[32].
Written atomically (temp file in the same directory, fsync, rename, fsync the directory), mode 0600.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import tempfile
from pathlib import Path

from confplan.errors import ConfplanError, EnvironmentProblem

_HEAD = struct.Struct("<8sII")


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600."""
    write_atomic(path, data, mode=0o600)


def write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode``, atomically: readers see the old file or all the new one."""
    StagedWrite(path, data, mode=mode).commit()


class StagedWrite:
    """``write_atomic`` in two halves: building it writes and fsyncs a temp file beside ``path`` (the slow
    half, done ahead of time); ``commit`` renames it into place and fsyncs the directory, so ``path`` is
    durable when it returns; ``discard`` drops it (``path`` untouched). A crash before the commit leaves at
    most a stray hidden temp file, never a changed ``path``."""

    def __init__(self, path: Path, data: bytes, *, mode: int = 0o600) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        self._tmp: Path | None = Path(tmp)
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        tmp, self._tmp = self._tmp, None
        if tmp is None:
            raise ValueError(f"the staged write of {self.path} was already committed or discarded")
        try:
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def discard(self) -> None:
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            tmp.unlink(missing_ok=True)


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


def write_output(path: Path, text: str, *, what: str) -> None:
    """Write a file the user asked for (a report) atomically, mode 0644; a path that cannot be written is
    the user's to fix (exit 2), a full or read-only disk the machine's (exit 3)."""
    try:
        write_atomic(path, text.encode(), mode=0o644)
    except OSError as err:
        kind = EnvironmentProblem if err.errno in _FULL else ConfplanError
        raise kind(
            f"cannot write the {what} to {path}: {err.strerror or err}",
            hint="give a path in a folder that exists and that you can write, on a disk with free space",
        ) from None


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
