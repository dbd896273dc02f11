"""The ctypes loader for the C page-transfer core (``_pagecore*.so``, built by setup.py from pagecore.c).

One loader (``lib()``, cached, ``use_errno=True``), every prototype in one table, the C structs mirrored
here with their sizes checked against the library at load, and the ABI version checked so a stale build
is reported as an environment problem instead of corrupting memory.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from pathlib import Path
from typing import Any

from confplan.errors import EnvironmentProblem

ABI_VERSION = 5
_REBUILD_HINT = "rebuild the C core: run 'make install' (or 'pip install -e .') in the confplan checkout"


class FrameHeaderC(ctypes.Structure):
    """struct cp_frame_header."""

    _fields_ = (
        ("magic", ctypes.c_uint32),
        ("version", ctypes.c_uint16),
        ("type", ctypes.c_uint16),
        ("flags", ctypes.c_uint32),
        ("payload_len", ctypes.c_uint32),
        ("seq", ctypes.c_uint64),
        ("payload_crc32c", ctypes.c_uint32),
        ("header_crc32c", ctypes.c_uint32),
    )


class SealedPageC(ctypes.Structure):
    """struct cp_sealed_page: one record the migration helper writes into its data area."""

    _fields_ = (
        ("gpa", ctypes.c_uint64),
        ("generation", ctypes.c_uint32),
        ("status", ctypes.c_uint32),
        ("nonce", ctypes.c_uint8 * 12),
        ("key_id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 16),
        ("reserved", ctypes.c_uint8 * 16),
        ("ct", ctypes.c_uint8 * 4096),
    )


class ErrorC(ctypes.Structure):
    """struct cp_error: where a refusal happened."""

    _fields_ = (
        ("code", ctypes.c_int32),
        ("index", ctypes.c_uint32),
        ("value", ctypes.c_uint64),
        ("expected", ctypes.c_uint64),
    )


class FrameInfoC(ctypes.Structure):
    """struct cp_frame_info: what an (un)frame call found."""

    _fields_ = (
        ("seq", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
        ("zero_pages", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("frame_len", ctypes.c_uint64),
    )


# cp_query selectors (enum in pagecore.h)
Q_MAGIC = 1
Q_WIRE_VERSION = 2
Q_HEADER_SIZE = 3
Q_MAX_PAYLOAD = 4
Q_MAX_FRAME_PAGES = 5
Q_SEALED_PAGE_SIZE = 6
Q_CRC_HW = 7
Q_TAG_SIZE = 8

_vp = ctypes.c_void_p
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64
_size = ctypes.c_size_t
_pu64 = ctypes.POINTER(ctypes.c_uint64)
_perr = ctypes.POINTER(ErrorC)
_pinfo = ctypes.POINTER(FrameInfoC)
_phdr = ctypes.POINTER(FrameHeaderC)
_int = ctypes.c_int

# the data loops' callback (datapath.h cp_dp_poke_fn)
POKE_C = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int32)

# name: (restype, argtypes)
PROTOTYPES: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "cp_abi_version": (_int, ()),
    "cp_query": (_u64, (_int,)),
    "cp_crc32c": (_u32, (_u32, _vp, _size)),
    "cp_crc32c_select": (_int, (_int,)),
    "cp_page_is_zero": (_int, (_vp,)),
    "cp_scan_count": (_int, (_vp, _vp, _u64, _pu64, _pu64)),
    "cp_scan": (_int, (_vp, _vp, _u64, _u64, _vp, _u64, _vp, _u64, _pu64, _pu64, _perr)),
    "cp_frame_finish": (_int, (_vp, _size, _u32, _u32, _u64, _u32, _perr)),
    "cp_header_check": (_int, (_vp, _size, _phdr, _perr)),
    "cp_frame_check": (_int, (_vp, _size, _phdr, _perr)),
    "cp_frame_protect": (_int, (_vp, _size, _vp, _vp, _size, _pu64, _phdr, _perr)),
    "cp_frame_aad": (_int, (_vp, _size, _vp, _size, _pu64, _perr)),
    "cp_frame_shared": (_int, (_vp, _size, _vp, _u64, _u64, _vp, _u32, _u64, _pinfo, _perr)),
    "cp_unframe_shared": (_int, (_vp, _size, _vp, _u64, _u64, _vp, _u32, _pinfo, _perr)),
    "cp_frame_sealed": (_int, (_vp, _size, _vp, _u32, _vp, _u64, _u64, _u64, _pinfo, _perr)),
    "cp_unframe_sealed": (_int, (_vp, _size, _vp, _u32, _u64, _u64, _vp, _u32, _pinfo, _perr)),
    "cp_dp_send_sealed": (ctypes.c_int32, (_vp, POKE_C)),
    "cp_dp_recv_sealed": (ctypes.c_int32, (_vp, POKE_C)),
    "cp_rearm_pages": (ctypes.c_int32, (_vp, _vp, _u64)),
    "cp_helper_run": (ctypes.c_int32, (_vp,)),
    "cp_crc_table": (_int, (_vp, _u64, _u64, _vp, _u64, _vp, _vp, _u64, ctypes.POINTER(_u32), _pu64, _perr)),
    "cp_forget_pages": (_int, (_vp, _u64, _u64, _vp, _u64, _perr)),
}


def library_path() -> Path:
    """Where the built core lives: next to this module, named with this interpreter's extension suffix."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_pagecore{suffix}"
        if candidate.exists():
            return candidate
    raise EnvironmentProblem(
        f"the C page-transfer core is not built: no _pagecore*.so in {here}", hint=_REBUILD_HINT
    )


def _bind(dll: ctypes.CDLL) -> None:
    for name, (restype, argtypes) in PROTOTYPES.items():
        try:
            fn = getattr(dll, name)
        except AttributeError as exc:
            raise EnvironmentProblem(
                f"the C core at {dll._name} lacks {name}(): it is older than this confplan",
                hint=_REBUILD_HINT,
            ) from exc
        fn.restype = restype
        fn.argtypes = argtypes


def _check_layout(dll: ctypes.CDLL, path: Path) -> None:
    abi = dll.cp_abi_version()
    if abi != ABI_VERSION:
        raise EnvironmentProblem(
            f"the C core at {path} has ABI version {abi}, this confplan needs {ABI_VERSION}",
            hint=_REBUILD_HINT,
        )
    sizes = {Q_HEADER_SIZE: ctypes.sizeof(FrameHeaderC), Q_SEALED_PAGE_SIZE: ctypes.sizeof(SealedPageC)}
    for which, size in sizes.items():
        if dll.cp_query(which) != size:
            raise EnvironmentProblem(
                f"the C core at {path} disagrees on a struct size ({dll.cp_query(which)} != {size})",
                hint=_REBUILD_HINT,
            )


@functools.cache
def lib() -> ctypes.CDLL:
    """The loaded, checked core. Raises EnvironmentProblem when it is missing, unloadable or stale."""
    path = library_path()
    try:
        dll = ctypes.CDLL(str(path), use_errno=True)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot load the C core {path}: {exc}", hint=_REBUILD_HINT) from exc
    _bind(dll)
    _check_layout(dll, path)
    return dll
