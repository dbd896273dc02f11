"""The C core's status codes and the one error type they become in Python.

Every refusal carries the code, the page or record index and the offending and expected values the core
reported, so a message can say what was wrong, where, and what to do.
"""

from __future__ import annotations

import enum

from confplan.core._lib import ErrorC
from confplan.errors import ConfplanError

NO_INDEX = 0xFFFFFFFF


class CoreStatus(enum.IntEnum):
    """enum cp_status in pagecore.h."""

    OK = 0
    ARG = -1
    TRUNCATED = -2
    MAGIC = -3
    VERSION = -4
    HEADER_CRC = -5
    TYPE = -6
    FLAGS = -7
    PAYLOAD_LEN = -8
    PAYLOAD_CRC = -9
    COUNT = -10
    GPA_ALIGN = -11
    GPA_RANGE = -12
    SPACE = -13
    SEAL_STATUS = -14
    GPA_MISMATCH = -15
    SEQUENCE = -64  # Python side only (stream.FrameReader): a frame lost, repeated or moved
    AUTH_TAG = -65  # Python side only (frameauth): a protected frame's tag does not verify
    UNPROTECTED = -66  # Python side only (stream.FrameReader): PROTECTED flag not what the stream uses


_WHAT: dict[CoreStatus, str] = {
    CoreStatus.ARG: "invalid argument (value {value:#x})",
    CoreStatus.TRUNCATED: "truncated: {value} bytes where {expected} are needed",
    CoreStatus.MAGIC: "bad magic {value:#010x} (expected {expected:#010x}): not a confplan stream",
    CoreStatus.VERSION: "wire version {value}, this confplan speaks {expected}",
    CoreStatus.HEADER_CRC: "header CRC-32C {value:#010x} does not match {expected:#010x}",
    CoreStatus.TYPE: "frame type {value} where {expected} was expected",
    CoreStatus.FLAGS: "flags or reserved field {value:#x} not allowed",
    CoreStatus.PAYLOAD_LEN: "payload length {value} inconsistent (expected {expected})",
    CoreStatus.PAYLOAD_CRC: "payload CRC-32C {value:#010x} does not match {expected:#010x}",
    CoreStatus.COUNT: "{value} pages in one frame, the maximum is {expected}",
    CoreStatus.GPA_ALIGN: "GPA {value:#x} is not page-aligned",
    CoreStatus.GPA_RANGE: "GPA {value:#x} lies outside guest RAM (which ends at {expected:#x})",
    CoreStatus.SPACE: "output buffer too small: {value} needed, {expected} available",
    CoreStatus.SEAL_STATUS: "the migration helper reported status {value} for this page",
    CoreStatus.GPA_MISMATCH: "sealed record for GPA {value:#x}, but GPA {expected:#x} was asked for",
    CoreStatus.SEQUENCE: "frame number {value} where {expected} was expected: replayed or reordered",
    CoreStatus.AUTH_TAG: "its tag does not verify: changed in transit or not sent by the peer",
    CoreStatus.UNPROTECTED: "PROTECTED flag {value} on a stream that uses {expected}",
}

_STREAM_CODES = frozenset(
    {
        CoreStatus.TRUNCATED,
        CoreStatus.MAGIC,
        CoreStatus.HEADER_CRC,
        CoreStatus.TYPE,
        CoreStatus.FLAGS,
        CoreStatus.PAYLOAD_LEN,
        CoreStatus.PAYLOAD_CRC,
        CoreStatus.COUNT,
        CoreStatus.GPA_ALIGN,
        CoreStatus.GPA_RANGE,
    }
)


class PageCoreError(ConfplanError):
    """The C core refused an operation; ``code`` says why, ``index`` which page or record (or None)."""

    def __init__(
        self,
        message: str,
        *,
        code: CoreStatus,
        index: int | None = None,
        value: int = 0,
        expected: int = 0,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.code = code
        self.index = index
        self.value = value
        self.expected = expected


def _hint(code: CoreStatus) -> str:
    if code is CoreStatus.VERSION:
        return "run the same confplan version on the source and the target"
    if code is CoreStatus.SEAL_STATUS:
        return "see the migration helper's log on the source; the page was not sealed"
    if code in _STREAM_CODES:
        return (
            "the migration stream was corrupted in transit or the peer is not a matching confplan; "
            "nothing was written for this frame: abort and rerun the migration"
        )
    return "this is a bug in the caller of confplan.core: please report it with this message"


def raise_for(rc: int, err: ErrorC, where: str) -> None:
    """Raise PageCoreError for a non-zero status ``rc``; ``where`` names the operation (and frame)."""
    if rc == 0:
        return
    try:
        code = CoreStatus(rc)
    except ValueError:
        code = CoreStatus.ARG
    index = None if err.index == NO_INDEX else int(err.index)
    what = _WHAT.get(code, "status {value}").format(value=err.value, expected=err.expected)
    at = f" (page {index})" if index is not None else ""
    raise PageCoreError(
        f"{where}{at}: {what}",
        code=code,
        index=index,
        value=int(err.value),
        expected=int(err.expected),
        hint=_hint(code),
    )
