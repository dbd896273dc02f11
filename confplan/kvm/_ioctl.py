"""The raw ioctl/mmap plumbing: the only module that calls into libc for KVM.

Everything goes through ``libc.ioctl`` via ctypes (a CDLL call releases the GIL, so KVM_RUN on several
vCPU threads runs in parallel); pointers are passed as ctypes addresses because ``fcntl.ioctl`` takes
only a signed int argument.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


class KvmError(OSError):
    """An ioctl failed: ``KvmError(errno, "KVM_GET_REGS")``; the message names the ioctl."""

    def __init__(self, errno: int, what: str) -> None:
        super().__init__(errno, f"{what}: {os.strerror(errno)}")
        self.what = what


IoctlArg = int | ctypes.Structure | ctypes.Array[Any] | None


def ioctl(fd: int, request: int, arg: IoctlArg, what: str) -> int:
    """Issue one ioctl; raise KvmError naming ``what`` when it fails; return its non-negative result."""
    if arg is None:
        ptr: int | None = None
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    ret: int = _libc.ioctl(fd, request, ptr)
    if ret < 0:
        raise KvmError(ctypes.get_errno(), what)
    return ret


def ioctl_errno(fd: int, request: int) -> int:
    """An argument-less ioctl returning ``-errno`` instead of raising (KVM_RUN's hot path)."""
    ret: int = _libc.ioctl(fd, request, None)
    if ret < 0:
        return -ctypes.get_errno()
    return ret
