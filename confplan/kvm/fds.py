"""One class per KVM file descriptor: ``Kvm`` (/dev/kvm), ``Vm``, ``Vcpu``.

Each method is one ioctl on the fd its object owns; failures raise ``KvmError`` naming the ioctl. Every
fd and mmap is closed by its owner (``close()`` or the context manager).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass
from typing import Final

from confplan.errors import EnvironmentProblem
from confplan.kvm import structs as s
from confplan.kvm._ioctl import KvmError, ioctl, ioctl_errno
from confplan.kvm.stats import StatsFd

DEFAULT_KVM_PATH: Final = "/dev/kvm"
KVM_DEVICE_ENV: Final = "CONFPLAN_KVM_DEVICE"  # another KVM device node (a container's, or a test's)


def kvm_device_path() -> str:
    """The KVM device confplan opens: ``$CONFPLAN_KVM_DEVICE``, else /dev/kvm. VMM processes inherit it."""
    return os.environ.get(KVM_DEVICE_ENV) or DEFAULT_KVM_PATH

# Capabilities the VMM cannot run without, checked once and reported by name.
REQUIRED_CAPS: Final = {
    "KVM_CAP_USER_MEMORY": s.KVM_CAP_USER_MEMORY,
    "KVM_CAP_EXT_CPUID": s.KVM_CAP_EXT_CPUID,
    "KVM_CAP_IMMEDIATE_EXIT": s.KVM_CAP_IMMEDIATE_EXIT,
    "KVM_CAP_XCRS": s.KVM_CAP_XCRS,
    "KVM_CAP_IRQCHIP": s.KVM_CAP_IRQCHIP,
}


def open_kvm_fd(path: str | None = None) -> int:
    """Open the KVM device, or raise EnvironmentProblem saying what is wrong and what to do."""
    path = path or kvm_device_path()
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise EnvironmentProblem(
            f"{path} does not exist: this machine offers no KVM",
            hint="load the kvm module (a kernel with CONFIG_KVM) or run on a host with virtualization; "
            "tests that need KVM are skipped here",
        ) from None
    except PermissionError:
        raise EnvironmentProblem(
            f"{path} is not readable and writable by this user",
            hint=f"add the user to the group that owns {path} (often 'kvm') or run as root",
        ) from None
    except OSError as err:
        raise EnvironmentProblem(
            f"cannot open {path}: {err.strerror}", hint="check that KVM works here"
        ) from None


class Kvm:
    """The system fd: API version, capabilities, supported CPUID, VM creation."""

    def __init__(self, path: str | None = None) -> None:
        """Open ``path`` (default ``kvm_device_path()``) and check it is KVM with the needed features;
        EnvironmentProblem otherwise (a device that is not KVM included)."""
        self.path = path = path or kvm_device_path()
        self.fd = open_kvm_fd(path)
        try:
            version = self._api_version()
            if version != s.KVM_API_VERSION:
                raise EnvironmentProblem(
                    f"{path} speaks KVM API {version}, confplan needs {s.KVM_API_VERSION}",
                    hint="use a Linux kernel with the standard KVM API",
                )
            self.require(REQUIRED_CAPS)
        except BaseException:
            self.close()
            raise

    def _api_version(self) -> int:
        """KVM_GET_API_VERSION; a device that does not know it (ENOTTY, EINVAL) is not KVM."""
        try:
            return ioctl(self.fd, s.KVM_GET_API_VERSION, None, "KVM_GET_API_VERSION")
        except KvmError as err:
            if err.errno not in (errno.ENOTTY, errno.EINVAL):
                raise
            raise EnvironmentProblem(
                f"{self.path} is not a KVM device (KVM_GET_API_VERSION: {os.strerror(err.errno)})",
                hint=f"point {KVM_DEVICE_ENV} at the KVM device (unset it for /dev/kvm), or check that "
                "/dev/kvm is the kvm module's device (`ls -l /dev/kvm`: character device 10,232)",
            ) from None

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when the capability is absent, else its value."""
        return ioctl(self.fd, s.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def max_vcpus(self) -> int:
        """The most vCPUs a VM may have: KVM_CAP_MAX_VCPUS, else KVM_CAP_NR_VCPUS, else 4 (the rule of
        KVM's api.rst for KVM_CREATE_VCPU)."""
        return self.check_extension(s.KVM_CAP_MAX_VCPUS) or self.check_extension(s.KVM_CAP_NR_VCPUS) or 4

    def require(self, caps: dict[str, int]) -> None:
        """Raise EnvironmentProblem naming every capability in ``caps`` that this KVM lacks."""
        missing = [name for name, cap in caps.items() if self.check_extension(cap) == 0]
        if missing:
            raise EnvironmentProblem(
                f"{self.path} lacks {', '.join(missing)}", hint="use a newer kernel with these KVM features"
            )

    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes of each vCPU's kvm_run mapping."""
        return ioctl(self.fd, s.KVM_GET_VCPU_MMAP_SIZE, None, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self) -> s.KvmCpuid2:
        """KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can give a guest."""
        cpuid = s.KvmCpuid2(nent=s.KVM_MAX_CPUID_ENTRIES)
        ioctl(self.fd, s.KVM_GET_SUPPORTED_CPUID, cpuid, "KVM_GET_SUPPORTED_CPUID")
        return cpuid

    def create_vm(self) -> Vm:
        """KVM_CREATE_VM (default VM type)."""
        return Vm(self, ioctl(self.fd, s.KVM_CREATE_VM, 0, "KVM_CREATE_VM"))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Vm:
    """A VM fd: memslots, dirty log, vCPUs, VM capabilities, stats."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM (some answers depend on the VM)."""
        return ioctl(self.fd, s.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def enable_cap(self, cap: int, *args: int) -> None:
        """KVM_ENABLE_CAP with up to four arguments."""
        req = s.KvmEnableCap(cap=cap)
        for i, value in enumerate(args):
            req.args[i] = value
        ioctl(self.fd, s.KVM_ENABLE_CAP, req, f"KVM_ENABLE_CAP({cap})")

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION: map ``size`` bytes at ``host_addr`` to guest ``gpa``."""
        region = s.KvmUserspaceMemoryRegion(
            slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=host_addr
        )
        ioctl(self.fd, s.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def copy_enc_context_from(self, source: Vm) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_VM_COPY_ENC_CONTEXT_FROM, source fd): make this VM a mirror sharing
        ``source``'s memory-encryption context (SEV ASID). KVM accepts it only when ``source`` is an SEV
        VM and this one has no vCPUs yet; otherwise ``KvmError`` (EINVAL for a plain source VM)."""
        self.enable_cap(s.KVM_CAP_VM_COPY_ENC_CONTEXT_FROM, source.fd)

    def get_dirty_log(self, slot: int, bitmap_addr: int) -> None:
        """KVM_GET_DIRTY_LOG: write the slot's dirty bitmap at ``bitmap_addr`` and clear it in KVM."""
        log = s.KvmDirtyLog(slot=slot, dirty_bitmap=bitmap_addr)
        ioctl(self.fd, s.KVM_GET_DIRTY_LOG, log, "KVM_GET_DIRTY_LOG")

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap_addr: int) -> None:
        """KVM_CLEAR_DIRTY_LOG (manual dirty-log protection): clear and write-protect again the pages whose
        bits are set in the bitmap at ``bitmap_addr`` (page ``first_page`` is its bit 0)."""
        log = s.KvmClearDirtyLog(
            slot=slot, num_pages=num_pages, first_page=first_page, dirty_bitmap=bitmap_addr
        )
        ioctl(self.fd, s.KVM_CLEAR_DIRTY_LOG, log, "KVM_CLEAR_DIRTY_LOG")

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: the in-kernel interrupt controllers (a LAPIC per vCPU, IOAPIC, PIC). Before
        any vCPU exists."""
        ioctl(self.fd, s.KVM_CREATE_IRQCHIP, None, "KVM_CREATE_IRQCHIP")

    def get_clock(self) -> s.KvmClockData:
        """KVM_GET_CLOCK: the VM's kvm-clock in ns (``clock``), as every vCPU's pvclock derives it."""
        data = s.KvmClockData()
        ioctl(self.fd, s.KVM_GET_CLOCK, data, "KVM_GET_CLOCK")
        return data

    def set_clock(self, clock_ns: int) -> None:
        """KVM_SET_CLOCK to ``clock_ns`` (no flags: the value is taken as of now); KVM updates every vCPU's
        pvclock before it next runs."""
        ioctl(self.fd, s.KVM_SET_CLOCK, s.KvmClockData(clock=clock_ns), "KVM_SET_CLOCK")

    def set_tss_addr(self, gpa: int) -> None:
        """KVM_SET_TSS_ADDR: three pages KVM may use on VMX hosts (outside RAM and MMIO)."""
        ioctl(self.fd, s.KVM_SET_TSS_ADDR, gpa, "KVM_SET_TSS_ADDR")

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU and the mmap of its kvm_run page."""
        fd = ioctl(self.fd, s.KVM_CREATE_VCPU, vcpu_id, f"KVM_CREATE_VCPU({vcpu_id})")
        vcpu = Vcpu(vcpu_id, fd, self.kvm.vcpu_mmap_size())
        vcpu.xsave_size = self.check_extension(s.KVM_CAP_XSAVE2)  # 0 where only the 4 KiB ioctls exist
        return vcpu

    def stats(self) -> StatsFd:
        """KVM_GET_STATS_FD for the VM."""
        return StatsFd(ioctl(self.fd, s.KVM_GET_STATS_FD, None, "KVM_GET_STATS_FD"))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Vcpu:
    """A vCPU fd and its kvm_run mapping (``run``: a KvmRun over the mmap)."""

    def __init__(self, vcpu_id: int, fd: int, mmap_size: int) -> None:
        self.id = vcpu_id
        self.fd = fd
        self.xsave_size = 0  # the VM's XSAVE area size when larger than 4 KiB (KVM_CAP_XSAVE2)
        try:
            self._mm: mmap.mmap | None = mmap.mmap(
                fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError:
            os.close(fd)
            raise
        # from_address, not from_buffer: a buffer export would keep the mmap from closing while any
        # traceback still references the struct; nothing touches it after close (threads are joined).
        anchor = ctypes.c_char.from_buffer(self._mm)
        self._run_addr = ctypes.addressof(anchor)
        del anchor
        self.run_struct: s.KvmRun | None = s.KvmRun.from_address(self._run_addr)

    @property
    def run(self) -> s.KvmRun:
        assert self.run_struct is not None, "vCPU is closed"
        return self.run_struct

    def run_once(self) -> int:
        """KVM_RUN: 0 after an exit (see ``run.exit_reason``), ``-errno`` when interrupted or failed."""
        return ioctl_errno(self.fd, s.KVM_RUN)

    def get_regs(self) -> s.KvmRegs:
        """KVM_GET_REGS."""
        regs = s.KvmRegs()
        ioctl(self.fd, s.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: s.KvmRegs) -> None:
        """KVM_SET_REGS."""
        ioctl(self.fd, s.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> s.KvmSregs:
        """KVM_GET_SREGS."""
        sregs = s.KvmSregs()
        ioctl(self.fd, s.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: s.KvmSregs) -> None:
        """KVM_SET_SREGS."""
        ioctl(self.fd, s.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self) -> s.KvmFpu:
        """KVM_GET_FPU."""
        fpu = s.KvmFpu()
        ioctl(self.fd, s.KVM_GET_FPU, fpu, "KVM_GET_FPU")
        return fpu

    def set_fpu(self, fpu: s.KvmFpu) -> None:
        """KVM_SET_FPU."""
        ioctl(self.fd, s.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def get_xcrs(self) -> s.KvmXcrs:
        """KVM_GET_XCRS."""
        xcrs = s.KvmXcrs()
        ioctl(self.fd, s.KVM_GET_XCRS, xcrs, "KVM_GET_XCRS")
        return xcrs

    def set_xcrs(self, xcrs: s.KvmXcrs) -> None:
        """KVM_SET_XCRS."""
        ioctl(self.fd, s.KVM_SET_XCRS, xcrs, "KVM_SET_XCRS")

    def get_xsave(self) -> bytes:
        """The vCPU's XSAVE area (x87, SSE, the upper YMM halves and whatever else XCR0 enables):
        KVM_GET_XSAVE2 when the VM's area is larger than 4 KiB, else KVM_GET_XSAVE."""
        size = self.xsave_size
        if size > ctypes.sizeof(s.KvmXsave):
            area = (ctypes.c_uint8 * size)()
            ioctl(self.fd, s.KVM_GET_XSAVE2, area, "KVM_GET_XSAVE2")
            return bytes(area)
        legacy = s.KvmXsave()
        ioctl(self.fd, s.KVM_GET_XSAVE, legacy, "KVM_GET_XSAVE")
        return bytes(memoryview(legacy).cast("B"))

    def set_xsave(self, area: bytes) -> None:
        """KVM_SET_XSAVE from ``area``, zero-padded to the VM's XSAVE size (at least 4 KiB); KVM checks
        the header's feature bits against what this vCPU may use."""
        length = max(self.xsave_size, ctypes.sizeof(s.KvmXsave))
        if len(area) > length:
            raise KvmError(errno.E2BIG, f"KVM_SET_XSAVE ({len(area)} bytes, at most {length})")
        buf = (ctypes.c_uint8 * length).from_buffer_copy(area.ljust(length, b"\0"))
        ioctl(self.fd, s.KVM_SET_XSAVE, buf, "KVM_SET_XSAVE")

    def get_lapic(self) -> bytes:
        """KVM_GET_LAPIC: the in-kernel LAPIC's 1 KiB register page (needs KVM_CREATE_IRQCHIP)."""
        state = s.KvmLapicState()
        ioctl(self.fd, s.KVM_GET_LAPIC, state, "KVM_GET_LAPIC")
        return bytes(state.regs)

    def set_lapic(self, regs: bytes) -> None:
        """KVM_SET_LAPIC from ``regs`` (zero-padded to 1 KiB): the registers, and the timer restarted
        from them."""
        if len(regs) > ctypes.sizeof(s.KvmLapicState):
            raise KvmError(errno.E2BIG, f"KVM_SET_LAPIC ({len(regs)} bytes)")
        state = s.KvmLapicState.from_buffer_copy(regs.ljust(ctypes.sizeof(s.KvmLapicState), b"\0"))
        ioctl(self.fd, s.KVM_SET_LAPIC, state, "KVM_SET_LAPIC")

    def get_vcpu_events(self) -> s.KvmVcpuEvents:
        """KVM_GET_VCPU_EVENTS: pending and injected exceptions, interrupts, NMI, SMI."""
        events = s.KvmVcpuEvents()
        ioctl(self.fd, s.KVM_GET_VCPU_EVENTS, events, "KVM_GET_VCPU_EVENTS")
        return events

    def set_vcpu_events(self, events: s.KvmVcpuEvents) -> None:
        """KVM_SET_VCPU_EVENTS (``flags`` says which optional parts to take)."""
        ioctl(self.fd, s.KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS")

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE (needs the in-kernel irqchip)."""
        state = s.KvmMpState()
        ioctl(self.fd, s.KVM_GET_MP_STATE, state, "KVM_GET_MP_STATE")
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        """KVM_SET_MP_STATE: e.g. RUNNABLE for a vCPU that should run without INIT/SIPI."""
        ioctl(self.fd, s.KVM_SET_MP_STATE, s.KvmMpState(mp_state=mp_state), f"KVM_SET_MP_STATE({mp_state})")

    def set_cpuid2(self, cpuid: s.KvmCpuid2) -> None:
        """KVM_SET_CPUID2."""
        ioctl(self.fd, s.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def get_msr(self, index: int) -> int:
        """KVM_GET_MSRS for one MSR."""
        msrs = s.KvmMsrs1(nmsrs=1)
        msrs.entries[0].index = index
        if ioctl(self.fd, s.KVM_GET_MSRS, msrs, f"KVM_GET_MSRS({index:#x})") != 1:
            raise KvmError(errno.EINVAL, f"KVM_GET_MSRS({index:#x})")
        return int(msrs.entries[0].data)

    def set_msr(self, index: int, value: int) -> None:
        """KVM_SET_MSRS for one MSR."""
        msrs = s.KvmMsrs1(nmsrs=1)
        msrs.entries[0].index = index
        msrs.entries[0].data = value
        if ioctl(self.fd, s.KVM_SET_MSRS, msrs, f"KVM_SET_MSRS({index:#x})") != 1:
            raise KvmError(errno.EINVAL, f"KVM_SET_MSRS({index:#x})")

    def tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest TSC rate."""
        return ioctl(self.fd, s.KVM_GET_TSC_KHZ, None, "KVM_GET_TSC_KHZ")

    def stats(self) -> StatsFd:
        """KVM_GET_STATS_FD for this vCPU."""
        return StatsFd(ioctl(self.fd, s.KVM_GET_STATS_FD, None, "KVM_GET_STATS_FD"))

    def close(self) -> None:
        # The ctypes view must go before the mmap can close.
        self.run_struct = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def addressof(obj: ctypes.Structure | ctypes.Array[ctypes.c_uint64]) -> int:
    """Host address of a ctypes object (for ioctls that take pointers inside structs)."""
    return ctypes.addressof(obj)


@dataclass(frozen=True)
class KvmProbe:
    """What ``probe_kvm`` found: a line for people, and KVM's own vCPU limit per VM."""

    detail: str
    max_vcpus: int


def probe_kvm(path: str | None = None) -> KvmProbe:
    """Open the KVM device and check its API and capabilities as a VMM will; what was found, or
    EnvironmentProblem saying what is wrong (the preflight's and the agent's KVM check)."""
    with Kvm(path) as kvm:
        limit = kvm.max_vcpus()
        caps = ", ".join(REQUIRED_CAPS)
        detail = f"{kvm.path}: KVM API {s.KVM_API_VERSION}, {caps}, at most {limit} vCPUs per VM"
        return KvmProbe(detail, limit)
