"""The page-transfer core: C (pagecore.c, built by the install step, loaded with ctypes) and its typed API.

``pages`` moves pages (bitmap scans, shared-page gather/scatter, sealed-record framing, CRC-32C) without a
per-page Python loop; ``wire`` owns the stream's byte layout (docs/wire.md) and the control frames.
Importing this package does not load the library: the first call does, and a missing or stale build is an
``EnvironmentProblem`` that says how to rebuild.
"""

from __future__ import annotations

from confplan.core._buffers import HostMemory, zeroed
from confplan.core.pages import (
    FrameInfo,
    crc32c,
    crc32c_uses_hardware,
    crc_table,
    forget_pages,
    frame_sealed_pages,
    frame_shared_pages,
    page_is_zero,
    scan_dirty,
    unframe_sealed_pages,
    unframe_shared_pages,
)
from confplan.core.status import CoreStatus, PageCoreError

__all__ = [
    "CoreStatus",
    "FrameInfo",
    "HostMemory",
    "PageCoreError",
    "crc32c",
    "crc32c_uses_hardware",
    "crc_table",
    "forget_pages",
    "frame_sealed_pages",
    "frame_shared_pages",
    "page_is_zero",
    "scan_dirty",
    "unframe_sealed_pages",
    "unframe_shared_pages",
    "zeroed",
]
